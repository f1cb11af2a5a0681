"""Chained fine-tuning: start a run from a finished medtricks run (``model.weights: run:<run folder or id>``).

Intermediate-domain transfer (ImageNet → a pneumonia run → COVID-19): the child recipe names the parent
run, and :func:`medtricks.posthoc.load.build_model` builds the child's architecture with random weights, then
loads every tensor of the parent's ``model/model_state.pt`` into it strictly (names and shapes checked),
except the classifier head when the classes differ (names or order): that head stays new. The child
normalizes its images as the parent was trained (the parent's ``model/data_config.json``), and its
``medtricks_info["lineage"]`` records where the weights came from (logged as ``lineage.*`` params).

This module reads the parent's files; finding a run by its id in a run store is
:func:`medtricks.posthoc.load._resolve_run_files`'s job (it calls :func:`load_parent_run` with the folder).

Example::

    from medtricks.chained import load_parent_run
    parent = load_parent_run("runs/kermany_pneumonia/20261201-101406-d20d09")
    print(parent.recipe.model.name, parent.classes, parent.data_config["mean"])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from medtricks.data import load_card
from medtricks.errors import ConfigError, MedtricksError, MissingFileError
from medtricks.models import channel_stats, resolve_model_name
from medtricks.models.layout import classifier_names
from medtricks.models.resizer import ResizerModel
from medtricks.models.state_dict import load_strict
from medtricks.models.weights import WEIGHT_NAMES, entry_for, sha256_file
from medtricks.recipe import RUN_WEIGHTS_PREFIX, Recipe, load_run_recipe, recipe_digest
from medtricks.rundir import RunDir
from medtricks.gamma.layerscale import insert_layerscale_for_state

__all__ = [
    "ParentRun",
    "ModelFileError",
    "parent_ref",
    "load_parent_run",
    "apply_parent_run",
    "read_model_state",
    "trained_data_config",
    "describe_lineage",
]


class ModelFileError(MedtricksError):
    """A run's model file that cannot be loaded safely (refused by ``torch.load(weights_only=True)``)."""


def parent_ref(weights: str) -> Optional[str]:
    """The run reference of ``model.weights: run:<ref>`` (``None`` for other weights)."""
    if not isinstance(weights, str) or not weights.startswith(RUN_WEIGHTS_PREFIX):
        return None
    ref = weights[len(RUN_WEIGHTS_PREFIX) :].strip()
    if not ref:
        raise ConfigError(f"model.weights={weights!r} names no run: write run:<run folder> or run:<run id>")
    return ref


def read_model_state(path: Path, device: str = "cpu") -> dict:
    """A run's ``model_state.pt`` with ``torch.load(weights_only=True)``; a file that holds anything but
    tensors and plain values is refused (:class:`ModelFileError`), never unpickled."""
    if not Path(path).is_file():
        raise MissingFileError(
            f"{path} not found: the run did not finish, or logged no model (tracking.log_model: false)"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - never retried unsafely; one line, not torch's advice
        raise ModelFileError(
            f"{path} was refused ({type(err).__name__}): it holds objects other than tensors "
            "and plain values, or is damaged, and medtricks never unpickles such a file (it could run "
            "code); use the model_state.pt that a medtricks run wrote"
        ) from None


def trained_data_config(run_dir: Path, fallback: dict) -> dict:
    """The data config a run trained with (its ``model/data_config.json``), else ``fallback``."""
    saved = RunDir(run_dir).data_config
    if saved.is_file():
        data = json.loads(saved.read_text())
        return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return fallback


@dataclass
class ParentRun:
    """A finished run whose model a child run starts from.

    ``run_dir``: its folder (``None`` when its files were downloaded from a run store into a temporary
    folder, ``files_dir``); ``data_config``: the mean/std it trained with (``None`` when the run saved none:
    :func:`apply_parent_run` then derives it from the parent's recipe).
    """

    ref: str
    files_dir: Path
    run_dir: Optional[Path]
    run_id: Optional[str]
    recipe: Recipe
    classes: list[str]
    state: dict
    sha256: str
    data_config: Optional[dict] = None
    lineage: dict = field(default_factory=dict)


def load_parent_run(
    run_dir: str | Path, *, ref: Optional[str] = None, run_id: Optional[str] = None, downloaded: bool = False
) -> ParentRun:
    """Read a finished run's recipe, classes (from its data card), model state (safely) and data config.

    ``run_dir`` is a run folder (a folder holding ``recipe.yaml`` and ``model/model_state.pt``);
    ``downloaded``: it is a temporary copy of a run store's files (then the run is named by ``run_id``).
    """
    files = RunDir(run_dir)
    if not files.recipe.is_file():
        raise MissingFileError(f"{files.path} holds no recipe.yaml: not a medtricks run folder")
    recipe = load_run_recipe(files.recipe)  # its plug-in list is never imported
    state = read_model_state(files.model_state)
    if run_id is None:
        run_id = files.read_state().get("run_id")
    classes = list(load_card(recipe.data.card).classes)
    saved = trained_data_config(files.path, {}) or None
    folder = None if downloaded else files.path.resolve()
    lineage = {
        "parent_run_id": run_id,
        "parent_run_dir": str(folder) if folder else None,
        "parent_recipe_digest": recipe_digest(recipe),
        "parent_weights": recipe.model.weights,
        "parent_classes": classes,
    }
    return ParentRun(
        ref=ref or str(run_dir),
        files_dir=files.path,
        run_dir=folder,
        run_id=run_id,
        recipe=recipe,
        classes=classes,
        state=state,
        sha256=sha256_file(files.model_state),
        data_config=saved,
        lineage=lineage,
    )


def _check_fits(recipe: Recipe, parent: ParentRun) -> None:
    """Architecture, input channels, resizer and ViT locality layers of the child equal the parent's (ConfigError
    naming both)."""
    spec, child, mother = recipe.model.weights, recipe.model, parent.recipe.model
    where = f"model.weights={spec!r}: the parent run"
    if resolve_model_name(child.name) != resolve_model_name(mother.name):
        raise ConfigError(
            f"{where} trained model.name={mother.name!r} but this recipe has model.name={child.name!r}; "
            f"a run's weights load only into its own architecture: set model.name: {mother.name}"
        )
    if child.in_chans != mother.in_chans:
        raise ConfigError(
            f"{where} trained model.in_chans={mother.in_chans} but this recipe has "
            f"model.in_chans={child.in_chans}: set model.in_chans: {mother.in_chans}"
        )
    if child.resizer.enabled != mother.resizer.enabled:
        raise ConfigError(
            f"{where} trained model.resizer.enabled={mother.resizer.enabled} but this recipe has "
            f"model.resizer.enabled={child.resizer.enabled}: set model.resizer.enabled: "
            f"{str(mother.resizer.enabled).lower()}"
        )
    for key in ("spt", "lsa"):  # SPT and LSA change the layers (and their tensors): the parent's must be the same
        theirs, ours = getattr(mother.vit, key), getattr(child.vit, key)
        if theirs != ours:
            raise ConfigError(
                f"{where} trained model.vit.{key}={theirs} but this recipe has model.vit.{key}={ours}: "
                f"set model.vit.{key}: {str(theirs).lower()}"
            )


def _backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """``(key prefix, backbone)``: a learnable resizer's model holds the backbone under ``backbone.``."""
    if isinstance(model, ResizerModel):
        return "backbone.", model.backbone
    return "", model


def _head_keys(model: nn.Module, name: str) -> set[str]:
    """State-dict keys of the classifier head (timm's ``pretrained_cfg`` classifier, else ``get_classifier()``)."""
    dot, backbone = _backbone(model)
    heads = list(classifier_names(backbone, name))
    if not heads and hasattr(backbone, "get_classifier"):
        classifier = backbone.get_classifier()
        heads = [n for n, m in backbone.named_modules() if m is classifier and n]
    if not heads:
        raise ConfigError(f"cannot find the classifier head of {name!r}: a new head for other classes cannot be made")
    prefixes = tuple(f"{dot}{h}." for h in heads)
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def _recipe_stats(parent: ParentRun, fallback: dict) -> tuple[tuple, tuple]:
    """The mean/std a parent without ``data_config.json`` trained with, from its weights (zoo entries)."""
    cfg = parent.recipe.model
    if cfg.weights in WEIGHT_NAMES:
        entry = entry_for(cfg.weights, resolve_model_name(cfg.name))
        return channel_stats(tuple(entry.mean), tuple(entry.std), cfg.in_chans)
    return tuple(fallback["mean"]), tuple(fallback["std"])


def apply_parent_run(model: nn.Module, recipe: Recipe, parent: ParentRun, data_config: dict) -> dict:
    """Load ``parent``'s weights into ``model`` (the child recipe's model, built with ``weights: none``).

    Every parent tensor is loaded strictly; the classifier head too when the classes are the same (names
    and order), else the head stays the model's new one (``medtricks_info["head"]``: ``"pretrained"`` /
    ``"new"``). Refuses another architecture, ``in_chans`` or resizer on/off (ConfigError naming both
    values); other differences (``model.kwargs``, attention) fail the strict load. Sets
    ``medtricks_info``: ``weights``, ``weights_source`` (the parent's folder, or ``run:<id>``),
    ``weights_sha256`` (of its ``model_state.pt``), ``head``, the parent's ``mean``/``std``, ``lineage``.

    Returns the child's data config: ``data_config`` with the parent's normalization.
    """
    _check_fits(recipe, parent)
    spec = recipe.model.weights
    state = dict(parent.state)
    insert_layerscale_for_state(model, state)  # tricks.layerscale_gamma.insert added LayerScale modules
    name = resolve_model_name(recipe.model.name)
    same_classes = list(parent.classes) == list(load_card(recipe.data.card).classes)
    allow: set[str] = set()
    if not same_classes:
        heads = _head_keys(model, name)
        state = {k: v for k, v in state.items() if k not in heads}
        allow = heads
    load_strict(
        model, state, what=f"weights {spec!r} ({parent.files_dir / 'model' / 'model_state.pt'})", allow_missing=allow
    )
    if parent.data_config is not None:
        mean, std = tuple(parent.data_config["mean"]), tuple(parent.data_config["std"])
    else:
        mean, std = _recipe_stats(parent, data_config)
    _, backbone = _backbone(model)
    info = dict(getattr(backbone, "medtricks_info", {}))
    info.update(
        weights=spec,
        weights_source=str(parent.run_dir) if parent.run_dir else f"run:{parent.run_id}",
        weights_sha256=parent.sha256,
        head="pretrained" if same_classes else "new",
        mean=mean,
        std=std,
        lineage=dict(parent.lineage),
    )
    backbone.medtricks_info = info
    if model is not backbone:
        model.medtricks_info = dict(info)
    return {**data_config, "mean": mean, "std": std}


def describe_lineage(info: dict[str, Any]) -> Optional[str]:
    """One line naming the parent run of a chained model's ``medtricks_info`` (``None`` if not chained)."""
    lineage = info.get("lineage")
    if not lineage:
        return None
    return (
        f"{lineage.get('parent_run_id') or lineage.get('parent_run_dir')} (recipe digest "
        f"{lineage.get('parent_recipe_digest')}, its weights: {lineage.get('parent_weights')}, classes: "
        f"{', '.join(lineage.get('parent_classes') or [])})"
    )
