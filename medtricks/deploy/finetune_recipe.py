"""The recipes of ``adapt --method finetune``: the parent's recipe with the fine-tuning settings, and one per fold.

What :func:`finetune_recipe` sets, and why, is in :mod:`medtricks.deploy.finetune`'s docstring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from medtricks.errors import ConfigError
from medtricks.recipe import Recipe, apply_overrides, recipe_from_dict

__all__ = ["CHECKPOINT_METRIC", "RESET_TRICKS", "parse_freeze", "check_overrides", "finetune_recipe", "fold_recipe"]

#: What chooses a fold's (and the final run's) checkpoint: the training loss, so validation chooses only the threshold.
CHECKPOINT_METRIC = "train/epoch_loss"
#: Keys the command sets itself: ``--set`` may not change them (use its options).
_FIXED_KEYS = (
    "data.card",
    "data.root",
    "data.synth",
    "data.test_fraction",
    "model.weights",
    "experiment.output_dir",
    "experiment.name",
)
#: Tricks that (re)initialise a model after its weights load, or need other data: off when fine-tuning a run.
RESET_TRICKS = {
    "bn_gamma": {"strategy": "none"},
    "layerscale_gamma": {"strategy": "none"},
    "reinit_late": {"stages": 0},
    "distill": {},
    "pseudo_label": {},
}


def parse_freeze(text: Union[str, Sequence, None]) -> Optional[list]:
    """``--freeze 0,1,2`` → ``[0, 1, 2]`` (timm stage indices, or module-name patterns as ``model.freeze``
    takes them); ``none`` → ``[]`` (nothing frozen); ``None`` → ``None`` (the parent's ``model.freeze``)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return list(text)
    if text.strip().lower() in ("", "none", "null"):
        return []
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def check_overrides(overrides: Sequence[str]) -> None:
    """A ``--set KEY=VALUE`` may not change a key the command sets itself (:data:`_FIXED_KEYS`)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for fixed in _FIXED_KEYS:
            if key == fixed or fixed.startswith(key + ".") or key.startswith(fixed + "."):
                raise ConfigError(
                    f"--set {item!r}: adapt --method finetune sets {fixed} itself (the parent run, "
                    "--card, --root, --out-dir; the site sample is the test of the cross-fit, so "
                    "data.test_fraction is 0); change it through the command's options"
                )


def finetune_recipe(
    parent: Recipe,
    *,
    weights: str,
    card: str,
    root: str,
    epochs: int = 3,
    lr: Optional[float] = None,
    freeze: Optional[Sequence] = None,
    overrides: Sequence[str] = (),
    output_dir: str,
    name: str,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
) -> Recipe:
    """The recipe that fine-tunes ``parent``'s model (``weights``: ``run:<parent>``) on ``card`` at ``root``
    (:mod:`medtricks.deploy.finetune`'s docstring lists every key it sets); ``overrides`` (``KEY=VALUE``) come last."""
    check_overrides(overrides)
    if int(epochs) < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs!r}")
    data = parent.model_dump(mode="json")
    data["model"]["weights"] = weights
    data["data"].update(
        card=str(card),
        root=str(root),
        synth=None,
        test_fraction=0.0,
        label_fraction=None,
        label_count=None,
        unlabeled=None,
    )
    data["train"].update(epochs=int(epochs), best_metric=CHECKPOINT_METRIC, best_mode="min", best_tiebreak=None)
    if batch_size:
        data["train"]["batch_size"] = int(batch_size)
    if device:
        data["train"]["device"] = str(device)
    data["optim"]["lr"] = float(lr) if lr is not None else float(parent.optim.lr) * 0.1
    data["schedule"].update(warmup_epochs=0.0, progressive_resize=None)
    if freeze is not None:
        data["model"]["freeze"] = list(freeze) or None
    if not data["model"]["freeze"]:
        data["train"]["cache_frozen"] = None
    for trick, reset in RESET_TRICKS.items():
        if trick in data["tricks"]:
            data["tricks"][trick] = dict(reset)
    data["experiment"].update(output_dir=str(output_dir), name=name)
    data["tracking"]["run_name"] = None
    data = apply_overrides(data, list(overrides))
    return recipe_from_dict(data, "adapt --method finetune (the parent's recipe with the fine-tuning settings)")


def fold_recipe(common: dict, *, card_path: Path, crossfit_dir: Path, k: int) -> Recipe:
    """Fold ``k``'s run: the fine-tuning recipe ``common`` (a dumped recipe) on the fold's card, untracked, quiet."""
    data = json.loads(json.dumps(common))
    data["data"]["card"] = str(card_path)
    data["experiment"].update(output_dir=str(crossfit_dir), name=f"fold{k + 1}")
    data["tracking"] = {"backend": "none"}  # the cross-fit's runs stay in the cross-fit folder's local run store
    data["eval"].update(plots=False, n_bootstrap=0)  # pooled with intervals by the cross-fit, not per fold
    data["audit"].update(enabled=False, shortcut=False)
    data["train"]["progress"] = False  # one bar over the folds instead
    return recipe_from_dict(data, f"adapt --method finetune, cross-fit fold {k + 1}")
