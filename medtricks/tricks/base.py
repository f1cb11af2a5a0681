"""What a trick is: one class that owns its recipe keys, its ablation names, its tag, and the points
where it acts on a run. The engine and ``run.py`` call the points; neither knows which tricks exist.

Points, in the order a run meets them (each is optional; the default does nothing):

===================  ========================================================================
``__init__``         the recipe and a :class:`TrickContext` (classes, training labels, device)
``on_model``         the built model, after the pretrained weights load (BN-gamma)
``param_options``    keyword arguments for ``build_param_groups`` (no-bias-decay)
``trainable_modules`` modules the trick trains besides the model (DRLoc's head): their parameters join
                     the run's optimizer (same options, schedule, clipping, GradScaler), never the model
``loader_options``   keyword arguments for the training loader (class-balanced sampler, drop_last)
``loss_options``     keyword arguments for ``build_loss`` (label smoothing, class weights, soft targets)
``wrap_loss``        the loss function, to wrap or replace (auxiliary losses, distillation)
``on_fit_start``     the model on its device, before resuming (EMA makes its copy here)
``on_batch``         each training batch on the device, before the forward pass (mixup/cutmix,
                     adversarial examples)
``extra_loss``       a term added to the batch loss, given the model, batch and logits (TRADES)
``after_step``       after each optimizer update (EMA)
``eval_model``       the model to validate and save instead of the trained one (EMA)
``on_epoch_end``     after validation, with the epoch's metrics
``state_dict``       what ``last.pt`` must keep so a resumed run is exact
===================  ========================================================================

A trick with no points (``warmup``, ``cosine``...) only names core recipe keys for ``ablate`` and tags.

Example -- a whole trick in one file, registered in one line::

    from pydantic import Field
    from medtricks.tricks.base import AblationName, Trick, register_trick

    class LossScale(Trick):
        name = "loss_scale"
        fields = {"loss_scale": (float, Field(1.0, gt=0))}          # recipe key tricks.loss_scale
        ablation = {"loss_scale": AblationName("tricks.loss_scale", "2.0", "multiply the loss")}

        @classmethod
        def tags(cls, recipe):
            return [f"loss_scale={recipe.tricks.loss_scale:g}"] if recipe.tricks.loss_scale != 1 else []

        def wrap_loss(self, loss_fn):
            return lambda logits, targets: self.config.loss_scale * loss_fn(logits, targets)

    register_trick(LossScale)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from medtricks.errors import MedtricksError

__all__ = ["Trick", "TrickContext", "AblationName", "register_trick", "unregister_trick", "registered_tricks",
           "TrickRegistryError"]


class TrickRegistryError(MedtricksError, ValueError):
    """A trick class that cannot be registered (name or recipe key taken, bad definition)."""


@dataclass(frozen=True)
class AblationName:
    """A name users type in ``ablate --tricks NAME[=VALUE]``: the recipe key it sets and its default."""

    key: str  # dotted recipe key, e.g. "tricks.label_smoothing" or "schedule.warmup_epochs"
    default: Optional[str]  # value for the bare name; None: the user must give NAME=VALUE
    help: str


@dataclass
class TrickContext:
    """What a trick may read when it acts: the recipe, the class names, the training labels, the device,
    and the per-channel ``mean``/``std`` the loader normalises images with (``(x - mean) / std`` from
    pixels ``x`` in ``[0, 1]``), for tricks that work in pixel space (adversarial training)."""

    recipe: Any
    classes: list[str]
    train_targets: Any = None
    device: Any = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    # Loads a finished run (folder or run id) as a model, for tricks that need one (a distillation
    # teacher); run.py gives medtricks.posthoc.load.load_trained, so tricks never import the orchestration.
    load_run: Optional[Callable[..., Any]] = None
    extras: dict[str, Any] = field(default_factory=dict)


class Trick:
    """One bag-of-tricks item. Subclass it, fill the class attributes, override the points it acts at
    (see the module docstring), and :func:`register_trick` it.

    Class attributes:
        name: unique name of the trick.
        fields: the recipe keys it owns under ``tricks:`` as pydantic field definitions,
            ``{"label_smoothing": (float, Field(0.0, ge=0, lt=1))}``.
        ablation: names for ``ablate --tricks``: ``{"label_smoothing": AblationName(...)}``.
        order: where its tag and its points come among the tricks (lower first; ties: registration order).
    """

    name: ClassVar[str] = ""
    fields: ClassVar[dict[str, tuple[Any, Any]]] = {}
    ablation: ClassVar[dict[str, AblationName]] = {}
    order: ClassVar[int] = 1000

    def __init__(self, recipe: Any, ctx: TrickContext) -> None:
        self.recipe = recipe
        self.config = recipe.tricks  # the whole `tricks:` section; a trick reads its own keys
        self.ctx = ctx

    # ---- description
    @classmethod
    def tags(cls, recipe: Any) -> list[str]:
        """Short labels when the trick is on in ``recipe`` (the run's ``tricks`` tag); ``[]`` when off.
        A trick acts on a run only when it has tags."""
        return []

    def log_params(self) -> dict[str, Any]:
        """Values the run logs as params once the trick has acted (e.g. computed class weights)."""
        return {}

    def artifacts(self, run_dir: Any) -> list[tuple[Any, str]]:
        """Files it wrote into the run folder, as ``(path, artifact folder)``, for the run store."""
        return []

    def summary(self) -> Optional[str]:
        """A text the run prints after the trick acted on the model (e.g. the BN-gamma table)."""
        return None

    # ---- points (see the module docstring for when each is called)
    def on_model(self, model: Any) -> None:
        pass

    def param_options(self) -> dict[str, Any]:
        return {}

    def trainable_modules(self) -> dict[str, Any]:
        """``{name: nn.Module}`` the trick trains besides the model (called after ``on_model``, on the
        device already). Their parameters go into the run's optimizer with the model's param options, so the
        schedule, gradient clipping, AMP's GradScaler and the optimizer state in ``last.pt`` cover them; they
        are never saved with the model -- keep their weights in :meth:`state_dict`."""
        return {}

    def loader_options(self) -> dict[str, Any]:
        return {}

    def loss_options(self) -> dict[str, Any]:
        return {}

    def wrap_loss(self, loss_fn: Any) -> Any:
        return loss_fn

    def on_fit_start(self, model: Any) -> None:
        pass

    def on_batch(self, images: Any, targets: Any) -> tuple[Any, Any]:
        return images, targets

    def extra_loss(self, model: Any, images: Any, targets: Any, logits: Any) -> Optional[Any]:
        """A scalar tensor added to the batch loss (inside the autocast context), or ``None``.
        ``images``/``targets`` are what ``on_batch`` returned and ``logits`` the model's output on them."""
        return None

    def after_step(self, model: Any, step: int) -> None:
        pass

    def eval_model(self, model: Any) -> Optional[Any]:
        return None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def state_dict(self) -> Optional[dict[str, Any]]:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_REGISTRY: dict[str, type[Trick]] = {}


def register_trick(cls: type[Trick]) -> type[Trick]:
    """Add a trick class to the registry (also usable as a class decorator); returns the class.

    Its ``fields`` join the recipe's ``tricks:`` section and its ``ablation`` names join
    ``ablate --tricks``. Re-registering the same class (a module imported twice) is a no-op.
    """
    if not (isinstance(cls, type) and issubclass(cls, Trick)):
        raise TrickRegistryError(f"register_trick expects a Trick subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise TrickRegistryError(f"{cls.__qualname__}.name must be a python identifier, got {cls.name!r}")
    previous = _REGISTRY.get(cls.name)
    if previous is not None and previous.__qualname__ == cls.__qualname__ and previous.__module__ == cls.__module__:
        _REGISTRY[cls.name] = cls  # a re-import (e.g. a reloaded plugin file) replaces its older self
        return cls
    if previous is not None:
        raise TrickRegistryError(f"trick name {cls.name!r} is taken by {previous.__module__}.{previous.__qualname__}")
    for other in _REGISTRY.values():
        taken = set(other.fields) & set(cls.fields)
        if taken:
            raise TrickRegistryError(f"trick {cls.name!r}: recipe key(s) tricks.{', tricks.'.join(sorted(taken))} "
                                     f"already belong to trick {other.name!r}")
        names = set(other.ablation) & set(cls.ablation)
        if names:
            raise TrickRegistryError(f"trick {cls.name!r}: ablation name(s) {sorted(names)} already belong to "
                                     f"trick {other.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_trick(name: str) -> None:
    """Remove a trick (tests, notebooks); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def registered_tricks() -> list[type[Trick]]:
    """Registered trick classes in their ``order`` (ties: registration order)."""
    return sorted(_REGISTRY.values(), key=lambda cls: cls.order)  # sorted() is stable
