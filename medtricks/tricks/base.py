"""What a trick is: one class that owns its recipe keys, its ablation names, its tag, and the points
where it acts on a run. The run (``medtricks/run/``) and the engine call the points; neither knows which
tricks exist (``tests/docs/test_core_knows_no_trick.py``).

The points follow one naming scheme -- ``on_<event>`` (told, returns nothing), ``<thing>_options`` (keyword
arguments for a core builder, merged over the tricks), ``transform_<thing>`` (returns the value the run goes
on with), ``extra_<thing>`` (something added next to the core's own) -- and are listed once, in the order a
run meets them, with when each is called, what it receives and returns and which built-in tricks use it, in
the table of ``docs/plugins.md`` (the "Trick plug-ins" page of the documentation). Each is optional; the
default does nothing. A trick with no points (``warmup``, ``cosine``...) only names core recipe keys for
``ablate`` and tags. A class that defines a point by its name before that scheme (``RENAMED_POINTS``) is
refused by :func:`register_trick`.

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

        def transform_loss_fn(self, loss_fn):
            return lambda logits, targets: self.config.loss_scale * loss_fn(logits, targets)

    register_trick(LossScale)

A trick whose code needs heavy libraries (torch, timm, scikit-learn) keeps what a recipe reads apart from it, so
that reading a recipe imports none of them: its keys, ablation names and tags in a class registered from a light
module (the built-in tricks: :mod:`medtricks.tricks.keys`), and the points in a subclass that
:meth:`Trick.implementation` imports when a run builds its tricks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from medtricks.errors import MedtricksError

__all__ = [
    "Trick",
    "ReportsWhatItChanged",
    "TrickContext",
    "AblationName",
    "register_trick",
    "unregister_trick",
    "registered_tricks",
    "TrickRegistryError",
    "find_trick",
    "saved_trick_states",
    "RENAMED_POINTS",
]


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
    # teacher); the run gives medtricks.posthoc.load.load_trained, so tricks never import the orchestration.
    load_run: Optional[Callable[..., Any]] = None
    extras: dict[str, Any] = field(default_factory=dict)


class Trick:
    """One bag-of-tricks item. Subclass it, fill the class attributes, override the points it acts at
    (docs/plugins.md), and :func:`register_trick` it.

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

    #: What the trick reports about what it did once it acted (e.g. the layers a γ strategy changed), or
    #: ``None``; a run hands it to the user as ``RunResult.report(name)`` (``RunResult.trick_reports``).
    report: Any = None
    #: A ``RunResult`` attribute that read this trick's report before ``RunResult.report(name)`` existed;
    #: still answered, with a ``DeprecationWarning`` (``RunResult.gamma_report``: ``report("bn_gamma")``).
    deprecated_result_attribute: ClassVar[Optional[str]] = None

    @classmethod
    def implementation(cls) -> type["Trick"]:
        """The class whose instances act on a run: this one. A class that only declares a trick (its keys,
        ablation names and tags: :mod:`medtricks.tricks.keys`) returns the subclass with its points, imported
        here -- when a run builds its tricks, not when a recipe is read."""
        return cls

    @classmethod
    def empty_report(cls) -> Any:
        """What ``RunResult.report(name)`` gives when the trick did not act or reported nothing (``None``)."""
        return None

    # ---- points, in the order a run meets them (docs/plugins.md: when each is called, and why)
    def on_model(self, model: Any) -> None:
        """The built model, after the pretrained weights load, before freezing and the optimizer (BN-γ)."""

    def on_freeze(self, model: Any, frozen: list[str]) -> None:
        """After ``model.freeze`` (also when it froze nothing): ``frozen`` names the frozen parameters."""

    def loader_options(self) -> dict[str, Any]:
        """Keyword arguments for the training loader (``make_train_loader``): ``drop_last``, ``sampler``."""
        return {}

    def param_options(self) -> dict[str, Any]:
        """Keyword arguments for ``build_param_groups`` (no-bias-decay)."""
        return {}

    def extra_modules(self) -> dict[str, Any]:
        """``{name: nn.Module}`` the trick trains besides the model (called after ``on_model``, on the
        device already). Their parameters go into the run's optimizer with the model's param options, so the
        schedule, gradient clipping, AMP's GradScaler and the optimizer state in ``last.pt`` cover them; they
        are never saved with the model -- keep their weights in :meth:`state_dict`."""
        return {}

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments for ``build_loss`` (label smoothing, class weights, soft targets)."""
        return {}

    def transform_loss_fn(self, loss_fn: Any) -> Any:
        """The loss function to train with, given the built one (distillation scales it)."""
        return loss_fn

    def on_fit_start(self, model: Any) -> None:
        """The model on its device, before a resume loads ``last.pt`` (EMA makes its copy here)."""

    def transform_batch(self, images: Any, targets: Any) -> tuple[Any, Any]:
        """Each training batch on the device, before the forward pass: the batch to train on (mixup/cutmix,
        adversarial examples)."""
        return images, targets

    def extra_loss(self, model: Any, images: Any, targets: Any, logits: Any) -> Optional[Any]:
        """A scalar tensor added to the batch loss (inside the autocast context), or ``None``.
        ``images``/``targets`` are what ``transform_batch`` returned and ``logits`` the model's output on them."""
        return None

    def on_step_end(self, model: Any, step: int) -> None:
        """After each optimizer update; ``step`` counts the updates (EMA averages here)."""

    def transform_eval_model(self, model: Any) -> Any:
        """The model to validate, select and save, given the trained one (EMA: its averaged copy)."""
        return model

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After validation and the checkpoint, with the epoch's metrics (a trick may add its own to them)."""

    def operating_point_options(self) -> dict[str, Any]:
        """Keyword arguments for choosing the decision threshold on validation
        (:func:`medtricks.evaluate.operating_point.select_threshold`), e.g. the class priors trained against."""
        return {}

    def state_dict(self) -> Optional[dict[str, Any]]:
        """What ``last.pt`` must keep so a resumed run is exact (``None``: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming: what :meth:`state_dict` returned, after :meth:`on_fit_start`."""


#: Points renamed to the one naming scheme (old name -> new name); a trick class defining an old one is refused.
RENAMED_POINTS = {
    "on_batch": "transform_batch",
    "after_step": "on_step_end",
    "wrap_loss": "transform_loss_fn",
    "eval_model": "transform_eval_model",
    "trainable_modules": "extra_modules",
}


#: Top-level keys of a ``last.pt`` written before tricks were plug-ins -> the trick whose state they hold.
_LEGACY_STATE_KEYS = {"ema": "ema"}


def saved_trick_states(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The tricks' states in a ``last.pt`` by trick name (its ``tricks`` entry), including those an older
    medtricks kept at the checkpoint's top level: what the engine hands each trick's ``load_state_dict``."""
    saved = dict(checkpoint.get("tricks") or {})
    for key, trick in _LEGACY_STATE_KEYS.items():
        if checkpoint.get(key) is not None:
            saved = {trick: checkpoint[key], **saved}
    return saved


_REGISTRY: dict[str, type[Trick]] = {}


class ReportsWhatItChanged:
    """The reporting points of a trick that keeps a report of what it changed (``self.report``, with
    ``summary()``, ``str()``, ``len()`` and ``to_csv(path)``): the run logs the summary as the param named
    like the trick, prints the report, and stores it as ``artifacts/<name>_report.csv`` (logged under
    ``tricks/``). List it first among the bases: ``class T(ReportsWhatItChanged, Trick)``.
    ``keep_empty_report``: report even when the report lists nothing."""

    keep_empty_report: ClassVar[bool] = False

    def _reports(self) -> bool:
        return self.report is not None and (self.keep_empty_report or len(self.report) > 0)

    def log_params(self) -> dict[str, Any]:
        return {self.name: self.report.summary() if self._reports() else "none"}

    def summary(self) -> Optional[str]:
        return str(self.report) if self._reports() else None

    def artifacts(self, run_dir: Any) -> list[tuple[Any, str]]:
        if not self._reports():
            return []
        path = run_dir.trick_report(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.report.to_csv(path)
        return [(path, "tricks")]


def register_trick(cls: type[Trick]) -> type[Trick]:
    """Add a trick class to the registry (also usable as a class decorator); returns the class.

    Its ``fields`` join the recipe's ``tricks:`` section and its ``ablation`` names join
    ``ablate --tricks``. Re-registering the same class (a module imported twice) is a no-op.
    """
    if not (isinstance(cls, type) and issubclass(cls, Trick)):
        raise TrickRegistryError(f"register_trick expects a Trick subclass, got {cls!r}")
    renamed = [
        (old, new)
        for old, new in RENAMED_POINTS.items()
        if any(old in vars(k) for k in cls.__mro__ if k not in (Trick, object))
    ]
    if renamed:
        listed = ", ".join(f"{old}() is now {new}()" for old, new in renamed)
        raise TrickRegistryError(
            f"trick class {cls.__module__}.{cls.__qualname__} defines a trick point by its old "
            f"name, which the run no longer calls: {listed}. Rename the method (the points and "
            "their names: docs/plugins.md)"
        )
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
            raise TrickRegistryError(
                f"trick {cls.name!r}: recipe key(s) tricks.{', tricks.'.join(sorted(taken))} "
                f"already belong to trick {other.name!r}"
            )
        names = set(other.ablation) & set(cls.ablation)
        if names:
            raise TrickRegistryError(
                f"trick {cls.name!r}: ablation name(s) {sorted(names)} already belong to trick {other.name!r}"
            )
    _REGISTRY[cls.name] = cls
    return cls


def unregister_trick(name: str) -> None:
    """Remove a trick (tests, notebooks); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def find_trick(name: str) -> Optional[type[Trick]]:
    """The registered trick class called ``name``, if any."""
    return _REGISTRY.get(name)


def registered_tricks() -> list[type[Trick]]:
    """Registered trick classes in their ``order`` (ties: registration order)."""
    return sorted(_REGISTRY.values(), key=lambda cls: cls.order)  # sorted() is stable
