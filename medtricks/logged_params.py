"""The recipe keys a training run logs as params: the sections that are on, plus a ``tricks`` summary.

The run store's params are what the MLflow UI's compare page draws (parallel coordinates, scatter):
knobs of parts that are off only add flat axes there. So a run logs the flattened resolved recipe
(:func:`medtricks.recipe.flatten_recipe`) *without*:

- ``ablation.*``: a training run is never an ablation; the ablation's settings are on its parent run;
- bookkeeping that is not a knob (:data:`BOOKKEEPING`: where the run folder and the tracked run go,
  its name): it differs between every run of an ablation and would take the compare page's first
  axes; the ``run_dir`` tag and the run's name say it;
- nothing of a data folder's path: ``data.root``, ``data.cache_dir`` and ``data.unlabeled.root`` are logged
  as :func:`~medtricks.data.folder_id` (``r_`` + a salted hash), since folder names can hold patient
  names (the run folder's recipe.yaml keeps the real path, for resuming and evaluating on this machine);
- the sub-keys of a section that is off -- one whose switch says so: ``enabled: false``
  (``model.resizer``, ``audit``), ``strategy: none`` (``tricks.bn_gamma``) or ``method: none``
  (``tricks.adversarial``). The switch itself stays (``audit.enabled = False``), so grouping and
  filtering by it still sees every run.

plus ``tricks``: the tricks that are on, comma-separated (``none`` when none is), as in the ``tricks`` tag.
The full resolved recipe is still logged as the ``recipe.yaml`` artifact: it remains the single source
of truth for every knob.

    from medtricks.logged_params import run_params
    params = run_params(load_recipe("recipes/quickstart.yaml"))
    assert "ablation.jobs" not in params and params["audit.enabled"] is False
"""

from __future__ import annotations

from typing import Any

from medtricks.data.manifest import folder_id
from medtricks.recipe import Recipe, flatten_recipe

__all__ = ["run_params", "tricks_summary", "off_sections", "NEVER_LOGGED", "BOOKKEEPING", "SWITCHES", "DATA_FOLDERS"]

#: Recipe sections a training run never logs as params.
NEVER_LOGGED = ("ablation",)
#: Keys that say where a run is written and what it is called, not how it is trained.
BOOKKEEPING = ("experiment.output_dir", "tracking.uri", "tracking.experiment", "tracking.run_name")
#: Recipe keys that hold a data folder: logged as a salted hash of the path.
DATA_FOLDERS = ("data.root", "data.cache_dir", "data.unlabeled.root")
#: Switch key -> the value that turns its section off.
SWITCHES = {"enabled": False, "strategy": "none", "method": "none"}


def tricks_summary(recipe: Recipe) -> str:
    """``"warmup,no_bias_decay,..."``: the tricks that are on (``none`` when none is)."""
    return ",".join(recipe.tricks_on()) or "none"


def off_sections(recipe: Recipe | dict) -> dict[str, str]:
    """``{section path: its switch key}`` of every nested section that is off (``model.resizer``: ``enabled``)."""
    data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else recipe
    found: dict[str, str] = {}

    def walk(section: dict[str, Any], prefix: str) -> None:
        for key, value in section.items():
            if not isinstance(value, dict):
                continue
            path = f"{prefix}{key}"
            switch = next(
                (k for k, off in SWITCHES.items() if k in value and value[k] == off and type(value[k]) is type(off)),
                None,
            )
            if switch is not None:
                found[path] = switch
            else:
                walk(value, path + ".")

    walk(data, "")
    return found


def run_params(recipe: Recipe) -> dict[str, Any]:
    """The flattened recipe without ``ablation.*`` and the sub-keys of sections that are off, plus ``tricks``."""
    off = off_sections(recipe)
    params = {}
    for key, value in flatten_recipe(recipe).items():
        if key.split(".", 1)[0] in NEVER_LOGGED or key in BOOKKEEPING:
            continue
        section = next((s for s in off if key.startswith(s + ".")), None)
        if section is not None and key != f"{section}.{off[section]}":
            continue
        params[key] = folder_id(value) if key in DATA_FOLDERS and value else value
    params["tricks"] = tricks_summary(recipe)
    return params
