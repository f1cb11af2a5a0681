"""``medtricks adapt --method finetune``: fine-tune a trained run on a new site's *labelled* images, and
measure what that buys on patients the fine-tuning never saw.

A hospital that adopts a model trained elsewhere often holds a few hundred labelled images of its own.
:func:`finetune_run` uses them twice:

1. **Cross-fit (the numbers).** The site's patients are split into ``folds`` folds (stratified by class,
   grouped by the manifest's hashed ``patient``). For each fold *k* the parent run is fine-tuned on the
   other folds' patients and predicts fold *k*: every site image is scored once, by a model that never saw
   its patient. Each fold run also holds out a patient-level validation part of its training patients
   (``data.val_fraction``); that part chooses nothing but the fold's Youden threshold (see "checkpoint"
   below). The pooled out-of-fold predictions give AUROC and accuracy / sensitivity / specificity at three
   decision rules — (a) the parent's stored operating point, (b) 0.5, (c) each fold's Youden threshold from
   its validation part — with image-bootstrap intervals (:func:`medtricks.evaluate.compute_metrics`), next to
   the parent's own out-of-the-box scores on the same images (at (c): the parent's threshold re-chosen on
   the same validation images, i.e. threshold recalibration without fine-tuning) and the paired
   image-bootstrap Δ AUROC (:func:`medtricks.evaluate.paired.image_bootstrap_delta`).
2. **The deliverable.** The parent is fine-tuned once more on all site images with the same settings (less
   its own patient-level validation part, carved the same way: the engine needs one): a normal run folder whose model starts from the
   parent through ``model.weights: run:<parent>`` (lineage logged), with ``model/adaptation.json`` (the
   cross-fitted numbers, the settings, the site folder as a salted ``r_`` id, never a path) and a stored
   operating point that is the **mean of the fold Youden thresholds** (each chosen on patients its model did
   not train on), not one chosen on the run's own images.

Checkpoint: the engine needs a validation split and keeps the epoch that is best on ``train.best_metric``.
Fine-tuning sets ``train.best_metric: train/epoch_loss`` (``best_mode: min``, no tie-break): the checkpoint is
chosen on the training loss only (with the decaying schedule, normally the last epoch), so the validation
part chooses nothing but the threshold, and the cross-fit measures that threshold on the held-out fold.
``--set train.best_metric=val/auroc`` selects on validation instead.

The child recipe is the parent's with: ``model.weights: run:<parent>``, the site card and root,
``data.test_fraction: 0`` (the cross-fit is the test), ``train.epochs`` (default 3), ``optim.lr`` (default the
parent's × 0.1; linear scaling, when the recipe uses it, applies on top), ``schedule.warmup_epochs: 0``, no
progressive resizing, ``model.freeze`` (default the parent's), and the tricks that re-initialise a model
after its weights load switched off (``bn_gamma``, ``layerscale_gamma``, ``reinit_late``; they are made for
ImageNet weights and would undo the parent's training), no distillation, no pseudo-labels and no
label-fraction settings (every site image is labelled). ``tricks.class_balance`` and the rest stay the
parent's; ``--set KEY=VALUE`` changes anything else.

Resumable: the fold runs live in ``<out>/finetune-<id>/fold<k>/`` (``id``: a digest of the parent, the site
images and the settings); the same command again skips finished folds, continues an interrupted one from
its last checkpoint, and reuses a finished final run.

Example::

    result = finetune_run("runs/kermany_pneumonia/20261201-101406-d20d09", card="kermany-pneumonia",
                          root="../shared/data/kermany224_site")
    print(result.summary())
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import yaml
from torch.utils.data import DataLoader

import medtricks
from medtricks._atomic import atomic_path
from medtricks.console import say
from medtricks.data import assign_splits, folder_id, load_card
from medtricks.data.manifest import image_id, patient_salt
from medtricks.deploy.adapt import ADAPTATION_FILE
from medtricks.deploy.calibrate import SiteSampleError, check_site_overlap
from medtricks.deploy.fit import patient_folds
from medtricks.errors import ConfigError
from medtricks.evaluate.metrics import compute_metrics
from medtricks.evaluate.operating_point import OperatingPoint, probs_at_threshold, select_threshold
from medtricks.evaluate.paired import image_bootstrap_delta, load_predictions
from medtricks.posthoc.export import export_model
from medtricks.posthoc import eval_dataset, load_operating_point
from medtricks.recipe import Recipe, apply_overrides, load_run_recipe, recipe_digest, recipe_from_dict
from medtricks.rundir import MODEL_ARTIFACT_DIR, RunDir
from medtricks.run import run_recipe
from medtricks.tracking import MLFLOW_MODEL_ARTIFACT_DIR, create_store
from medtricks.train import predict, resolve_device
from medtricks.posthoc.load import load_trained

__all__ = ["finetune_run", "FinetuneResult", "finetune_recipe", "patient_folds", "fold_splits", "crossfit_metrics",
           "parse_freeze", "CHECKPOINT_METRIC", "THRESHOLD_METHOD", "RULES"]

RECORD_FORMAT = "medtricks-adaptation/1"  # the format of adapt's model/adaptation.json
#: What chooses a fold's (and the final run's) checkpoint: the training loss, so validation chooses only the threshold.
CHECKPOINT_METRIC = "train/epoch_loss"
#: ``method`` of the final run's model/operating_point.json: the mean of the fold Youden thresholds.
THRESHOLD_METHOD = "crossfit-youden"
#: Decision rules of the cross-fitted report, in the order printed.
RULES = ("stored", "0.5", "youden")
_RULE_NAMES = {"stored": "parent's stored threshold", "0.5": "threshold 0.5",
               "youden": "Youden on each fold's validation part"}
#: Keys the command sets itself: ``--set`` may not change them (use its options).
_FIXED_KEYS = ("data.card", "data.root", "data.synth", "data.test_fraction", "model.weights",
               "experiment.output_dir", "experiment.name")
#: Tricks that (re)initialise a model after its weights load, or need other data: off when fine-tuning a run.
_RESET_TRICKS = {"bn_gamma": {"strategy": "none"}, "layerscale_gamma": {"strategy": "none"},
                 "reinit_late": {"stages": 0}, "distill": {}, "pseudo_label": {}}
_ID_IGNORES = (("tracking",), ("train", "progress"), ("eval",), ("audit",), ("experiment", "output_dir"),
               ("experiment", "name"))
_THRESHOLD_EPS = 1e-6


# ----------------------------------------------------------------------------------- settings
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


def _check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for fixed in _FIXED_KEYS:
            if key == fixed or fixed.startswith(key + ".") or key.startswith(fixed + "."):
                raise ConfigError(f"--set {item!r}: adapt --method finetune sets {fixed} itself (the parent run, "
                                  "--card, --root, --out-dir; the site sample is the test of the cross-fit, so "
                                  "data.test_fraction is 0); change it through the command's options")


def finetune_recipe(parent: Recipe, *, weights: str, card: str, root: str, epochs: int = 3,
                    lr: Optional[float] = None, freeze: Optional[Sequence] = None, overrides: Sequence[str] = (),
                    output_dir: str, name: str, batch_size: Optional[int] = None,
                    device: Optional[str] = None) -> Recipe:
    """The recipe that fine-tunes ``parent``'s model (``weights``: ``run:<parent>``) on ``card`` at ``root``
    (see the module docstring for every key it sets); ``overrides`` (``KEY=VALUE``) come last."""
    _check_overrides(overrides)
    if int(epochs) < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs!r}")
    data = parent.model_dump(mode="json")
    data["model"]["weights"] = weights
    data["data"].update(card=str(card), root=str(root), synth=None, test_fraction=0.0, label_fraction=None,
                        label_count=None, unlabeled=None)
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
    for trick, reset in _RESET_TRICKS.items():
        if trick in data["tricks"]:
            data["tricks"][trick] = dict(reset)
    data["experiment"].update(output_dir=str(output_dir), name=name)
    data["tracking"]["run_name"] = None
    data = apply_overrides(data, list(overrides))
    return recipe_from_dict(data, "adapt --method finetune (the parent's recipe with the fine-tuning settings)")


# ------------------------------------------------------------------------------------- splits
def fold_splits(y: Any, groups: Any, fold_of: np.ndarray, k: int, *, val_fraction: float,
                split_seed: int = 0) -> np.ndarray:
    """``train`` / ``val`` / ``test`` per image for fold ``k``: fold ``k`` is the test; ``val_fraction`` of the
    other folds' images (whole patients, stratified) is the validation part, carved by
    :func:`medtricks.data.assign_splits` like a run carves its own validation split."""
    y, groups = np.asarray(y).astype(str), np.asarray(groups).astype(str)
    out = np.full(len(y), "test", dtype=object)
    pool = np.flatnonzero(fold_of != k)
    out[pool] = assign_splits(y[pool], groups[pool], seed=split_seed, val_fraction=val_fraction, test_fraction=0.0)
    return out.astype(str)


def _check_folds(y: np.ndarray, splits: list[np.ndarray], classes: list[str], batch_size: int) -> None:
    """Every fold's train, val and test part holds every class; the training parts hold a full batch."""
    for k, split in enumerate(splits):
        for part in ("train", "val", "test"):
            have = set(np.unique(y[split == part]).tolist())
            lacking = [classes[c] for c in range(len(classes)) if c not in have]
            if lacking:
                raise SiteSampleError(
                    f"cross-fit fold {k + 1} of {len(splits)}: its {part} part holds no image of class(es) "
                    f"{lacking} ({int((split == part).sum())} images): too few patients of a class for this many "
                    "folds and this validation share; use fewer --folds, or --set data.val_fraction=0.25, or label "
                    "more site images")
        n_train = int((split == "train").sum())
        if n_train < batch_size:
            raise ConfigError(f"cross-fit fold {k + 1}: {n_train} training images, fewer than train.batch_size="
                              f"{batch_size}; lower it (--batch-size N)")


def _duplicate_bytes(manifest: pd.DataFrame) -> int:
    """Identical images (same bytes) filed under two patients: runs refuse them in two splits."""
    if "content_hash" not in manifest.columns or manifest["content_hash"].isna().any():
        return 0
    per = manifest.groupby("content_hash")["patient"].nunique()
    return int((per > 1).sum())


# ------------------------------------------------------------------------------------ metrics
def _interval(result, key: str) -> Optional[list[float]]:
    bounds = result.ci.get(key)
    if not bounds or not all(math.isfinite(b) for b in bounds):
        return None
    return [float(bounds[0]), float(bounds[1])]


def _entry(result, key: str) -> dict[str, Any]:
    value = result.values.get(key, math.nan)
    return {"value": float(value) if math.isfinite(value) else None, "ci": _interval(result, key)}


def _decide(probs: np.ndarray, thresholds: np.ndarray, positive_index: int) -> np.ndarray:
    """Probabilities whose argmax is ``probs[:, positive] >= threshold`` (one threshold per image)."""
    out = np.empty_like(probs, dtype=np.float64)
    for t in np.unique(thresholds):
        rows = thresholds == t
        out[rows] = probs_at_threshold(probs[rows], float(t), positive_index)
    return out


def _clamp(threshold: float) -> float:
    return float(min(max(float(threshold), _THRESHOLD_EPS), 1.0 - _THRESHOLD_EPS))


def crossfit_metrics(y: Any, probs: Any, parent_probs: Any, fold_of: Any, *, fold_thresholds: Sequence[float],
                     parent_fold_thresholds: Sequence[float], stored_threshold: float, classes: Sequence[str],
                     positive_index: int = 1, n_bootstrap: int = 1000, ci: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """The cross-fitted report on plain arrays: ``probs`` (out-of-fold, fine-tuned) and ``parent_probs``
    (out-of-the-box) on the same images; ``fold_of``: each image's fold; ``fold_thresholds[k]`` /
    ``parent_fold_thresholds[k]``: the Youden threshold of fold ``k``'s model / of the parent, chosen on fold
    ``k``'s validation part. Both models are bootstrapped on the same resamples (same ``seed``)."""
    y = np.asarray(y).astype(int)
    fold_of = np.asarray(fold_of).astype(int)
    positive = list(classes)[positive_index]
    out: dict[str, Any] = {"n_images": int(len(y)), "n_bootstrap": int(n_bootstrap), "ci_level": float(ci),
                           "bootstrap": "images (percentile)", "seed": int(seed), "positive_class": positive,
                           "models": {}}
    for name, p, per_fold in (("finetuned", probs, fold_thresholds), ("parent", parent_probs, parent_fold_thresholds)):
        p = np.asarray(p, dtype=np.float64)
        base = compute_metrics(y, p, list(classes), n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        entry: dict[str, Any] = {"auroc": _entry(base, "auroc"), "ece": _entry(base, "ece"), "rules": {}}
        per_image = np.asarray([_clamp(per_fold[k]) for k in fold_of])
        for rule, thresholds in (("stored", np.full(len(y), _clamp(stored_threshold))), ("0.5", np.full(len(y), 0.5)),
                                 ("youden", per_image)):
            decided = compute_metrics(y, _decide(p, thresholds, positive_index), list(classes),
                                      n_bootstrap=n_bootstrap, ci=ci, seed=seed)
            entry["rules"][rule] = {
                "threshold": float(thresholds[0]) if rule != "youden" else [float(t) for t in per_fold],
                "accuracy": _entry(decided, "accuracy"),
                "sensitivity": _entry(decided, f"sensitivity/{positive}"),
                "specificity": _entry(decided, f"specificity/{positive}")}
        out["models"][name] = entry
    delta = image_bootstrap_delta(y, [np.asarray(probs, dtype=np.float64)],
                                  [np.asarray(parent_probs, dtype=np.float64)], "auroc",
                                  n_bootstrap=max(int(n_bootstrap), 1), ci=ci, seed=seed)
    low, high = delta.get("ci_low"), delta.get("ci_high")
    finite = low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
    out["delta_auroc"] = {"value": float(delta["delta"]), "ci": [float(low), float(high)] if finite else None,
                          "p_value": float(delta["p_value"]) if delta.get("p_value") is not None else None,
                          "decided": bool(finite and (low > 0 or high < 0)),
                          "what": "fine-tuned (cross-fitted) minus out-of-the-box, paired image bootstrap"}
    per_fold = []
    for k in range(int(fold_of.max()) + 1):
        rows = fold_of == k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a fold with one class: AUROC nan, said as null
            ft = compute_metrics(y[rows], np.asarray(probs)[rows], list(classes), n_bootstrap=0).values["auroc"]
            pa = compute_metrics(y[rows], np.asarray(parent_probs)[rows], list(classes), n_bootstrap=0).values["auroc"]
        per_fold.append({"fold": k + 1, "n_images": int(rows.sum()),
                         "auroc_finetuned": float(ft) if math.isfinite(ft) else None,
                         "auroc_parent": float(pa) if math.isfinite(pa) else None})
    out["per_fold"] = per_fold
    return out


def _cell(entry: Optional[dict]) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_crossfit(metrics: dict[str, Any]) -> str:
    """The cross-fitted report as a text table: out-of-the-box vs fine-tuned at every decision rule."""
    models = (("out-of-the-box", "parent"), ("fine-tuned", "finetuned"))
    head = ("rule", "model", "AUROC", "accuracy", "sensitivity", "specificity")
    rows = [("any threshold" if i == 0 else "", label, _cell(metrics["models"][key]["auroc"]), "", "", "")
            for i, (label, key) in enumerate(models)]
    for rule in RULES:
        for i, (label, key) in enumerate(models):
            r = metrics["models"][key]["rules"][rule]
            name = _RULE_NAMES[rule] + (f" {r['threshold']:.4f}" if rule == "stored" else "")
            label += " *" if rule == "youden" and key == "parent" else ""
            rows.append((name if i == 0 else "", label, "", _cell(r["accuracy"]), _cell(r["sensitivity"]),
                         _cell(r["specificity"])))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip(),
             "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("* the parent's threshold re-chosen (Youden) on the same validation parts: a threshold recalibration "
                 "without fine-tuning")
    d = metrics["delta_auroc"]
    if d["ci"]:
        verdict = ("the interval excludes 0" if d["decided"] else
                   "the interval includes 0: this sample cannot decide whether fine-tuning changes AUROC")
        lines.append(f"Δ AUROC fine-tuned − out-of-the-box: {d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                     f" (paired image bootstrap, p = {d['p_value']:.3f}); {verdict}")
    else:
        lines.append(f"Δ AUROC fine-tuned − out-of-the-box: {d['value']:+.3f} (no interval)")
    lines.append(f"intervals: {metrics['ci_level']:.0%} percentile bootstrap over images, {metrics['n_bootstrap']} "
                 f"resamples (seed {metrics['seed']}), both models on the same resamples; they hold the fold models "
                 "fixed (the spread of training on other patients is not in them); the pooled AUROC pools "
                 "the scores of the fold models")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- fold runs
def _rel_paths(manifest: pd.DataFrame, root: Path) -> list[str]:
    rel = []
    for p in manifest["path"]:
        try:
            rel.append(Path(p).relative_to(root).as_posix())
        except ValueError:
            rel.append(Path(p).resolve().relative_to(root).as_posix())
    return rel


def _write_fold_data(folder: Path, k: int, site_card, rel: list[str], labels: Sequence[str], patients: Sequence[str],
                     split: np.ndarray) -> Path:
    """Fold ``k``'s card: the site images (paths relative to the site root, their class and hashed patient)
    with the fold's train / val / test declared per image. Written to the cross-fit folder (never logged)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / f"fold{k + 1}.csv"
    frame = pd.DataFrame({"path": rel, "label": list(labels), "patient": list(patients), "split": list(split)})
    with atomic_path(table) as tmp:
        frame.to_csv(tmp, index=False)
    norm = site_card.normalization
    # One card name for every fold: the fold runs' hashed patients (salted with the card name) compare across folds.
    card = {"name": f"{site_card.name}-finetune",
            "description": f"Fold {k + 1} of a medtricks finetune cross-fit on a site sample of card {site_card.name}: "
                           "the images, their class and hashed patient, and the fold's split per image.",
            "source": "generated", "license": site_card.license, "citation": site_card.citation,
            "task": site_card.task, "classes": list(site_card.classes),
            "layout": {"kind": "csv", "tables": [{"file": str(table.resolve())}], "path_template": "{path}",
                       "label_column": "label", "split_column": "split"},
            "patient": {"column": "patient"}, "image_size": int(site_card.image_size),
            "normalization": {"mean": [float(v) for v in norm.mean], "std": [float(v) for v in norm.std]},
            "allow_conflicting_duplicates": bool(site_card.allow_conflicting_duplicates)}
    path = folder / f"fold{k + 1}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def _finished_fold(folder: Path) -> Optional[RunDir]:
    """The fold's finished run with its saved predictions, if any."""
    run = RunDir.newest_finished(folder)
    if run is None or not all(run.predictions(s).is_file() for s in ("val", "test")) or not run.split_manifest.is_file():
        return None
    return run


def _fold_predictions(run: RunDir, k: int, expected_test: list[str], expected_val: set[str],
                      y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(test probs, val labels, val probs)`` of a fold run, checked image by image against the cross-fit's
    fold (the run's split manifest: salted image ids in manifest order)."""
    rows = pd.read_csv(run.split_manifest, dtype=str, keep_default_na=False)
    test_ids = rows.loc[rows["split"] == "test", "image_id"].tolist()
    val_ids = set(rows.loc[rows["split"] == "val", "image_id"])
    y_t, p_t = load_predictions(run.predictions("test"))
    y_v, p_v = load_predictions(run.predictions("val"))
    if test_ids != expected_test or val_ids != expected_val or not np.array_equal(y_t.astype(int), y_test):
        raise ConfigError(f"cross-fit fold {k + 1}: run {run.path} holds other images than this fold (the site data "
                          f"or the salt changed?); delete {run.path.parent.parent} and run the command again")
    return p_t, y_v, p_v


def _fold_recipe(common: dict, *, card_path: Path, crossfit_dir: Path, k: int) -> Recipe:
    data = json.loads(json.dumps(common))
    data["data"]["card"] = str(card_path)
    data["experiment"].update(output_dir=str(crossfit_dir), name=f"fold{k + 1}")
    data["tracking"] = {"backend": "none"}  # the cross-fit's runs stay in the cross-fit folder's local run store
    data["eval"].update(plots=False, n_bootstrap=0)  # pooled with intervals by the cross-fit, not per fold
    data["audit"].update(enabled=False, shortcut=False)
    data["train"]["progress"] = False  # one bar over the folds instead
    return recipe_from_dict(data, f"adapt --method finetune, cross-fit fold {k + 1}")


def _keep_parent_files(files: RunDir, run_id: Optional[str], out: Path) -> Path:
    """A parent found by its run id in a run store, with no folder on this machine: its recipe and model (the
    temporary copy :func:`~medtricks.posthoc.load.load_trained` made) kept in ``<out>/finetune-parents/<run id>/``, so
    every fold run and a rerun start from the same files (``state.json`` keeps the run id for the lineage)."""
    keep = RunDir(out / "finetune-parents" / str(run_id))
    if not (keep.model_state.is_file() and keep.recipe.is_file()):
        keep.path.mkdir(parents=True, exist_ok=True)
        shutil.copytree(files.model_dir, keep.model_dir, dirs_exist_ok=True)
        shutil.copy2(files.recipe, keep.recipe)
    keep.write_state(status="finished", run_id=run_id, note="the recipe and model of a run found by its id")
    return keep.path


# ------------------------------------------------------------------------------- final run
def _same_recipe(run: RunDir, recipe: Recipe) -> bool:
    try:
        return recipe_digest(load_run_recipe(run.recipe)) == recipe_digest(recipe)
    except Exception:  # noqa: BLE001 - an unreadable recipe is another run's
        return False


def _same_images(run: RunDir, ids: set[str]) -> bool:
    try:
        return set(pd.read_csv(run.split_manifest, dtype=str)["image_id"]) == ids
    except (OSError, KeyError, ValueError):
        return False


def _find_final(folder: Path, recipe: Recipe, crossfit_id: str, ids: set[str]) -> tuple[Optional[RunDir], Optional[str]]:
    """A final run of this cross-fit in the experiment folder: ``done`` (finished, record written), ``finished``
    (trained on these images with this recipe, record missing: the command stopped before writing it),
    ``resume`` (interrupted, same recipe) or ``(None, None)``. A run completed for another cross-fit is never
    reused (its record and threshold are that cross-fit's)."""
    if not folder.is_dir():
        return None, None
    runs = [RunDir(p) for p in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)]
    for run in runs:
        state = run.read_state()
        if state.get("finetune_id") == crossfit_id and state.get("finetune_status") == "complete" and \
                run.is_finished() and (run.model_dir / ADAPTATION_FILE).is_file():
            return run, "done"
    for run in runs:
        if run.read_state().get("finetune_status") == "complete" or not run.recipe.is_file():
            continue
        if _same_recipe(run, recipe):
            if run.is_finished() and run.model_state.is_file() and _same_images(run, ids):
                return run, "finished"
            if not run.is_finished() and run.last_checkpoint.is_file():
                return run, "resume"
    return None, None


def _flat_metrics(metrics: dict[str, Any], prefix: str = "finetune/crossfit/") -> dict[str, float]:
    flat: dict[str, float] = {}

    def put(key: str, entry: Optional[dict]) -> None:
        if entry and entry.get("value") is not None:
            flat[f"{prefix}{key}"] = entry["value"]
            if entry.get("ci"):
                flat[f"{prefix}{key}_ci_low"], flat[f"{prefix}{key}_ci_high"] = entry["ci"]

    for model, entry in metrics["models"].items():
        put(f"{model}/auroc", entry["auroc"])
        for rule, values in entry["rules"].items():
            for key in ("accuracy", "sensitivity", "specificity"):
                put(f"{model}/{rule}/{key}", values[key])
    put("delta_auroc", metrics["delta_auroc"])
    return flat


def _refresh_mlflow_model(run: RunDir, store) -> Optional[str]:
    """The MLflow pyfunc model records the operating point: made again after it changed."""
    if not (store.logs_models and run.mlflow_model.is_dir()):
        return None
    try:
        shutil.rmtree(run.mlflow_model, ignore_errors=True)
        export_model(str(run.path), "mlflow", run.mlflow_model)
        store.log_model(run.mlflow_model, MLFLOW_MODEL_ARTIFACT_DIR)
    except Exception as err:  # noqa: BLE001 - the run folder holds the model and its threshold; only the flavour lags
        return (f"the MLflow model of {run.path} was not made again with the cross-fitted threshold "
                f"({type(err).__name__}: {str(err)[:300]}); make it with `medtricks export {run.path} --format mlflow`")
    return None


# ------------------------------------------------------------------------------------- result
@dataclass
class FinetuneResult:
    """What :func:`finetune_run` returns: the final run, the cross-fit folder and the adaptation record."""

    run_dir: Path
    run_id: Optional[str]
    crossfit_dir: Path
    record: dict[str, Any]
    trained_folds: int = 0  # fold runs trained or continued in this call (the others were finished already)
    final_reused: bool = False  # the final run was finished already (not trained again)
    logged_to: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["crossfit"]["metrics"]

    def summary(self) -> str:
        r = self.record
        cf, sample, op = r["crossfit"], r["sample"], r["operating_point"]
        lines = [f"adapt --method finetune: run {r['parent_run_id'] or r['parent_run_dir']} fine-tuned on site sample "
                 f"{r['site_root']} (card {sample['card']}: {sample['n_images']} images, {sample['n_patients']} patients, "
                 f"{sample['per_class']})",
                 f"cross-fitted by patient in {cf['folds']} folds (fold seed {cf['seed']}; training seed "
                 f"{r['settings']['experiment_seed']}): every image scored by a model fine-tuned without its patient; "
                 f"{self.trained_folds} fold run(s) trained in this call, the others were finished already", "",
                 format_crossfit(cf["metrics"]), "",
                 f"final run: {self.run_dir}" + (f" (run id {self.run_id})" if self.run_id else "")
                 + (" — finished already, reused" if self.final_reused else ""),
                 f"  fine-tuned on the {sample['n_images']} site images less its own validation part "
                 f"({r['settings']['val_fraction']:.0%} of the patients, as in every fold); checkpoint by "
                 f"{r['settings']['checkpoint']}",
                 f"  stored operating point {op['threshold']:.4f} = the mean of the fold Youden thresholds "
                 f"{', '.join(f'{t:.4f}' for t in op['fold_thresholds'])}",
                 f"  cross-fit folder: {self.crossfit_dir}"]
        if self.logged_to:
            lines.append(f"  logged to {self.logged_to}")
        lines += [f"note: {w}" for w in self.warnings]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- the command
def finetune_run(ref: str, *, card: str, root: str, folds: int = 5, epochs: int = 3, lr: Optional[float] = None,
                 freeze: Optional[Sequence] = None, overrides: Sequence[str] = (), seed: int = 0,
                 n_bootstrap: int = 1000, ci: float = 0.95, batch_size: Optional[int] = None,
                 output_dir: Optional[str | Path] = None, tracking_uri: Optional[str] = None,
                 runs_dir: Optional[str | Path] = None, log: bool = True, device: str = "auto",
                 progress: bool = True) -> FinetuneResult:
    """Fine-tune the trained binary run ``ref`` on the labelled site images of ``root`` (as ``card`` describes
    them), cross-fitted by patient in ``folds`` folds, then once on every site image (see the module docstring).

    ``epochs``, ``lr`` (default the parent's ``optim.lr`` × 0.1), ``freeze`` (``model.freeze``; default the
    parent's, ``[]``: nothing), ``batch_size`` and ``overrides`` (``KEY=VALUE``) set the fine-tuning; ``seed``
    draws the folds and the bootstrap; ``output_dir`` (default: where the parent run lives) holds the
    cross-fit folder and the final run; ``log=False`` tracks the final run in its folder only.
    """
    warn: list[str] = []
    _check_overrides(overrides)  # before anything is loaded
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    parent_name = trained.run_id or str(trained.run_dir)
    site_card = load_card(card)
    if list(site_card.classes) != list(trained.classes):
        raise ConfigError(f"--card {card!r} has classes {list(site_card.classes)}, but run {parent_name} was trained on "
                          f"{list(trained.classes)}: a run: start keeps the parent's head only for the same classes "
                          "in the same order, so the site model would not be a fine-tuned version of the run; use a "
                          "card with the run's classes")
    if len(trained.classes) != 2:
        raise ConfigError(f"--method finetune reports decisions at thresholds and applies to binary models; run "
                          f"{parent_name} has {len(trained.classes)} classes {trained.classes}")
    parent = RunDir(trained.run_dir)
    local_parent = parent.state_file.is_file()  # else a temporary copy of a run found by id in a run store
    out = Path(output_dir) if output_dir is not None else (
        parent.output_dir if local_parent else Path(trained.recipe.experiment.output_dir))
    out = out.expanduser().resolve()
    start = parent.path.resolve() if local_parent else _keep_parent_files(parent, trained.run_id, out)
    weights = f"run:{start}"
    site_root = Path(root).expanduser().resolve()

    # ---- the site sample, scored out of the box (every check before any training)
    dataset, _ = eval_dataset(trained, card, root, split="all", progress=progress)
    manifest = dataset.manifest.reset_index(drop=True)
    warn += check_site_overlap(trained, manifest, root, tracking_uri, parent_name,
                               why="its out-of-the-box scores there are not a site measurement. Remove those images "
                                   "(their patients) from the sample")
    duplicates = _duplicate_bytes(manifest)
    if duplicates:
        raise SiteSampleError(f"{duplicates} image(s) of the site sample are filed (identical bytes) under two "
                              "patients; a run refuses identical images in two splits: remove the copies")
    y = manifest["target"].to_numpy().astype(int)
    groups = manifest["patient"].astype(str).to_numpy()
    labels = manifest["label"].astype(str).tolist()
    per_class = {c: int((y == i).sum()) for i, c in enumerate(trained.classes)}
    patients_per_class = {c: int(len(np.unique(groups[y == i]))) for i, c in enumerate(trained.classes)}
    if min(patients_per_class.values()) < int(folds):
        raise SiteSampleError(f"the site sample has {patients_per_class} patients per class; cross-fitting in {folds} "
                              "folds needs at least that many patients of every class (use fewer --folds)")

    # ---- settings, folds and the cross-fit's id
    common_recipe = finetune_recipe(trained.recipe, weights=weights, card=card, root=str(site_root), epochs=epochs,
                                    lr=lr, freeze=freeze, overrides=overrides, output_dir=str(out),
                                    name=f"{trained.recipe.experiment.name}-finetune", batch_size=batch_size,
                                    device=None if device == "auto" else device)
    fold_of = patient_folds(y, groups, folds, seed)
    val_fraction, split_seed = common_recipe.data.val_fraction, common_recipe.data.split_seed
    splits = [fold_splits(labels, groups, fold_of, k, val_fraction=val_fraction, split_seed=split_seed)
              for k in range(int(folds))]
    _check_folds(y, splits, list(trained.classes), common_recipe.train.batch_size)
    salt = patient_salt()
    rel = _rel_paths(manifest, site_root)
    ids = [image_id(r, salt) for r in rel]
    h = hashlib.sha256()
    for line in sorted(f"{i}\t{lab}\t{p}\t{c}" for i, lab, p, c in
                       zip(ids, labels, groups, manifest.get("content_hash", pd.Series([""] * len(ids))))):
        h.update(line.encode() + b"\n")
    image_set = h.hexdigest()
    crossfit_id = recipe_digest(common_recipe, ignore=_ID_IGNORES, parent=trained.run_id or weights, site=folder_id(root),
                                images=image_set, folds=int(folds), seed=int(seed), card=site_card.name)
    crossfit_dir = out / f"finetune-{crossfit_id}"

    op = load_operating_point(trained.run_dir)
    positive = op.positive_index if op is not None else 1
    stored = float(op.threshold) if op is not None else 0.5
    if op is None:
        warn.append(f"run {parent_name} stored no operating point: its 'stored threshold' rule is 0.5")
    loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=trained.recipe.data.num_workers)
    y_seen, parent_probs, _ = predict(trained.model, loader, device=dev, progress=progress, desc="out of the box")
    if not np.array_equal(np.asarray(y_seen).astype(int), y):
        raise ConfigError("the site dataset's labels changed order while scoring it (a bug): nothing was trained")
    trained.model = None  # the fold runs build their own from the parent's files

    # ---- the cross-fit
    from tqdm.auto import tqdm

    common = common_recipe.model_dump(mode="json")
    probs = np.full((len(y), 2), np.nan)
    fold_thresholds, parent_thresholds, fold_runs = [], [], []
    trained_folds = 0
    bar = tqdm(range(int(folds)), desc="finetune cross-fit", unit="fold", disable=not progress)
    for k in bar:
        run = _finished_fold(crossfit_dir / f"fold{k + 1}")
        if run is None:
            card_path = _write_fold_data(crossfit_dir / "data", k, site_card, rel, labels, groups, splits[k])
            result = run_recipe(_fold_recipe(common, card_path=card_path, crossfit_dir=crossfit_dir, k=k),
                                resume="auto", quiet=True)
            run, trained_folds = RunDir(result.run_dir), trained_folds + 1
        test = np.flatnonzero(splits[k] == "test")
        val = np.flatnonzero(splits[k] == "val")
        p_test, y_val, p_val = _fold_predictions(run, k, [ids[i] for i in test], {ids[i] for i in val}, y[test])
        probs[test] = p_test
        fold_thresholds.append(_clamp(select_threshold(y_val, p_val, method="youden", positive_index=positive).threshold))
        parent_thresholds.append(_clamp(select_threshold(y[val], parent_probs[val], method="youden",
                                                         positive_index=positive).threshold))
        fold_runs.append({"fold": k + 1, "run_dir": str(run.path), "n_train": int((splits[k] == "train").sum()),
                          "n_val": int(len(val)), "n_test": int(len(test)),
                          "n_test_patients": int(len(np.unique(groups[test]))),
                          "youden_threshold": fold_thresholds[-1], "parent_youden_threshold": parent_thresholds[-1]})
        bar.set_postfix(fold=k + 1, trained=trained_folds)
    bar.close()
    if np.isnan(probs).any():
        raise ConfigError("the cross-fit left images without an out-of-fold prediction (a bug)")
    metrics = crossfit_metrics(y, probs, parent_probs, fold_of, fold_thresholds=fold_thresholds,
                               parent_fold_thresholds=parent_thresholds, stored_threshold=stored,
                               classes=list(trained.classes), positive_index=positive, n_bootstrap=n_bootstrap,
                               ci=ci, seed=seed)
    for row, extra in zip(fold_runs, metrics["per_fold"]):
        row.update(auroc_finetuned=extra["auroc_finetuned"], auroc_parent=extra["auroc_parent"])

    # ---- the final run on every site image
    final_data = json.loads(json.dumps(common))
    parent_tracking = trained.recipe.tracking
    if log:
        final_data["tracking"].update(experiment=parent_tracking.experiment or trained.recipe.experiment.name)
        if tracking_uri is not None and parent_tracking.backend == "mlflow":
            final_data["tracking"]["uri"] = tracking_uri
    else:
        final_data["tracking"] = {"backend": "none"}
    final_data["train"]["progress"] = bool(progress and final_data["train"]["progress"])
    final_recipe = recipe_from_dict(final_data, "adapt --method finetune, the final run")
    threshold = float(np.mean(fold_thresholds))
    found, how = _find_final(RunDir.experiment_dir(out, final_recipe.experiment.name), final_recipe, crossfit_id,
                             set(ids))
    store = create_store(final_recipe.tracking.backend, final_recipe.tracking.uri,
                         root=final_recipe.experiment.output_dir)
    if how in (None, "resume"):
        if progress:
            say(f"{'continuing' if how else 'training'} the final run: {final_recipe.experiment.name} on the "
                f"{len(y)} site images, {final_recipe.train.epochs} epoch(s)")
        parent_id = trained.run_id if trained.run_id and store.run_exists(trained.run_id) else None
        tags = {"medtricks.adapt_method": "finetune", "medtricks.parent_run": str(trained.run_id),
                "medtricks.finetune_id": crossfit_id}
        result = run_recipe(final_recipe, resume=str(found.path) if how == "resume" else None, tracker=store,
                            parent_run_id=parent_id, extra_tags=tags, quiet=True)
        final, final_id = RunDir(result.run_dir), result.run_id
    else:
        final, final_id = found, found.read_state().get("run_id")

    record = {"format": RECORD_FORMAT, "method": "finetune", "parent_run_id": trained.run_id,
              "parent_run_dir": str(parent.path.resolve()) if local_parent else None,
              "parent_weights": weights,
              "site_root": folder_id(root), "image_set": image_set,
              "sample": {"card": site_card.name, "n_images": int(len(y)), "n_patients": int(len(np.unique(groups))),
                         "per_class": per_class, "patients_per_class": patients_per_class},
              "settings": {"epochs": int(common_recipe.train.epochs), "lr": float(common_recipe.optim.lr),
                           "freeze": common_recipe.model.freeze, "batch_size": int(common_recipe.train.batch_size),
                           "warmup_epochs": 0.0, "val_fraction": float(val_fraction), "split_seed": int(split_seed),
                           "experiment_seed": int(common_recipe.experiment.seed),
                           "class_balance": str(getattr(common_recipe.tricks, "class_balance", "")),
                           "overrides": list(overrides), "reset_tricks": sorted(_RESET_TRICKS),
                           "checkpoint": f"{CHECKPOINT_METRIC} (min): chosen on the training loss, so the "
                                         "validation part chooses only the threshold"},
              "crossfit": {"id": crossfit_id, "folder": str(crossfit_dir), "folds": int(folds), "seed": int(seed),
                           "grouped_by": "patient (hashed), stratified by class", "fold_runs": fold_runs,
                           "metrics": metrics},
              "operating_point": {"threshold": threshold, "method": THRESHOLD_METHOD,
                                  "how": "the mean of the fold Youden thresholds, each chosen on the validation "
                                         "part of a fold's training patients",
                                  "fold_thresholds": list(fold_thresholds), "parent_stored_threshold": stored},
              "medtricks_version": medtricks.__version__}
    final_result = FinetuneResult(run_dir=final.path, run_id=final_id, crossfit_dir=crossfit_dir, record=record,
                                  trained_folds=trained_folds, final_reused=how == "done", warnings=warn)
    if how == "done":
        return final_result

    # ---- the final run's operating point and adaptation record (idempotent)
    own = load_operating_point(final.path)  # the run's own, chosen on its validation part (unless already replaced)
    record["operating_point"]["final_run_val_threshold"] = (
        float(own.threshold) if own is not None and own.method != THRESHOLD_METHOD else None)
    point = OperatingPoint(threshold=threshold, method=THRESHOLD_METHOD, positive_index=positive,
                           train_priors=list(own.train_priors) if own is not None else [])
    final.model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(final.operating_point) as tmp:
        point.to_json(tmp)
    record_path = final.model_dir / ADAPTATION_FILE
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    if final_id:
        store.start(experiment=final_recipe.tracking.experiment or final_recipe.experiment.name, run_name="",
                    tags={"run_dir": str(final.path)}, resume_run_id=final_id)
        try:
            store.log_params({"adapt.method": "finetune", "adapt.parent_run": str(trained.run_id),
                              "adapt.site_root": folder_id(root), "adapt.folds": int(folds),
                              "adapt.crossfit_id": crossfit_id, "adapt.n_site_images": int(len(y)),
                              "adapt.threshold": THRESHOLD_METHOD})
            store.log_metrics({**_flat_metrics(metrics), "finetune/threshold": threshold}, step=0)
            store.log_artifact(final.operating_point, MODEL_ARTIFACT_DIR)
            store.log_artifact(record_path, MODEL_ARTIFACT_DIR)
            problem = _refresh_mlflow_model(final, store)
            if problem:
                warn.append(problem)
        finally:  # the run itself trained and finished: a failure here loses only these extras
            store.end()
        final_result.logged_to = store.describe()
    final.write_state(finetune_id=crossfit_id, finetune_status="complete", adapt_method="finetune",
                      parent_run_id=trained.run_id, parent_run_dir=record["parent_run_dir"])
    return final_result
