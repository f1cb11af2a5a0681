"""The trick registry: the built-in tricks, plug-ins, and what is derived from them -- the recipe's
``tricks:`` section, the ``ablate --tricks`` names and a run's tags.

Built-in tricks register when this module is imported (one import line each below), without torch: the
tricks whose code needs torch, timm or scikit-learn are declared in :mod:`medtricks.tricks.keys` (their keys,
ablation names and tags), and :func:`build_tricks` imports their code when a run builds them. Other tricks
register from their own file with :func:`~medtricks.tricks.base.register_trick`; to use such a file
from ``medtricks run``, name it in the recipe's ``experiment.plugins`` list (a module name or a
``.py`` path), or ship it in a package under the ``medtricks.tricks`` entry-point group.

A plug-in is code that runs with your permissions, so a recipe's ``plugins:`` list is imported only
when the user opts in at the command line (``--allow-plugins``, which sets ``MEDTRICKS_ALLOW_PLUGINS=1``
for the processes it starts) and never from a stored run's recipe (``predict``, ``export``,
``evaluate``... load a run's model with :func:`ignoring_recipe_plugins`; they take ``--plugin`` for a
plug-in the user names explicitly). Installed packages' entry points are trusted like any import.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, create_model

# Built-in tricks: importing the module registers its trick(s); none imports torch (tricks/keys/).
import medtricks.tricks.settings  # noqa: F401  warmup, cosine, linear_scaling, amp, resizer, augment
import medtricks.tricks.label_smoothing  # noqa: F401
import medtricks.tricks.no_bias_decay  # noqa: F401
import medtricks.tricks.keys.bn_gamma  # noqa: F401
import medtricks.tricks.keys.layerscale_gamma  # noqa: F401  LayerScale-gamma strategies for ViTs (issue 20)
import medtricks.tricks.keys.mixup  # noqa: F401
import medtricks.tricks.keys.ema  # noqa: F401
import medtricks.tricks.keys.class_balance  # noqa: F401
import medtricks.tricks.keys.adversarial  # noqa: F401
import medtricks.tricks.keys.distill  # noqa: F401  knowledge distillation (issue 17)
import medtricks.tricks.keys.pseudo_label  # noqa: F401  pseudo-labels on the unlabelled pool (issue 17)
import medtricks.tricks.keys.fixmatch  # noqa: F401  FixMatch: weak-view labels train the strong view (issue 33)
import medtricks.tricks.keys.mpl  # noqa: F401  Meta Pseudo Labels: a teacher trained on its student's feedback (issue 33)
import medtricks.tricks.keys.drloc  # noqa: F401  DRLoc relative-localization loss for ViTs (issue 20)
import medtricks.tricks.keys.reinit_late  # noqa: F401  re-initialise late stages, Transfusion-style (issue 28)
from medtricks._schema import Section
from medtricks.errors import ConfigError, MedtricksError, MissingFileError
from medtricks.tricks.base import AblationName, Trick, TrickContext, registered_tricks

__all__ = [
    "tricks_config_model",
    "build_tricks",
    "trick_tags",
    "ablation_names",
    "load_plugins",
    "PluginError",
    "merged_options",
    "load_recipe_plugins",
    "plugins_allowed",
    "allow_plugins",
    "ignoring_recipe_plugins",
    "ALLOW_PLUGINS_ENV",
]

ENTRY_POINT_GROUP = "medtricks.tricks"
#: Set to ``1`` to let recipes' ``experiment.plugins`` run (what ``--allow-plugins`` does).
ALLOW_PLUGINS_ENV = "MEDTRICKS_ALLOW_PLUGINS"
# Set while a stored run's recipe is read: its plug-in list is data, never imported.
_ignoring_recipe_plugins: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ignoring_recipe_plugins", default=False
)


class PluginError(MedtricksError, ImportError):
    """A ``plugins:`` entry that cannot be imported (names the entry and why)."""


_TricksSection = Section  # unknown keys and booleans for numbers are errors, as in every section


_models: dict[tuple, type[BaseModel]] = {}
_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # noqa: BLE001 - a broken third-party plug-in names itself
            raise PluginError(
                f"trick plug-in {entry.name!r} ({entry.value}, entry point group "
                f"{ENTRY_POINT_GROUP!r}) failed to import: {type(err).__name__}: {err}"
            ) from err


def plugins_allowed() -> bool:
    """Whether recipes may import their ``experiment.plugins`` (``$MEDTRICKS_ALLOW_PLUGINS`` is ``1``)."""
    return os.environ.get(ALLOW_PLUGINS_ENV, "").strip().lower() in ("1", "true", "yes")


def allow_plugins() -> None:
    """Opt in for this process and the processes it starts (torchrun ranks, ablation workers, Ray)."""
    os.environ[ALLOW_PLUGINS_ENV] = "1"


@contextlib.contextmanager
def ignoring_recipe_plugins():
    """Within this block, a recipe's ``experiment.plugins`` list is not imported (reading a stored run)."""
    token = _ignoring_recipe_plugins.set(True)
    try:
        yield
    finally:
        _ignoring_recipe_plugins.reset(token)


def load_recipe_plugins(plugins: Iterable[str], source: str = "the recipe") -> None:
    """Import a recipe's ``experiment.plugins`` if the user opted in; a stored run's list is skipped.

    Raises :class:`PluginError` (no code run) when the user did not opt in.
    """
    plugins = list(plugins or ())
    if not plugins or _ignoring_recipe_plugins.get():
        return
    if not plugins_allowed():
        raise PluginError(
            f"{source} names experiment.plugins {plugins}: a plug-in is Python code that runs with "
            f"your permissions, so medtricks imports none unless you opt in; if you trust it, pass "
            f"--allow-plugins (or set {ALLOW_PLUGINS_ENV}=1)"
        )
    load_plugins(plugins)


def load_plugins(plugins: Iterable[str]) -> None:
    """Import trick plug-ins: module names (``my_lab.tricks``) or ``.py`` file paths (relative to the cwd).

    This imports unconditionally (the caller named them: ``--plugin``, or Python code); a recipe's list
    goes through :func:`load_recipe_plugins`, which asks for the user's opt-in first.
    """
    for plugin in plugins or ():
        if not isinstance(plugin, str) or not plugin.strip():
            raise PluginError(f"plugins: entries must be module names or .py paths, got {plugin!r}")
        try:
            if plugin.endswith(".py"):
                path = Path(plugin).expanduser().resolve()
                if not path.is_file():
                    raise MissingFileError(f"no such file {path}")
                name = f"medtricks_plugin_{path.stem}"
                if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except Exception as err:  # noqa: BLE001 - say which plug-in and why
            raise PluginError(
                f"plugins: {plugin!r} could not be imported ({type(err).__name__}: {err}); "
                "give an importable module name or a path to a .py file"
            ) from err


def tricks_config_model() -> type[BaseModel]:
    """The pydantic model of the recipe's ``tricks:`` section: every registered trick's fields."""
    _load_entry_points()
    tricks = registered_tricks()
    key = tuple(tricks)
    if key not in _models:
        fields: dict[str, Any] = {}
        for cls in tricks:
            fields.update(cls.fields)
        _models[key] = create_model("TricksConfig", __base__=_TricksSection, **fields)
    return _models[key]


def trick_tags(recipe: Any) -> list[str]:
    """Labels of every trick ``recipe`` switches on, in trick order (the run's ``tricks`` tag)."""
    return [tag for cls in registered_tricks() for tag in cls.tags(recipe)]


def build_tricks(recipe: Any, ctx: TrickContext) -> list[Trick]:
    """One instance of every trick that is on in ``recipe``, in order: what the run and engine call (a trick
    declared apart from its code is built from its :meth:`~medtricks.tricks.base.Trick.implementation`)."""
    return [cls.implementation()(recipe, ctx) for cls in registered_tricks() if cls.tags(recipe)]


def ablation_names() -> dict[str, AblationName]:
    """Every ``ablate --tricks`` name of every registered trick."""
    _load_entry_points()
    names: dict[str, AblationName] = {}
    for cls in registered_tricks():
        names.update(cls.ablation)
    return names


def merged_options(tricks: Iterable[Trick], point: str) -> dict[str, Any]:
    """The keyword arguments the tricks contribute at an ``*_options`` point (``loader_options``...); two tricks that set the
    same argument to different values is an error naming both."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for trick in tricks:
        for key, value in getattr(trick, point)().items():
            if key in merged and merged[key] != value:
                raise ConfigError(
                    f"tricks {owner[key]!r} and {trick.name!r} both set {key!r} "
                    f"({merged[key]!r} vs {value!r}) at {point}; switch one of them off"
                )
            merged[key], owner[key] = value, trick.name
    return merged
