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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import medtricks
from medtricks._atomic import atomic_path
from medtricks.console import say
from medtricks.data import folder_id, load_card
from medtricks.data.manifest import image_id, patient_salt
from medtricks.deploy.adapt import ADAPTATION_FILE
from medtricks.deploy.calibrate import SiteSampleError, check_site_overlap
from medtricks.deploy.finetune_folds import (
    check_folds,
    duplicate_bytes,
    find_final,
    finished_fold,
    fold_predictions,
    fold_splits,
    keep_parent_files,
    rel_paths,
    write_fold_data,
)
from medtricks.deploy.finetune_recipe import (
    CHECKPOINT_METRIC,
    RESET_TRICKS,
    check_overrides,
    finetune_recipe,
    fold_recipe,
    parse_freeze,
)
from medtricks.deploy.finetune_report import RULES, FinetuneResult, clamp_threshold, crossfit_metrics, flat_metrics
from medtricks.deploy.fit import patient_folds
from medtricks.errors import ConfigError
from medtricks.evaluate.operating_point import OperatingPoint, select_threshold
from medtricks.posthoc.decision import load_operating_point
from medtricks.posthoc.evaluation import eval_dataset
from medtricks.posthoc.export import export_model
from medtricks.posthoc.load import load_trained
from medtricks.recipe import Recipe, recipe_digest, recipe_from_dict
from medtricks.run import run_recipe
from medtricks.rundir import MODEL_ARTIFACT_DIR, RunDir
from medtricks.tracking import MLFLOW_MODEL_ARTIFACT_DIR, create_store
from medtricks.train import predict, resolve_device

__all__ = [
    "finetune_run",
    "FinetuneResult",
    "finetune_recipe",
    "patient_folds",
    "fold_splits",
    "crossfit_metrics",
    "parse_freeze",
    "CHECKPOINT_METRIC",
    "THRESHOLD_METHOD",
    "RULES",
]

RECORD_FORMAT = "medtricks-adaptation/1"  # the format of adapt's model/adaptation.json
#: ``method`` of the final run's model/operating_point.json: the mean of the fold Youden thresholds.
THRESHOLD_METHOD = "crossfit-youden"
_ID_IGNORES = (
    ("tracking",),
    ("train", "progress"),
    ("eval",),
    ("audit",),
    ("experiment", "output_dir"),
    ("experiment", "name"),
)


# ------------------------------------------------------------------------- what the phases share
@dataclass(frozen=True)
class _Options:
    """:func:`finetune_run`'s fine-tuning and cross-fit options, handed to its phases unchanged."""

    folds: int
    epochs: int
    lr: Optional[float]
    freeze: Optional[Sequence]
    overrides: Sequence[str]
    seed: int
    n_bootstrap: int
    ci: float
    batch_size: Optional[int]
    device: str
    progress: bool


@dataclass(frozen=True)
class _Parent:
    """The parent run: loaded, and the files every fold and the final run start from."""

    trained: Any  # TrainedModel (its model is dropped once the site is scored)
    name: str  # run id, else folder
    folder: RunDir
    local: bool  # False: a temporary copy of a run found by id in a run store
    weights: str  # run:<folder the fine-tuning starts from>
    out: Path  # holds the cross-fit folder and the final run


@dataclass(frozen=True)
class _SiteSample:
    """The labelled site images in manifest order, as the cross-fit reads them."""

    card: Any  # the site's DataCard
    root: Path  # resolved
    dataset: Any
    manifest: pd.DataFrame
    y: np.ndarray
    groups: np.ndarray  # hashed patients
    labels: list[str]
    per_class: dict[str, int]
    patients_per_class: dict[str, int]


@dataclass(frozen=True)
class _Plan:
    """The fine-tuning recipe, the folds and where the cross-fit lives (its id digests all of them)."""

    recipe: Recipe
    fold_of: np.ndarray
    splits: list[np.ndarray]
    rel: list[str]  # image paths relative to the site root
    ids: list[str]  # salted image ids
    image_set: str
    id: str
    folder: Path


@dataclass(frozen=True)
class _CrossFit:
    """The cross-fit's out-of-fold predictions, thresholds and report."""

    probs: np.ndarray
    fold_thresholds: list[float]
    parent_thresholds: list[float]
    fold_runs: list[dict[str, Any]]
    trained_folds: int
    metrics: dict[str, Any]


# ----------------------------------------------------------------------------------- the phases
def _parent(trained, site_card, card, output_dir: Optional[str | Path]) -> _Parent:
    """The loaded parent, checked against the site's card, and the folder the fine-tuning starts from."""
    parent_name = trained.run_id or str(trained.run_dir)
    if list(site_card.classes) != list(trained.classes):
        raise ConfigError(
            f"--card {card!r} has classes {list(site_card.classes)}, but run {parent_name} was trained on "
            f"{list(trained.classes)}: a run: start keeps the parent's head only for the same classes "
            "in the same order, so the site model would not be a fine-tuned version of the run; use a "
            "card with the run's classes"
        )
    if len(trained.classes) != 2:
        raise ConfigError(
            f"--method finetune reports decisions at thresholds and applies to binary models; run "
            f"{parent_name} has {len(trained.classes)} classes {trained.classes}"
        )
    parent = RunDir(trained.run_dir)
    local_parent = parent.state_file.is_file()  # else a temporary copy of a run found by id in a run store
    out = (
        Path(output_dir)
        if output_dir is not None
        else (parent.output_dir if local_parent else Path(trained.recipe.experiment.output_dir))
    )
    out = out.expanduser().resolve()
    start = parent.path.resolve() if local_parent else keep_parent_files(parent, trained.run_id, out)
    return _Parent(
        trained=trained, name=parent_name, folder=parent, local=local_parent, weights=f"run:{start}", out=out
    )


def _site_sample(
    parent: _Parent, site_card, card, root, *, tracking_uri, opts: _Options, warn: list[str]
) -> _SiteSample:
    """The site sample, checked (overlap with the parent's data, duplicates, patients per class) before any training."""
    trained = parent.trained
    site_root = Path(root).expanduser().resolve()
    dataset, _ = eval_dataset(trained, card, root, split="all", progress=opts.progress)
    manifest = dataset.manifest.reset_index(drop=True)
    warn += check_site_overlap(
        trained,
        manifest,
        root,
        tracking_uri,
        parent.name,
        why="its out-of-the-box scores there are not a site measurement. Remove those images "
        "(their patients) from the sample",
    )
    duplicates = duplicate_bytes(manifest)
    if duplicates:
        raise SiteSampleError(
            f"{duplicates} image(s) of the site sample are filed (identical bytes) under two "
            "patients; a run refuses identical images in two splits: remove the copies"
        )
    y = manifest["target"].to_numpy().astype(int)
    groups = manifest["patient"].astype(str).to_numpy()
    labels = manifest["label"].astype(str).tolist()
    per_class = {c: int((y == i).sum()) for i, c in enumerate(trained.classes)}
    patients_per_class = {c: int(len(np.unique(groups[y == i]))) for i, c in enumerate(trained.classes)}
    if min(patients_per_class.values()) < int(opts.folds):
        raise SiteSampleError(
            f"the site sample has {patients_per_class} patients per class; cross-fitting in "
            f"{opts.folds} folds needs at least that many patients of every class (use fewer --folds)"
        )
    return _SiteSample(
        card=site_card,
        root=site_root,
        dataset=dataset,
        manifest=manifest,
        y=y,
        groups=groups,
        labels=labels,
        per_class=per_class,
        patients_per_class=patients_per_class,
    )


def _plan(parent: _Parent, sample: _SiteSample, card, root, opts: _Options) -> _Plan:
    """The fine-tuning recipe, the patient folds (checked) and the cross-fit's id and folder."""
    trained = parent.trained
    recipe = finetune_recipe(
        trained.recipe,
        weights=parent.weights,
        card=card,
        root=str(sample.root),
        epochs=opts.epochs,
        lr=opts.lr,
        freeze=opts.freeze,
        overrides=opts.overrides,
        output_dir=str(parent.out),
        name=f"{trained.recipe.experiment.name}-finetune",
        batch_size=opts.batch_size,
        device=None if opts.device == "auto" else opts.device,
    )
    y, groups = sample.y, sample.groups
    fold_of = patient_folds(y, groups, opts.folds, opts.seed)
    val_fraction, split_seed = recipe.data.val_fraction, recipe.data.split_seed
    splits = [
        fold_splits(sample.labels, groups, fold_of, k, val_fraction=val_fraction, split_seed=split_seed)
        for k in range(int(opts.folds))
    ]
    check_folds(y, splits, list(trained.classes), recipe.train.batch_size)
    salt = patient_salt()
    rel = rel_paths(sample.manifest, sample.root)
    ids = [image_id(r, salt) for r in rel]
    h = hashlib.sha256()
    for line in sorted(
        f"{i}\t{lab}\t{p}\t{c}"
        for i, lab, p, c in zip(
            ids, sample.labels, groups, sample.manifest.get("content_hash", pd.Series([""] * len(ids)))
        )
    ):
        h.update(line.encode() + b"\n")
    image_set = h.hexdigest()
    crossfit_id = recipe_digest(
        recipe,
        ignore=_ID_IGNORES,
        parent=trained.run_id or parent.weights,
        site=folder_id(root),
        images=image_set,
        folds=int(opts.folds),
        seed=int(opts.seed),
        card=sample.card.name,
    )
    return _Plan(
        recipe=recipe,
        fold_of=fold_of,
        splits=splits,
        rel=rel,
        ids=ids,
        image_set=image_set,
        id=crossfit_id,
        folder=parent.out / f"finetune-{crossfit_id}",
    )


def _cross_fit(
    plan: _Plan,
    sample: _SiteSample,
    parent_probs: np.ndarray,
    *,
    positive: int,
    stored: float,
    classes: list[str],
    opts: _Options,
) -> _CrossFit:
    """Train (or find finished) each fold's run, pool its out-of-fold predictions, and report them."""
    y, groups, ids = sample.y, sample.groups, plan.ids
    common = plan.recipe.model_dump(mode="json")
    probs = np.full((len(y), 2), np.nan)
    fold_thresholds, parent_thresholds, fold_runs = [], [], []
    trained_folds = 0
    bar = tqdm(range(int(opts.folds)), desc="finetune cross-fit", unit="fold", disable=not opts.progress)
    for k in bar:
        run = finished_fold(plan.folder / f"fold{k + 1}")
        if run is None:
            card_path = write_fold_data(
                plan.folder / "data", k, sample.card, plan.rel, sample.labels, groups, plan.splits[k]
            )
            result = run_recipe(
                fold_recipe(common, card_path=card_path, crossfit_dir=plan.folder, k=k), resume="auto", quiet=True
            )
            run, trained_folds = RunDir(result.run_dir), trained_folds + 1
        test = np.flatnonzero(plan.splits[k] == "test")
        val = np.flatnonzero(plan.splits[k] == "val")
        p_test, y_val, p_val = fold_predictions(run, k, [ids[i] for i in test], {ids[i] for i in val}, y[test])
        probs[test] = p_test
        fold_thresholds.append(
            clamp_threshold(select_threshold(y_val, p_val, method="youden", positive_index=positive).threshold)
        )
        parent_thresholds.append(
            clamp_threshold(
                select_threshold(y[val], parent_probs[val], method="youden", positive_index=positive).threshold
            )
        )
        fold_runs.append(
            {
                "fold": k + 1,
                "run_dir": str(run.path),
                "n_train": int((plan.splits[k] == "train").sum()),
                "n_val": int(len(val)),
                "n_test": int(len(test)),
                "n_test_patients": int(len(np.unique(groups[test]))),
                "youden_threshold": fold_thresholds[-1],
                "parent_youden_threshold": parent_thresholds[-1],
            }
        )
        bar.set_postfix(fold=k + 1, trained=trained_folds)
    bar.close()
    if np.isnan(probs).any():
        raise ConfigError("the cross-fit left images without an out-of-fold prediction (a bug)")
    metrics = crossfit_metrics(
        y,
        probs,
        parent_probs,
        plan.fold_of,
        fold_thresholds=fold_thresholds,
        parent_fold_thresholds=parent_thresholds,
        stored_threshold=stored,
        classes=classes,
        positive_index=positive,
        n_bootstrap=opts.n_bootstrap,
        ci=opts.ci,
        seed=opts.seed,
    )
    for row, extra in zip(fold_runs, metrics["per_fold"]):
        row.update(auroc_finetuned=extra["auroc_finetuned"], auroc_parent=extra["auroc_parent"])
    return _CrossFit(
        probs=probs,
        fold_thresholds=fold_thresholds,
        parent_thresholds=parent_thresholds,
        fold_runs=fold_runs,
        trained_folds=trained_folds,
        metrics=metrics,
    )


def _final_recipe(plan: _Plan, trained, *, tracking_uri: Optional[str], log: bool, progress: bool) -> Recipe:
    """The fine-tuning recipe on every site image, tracked as the parent is (``log=False``: not at all)."""
    final_data = json.loads(json.dumps(plan.recipe.model_dump(mode="json")))
    parent_tracking = trained.recipe.tracking
    if log:
        final_data["tracking"].update(experiment=parent_tracking.experiment or trained.recipe.experiment.name)
        if tracking_uri is not None and parent_tracking.backend == "mlflow":
            final_data["tracking"]["uri"] = tracking_uri
    else:
        final_data["tracking"] = {"backend": "none"}
    final_data["train"]["progress"] = bool(progress and final_data["train"]["progress"])
    return recipe_from_dict(final_data, "adapt --method finetune, the final run")


def _record(
    parent: _Parent,
    sample: _SiteSample,
    plan: _Plan,
    crossfit: _CrossFit,
    opts: _Options,
    *,
    root,
    threshold: float,
    stored: float,
) -> dict[str, Any]:
    """The adaptation record (``model/adaptation.json``): the sample, the settings, the cross-fit, the threshold."""
    recipe, y, groups = plan.recipe, sample.y, sample.groups
    return {
        "format": RECORD_FORMAT,
        "method": "finetune",
        "parent_run_id": parent.trained.run_id,
        "parent_run_dir": str(parent.folder.path.resolve()) if parent.local else None,
        "parent_weights": parent.weights,
        "site_root": folder_id(root),
        "image_set": plan.image_set,
        "sample": {
            "card": sample.card.name,
            "n_images": int(len(y)),
            "n_patients": int(len(np.unique(groups))),
            "per_class": sample.per_class,
            "patients_per_class": sample.patients_per_class,
        },
        "settings": {
            "epochs": int(recipe.train.epochs),
            "lr": float(recipe.optim.lr),
            "freeze": recipe.model.freeze,
            "batch_size": int(recipe.train.batch_size),
            "warmup_epochs": 0.0,
            "val_fraction": float(recipe.data.val_fraction),
            "split_seed": int(recipe.data.split_seed),
            "experiment_seed": int(recipe.experiment.seed),
            "class_balance": str(getattr(recipe.tricks, "class_balance", "")),
            "overrides": list(opts.overrides),
            "reset_tricks": sorted(RESET_TRICKS),
            "checkpoint": f"{CHECKPOINT_METRIC} (min): chosen on the training loss, so the "
            "validation part chooses only the threshold",
        },
        "crossfit": {
            "id": plan.id,
            "folder": str(plan.folder),
            "folds": int(opts.folds),
            "seed": int(opts.seed),
            "grouped_by": "patient (hashed), stratified by class",
            "fold_runs": crossfit.fold_runs,
            "metrics": crossfit.metrics,
        },
        "operating_point": {
            "threshold": threshold,
            "method": THRESHOLD_METHOD,
            "how": "the mean of the fold Youden thresholds, each chosen on the validation "
            "part of a fold's training patients",
            "fold_thresholds": list(crossfit.fold_thresholds),
            "parent_stored_threshold": stored,
        },
        "medtricks_version": medtricks.__version__,
    }


def _refresh_mlflow_model(run: RunDir, store) -> Optional[str]:
    """The MLflow pyfunc model records the operating point: made again after it changed."""
    if not (store.logs_models and run.mlflow_model.is_dir()):
        return None
    try:
        shutil.rmtree(run.mlflow_model, ignore_errors=True)
        export_model(str(run.path), "mlflow", run.mlflow_model)
        store.log_model(run.mlflow_model, MLFLOW_MODEL_ARTIFACT_DIR)
    except Exception as err:  # noqa: BLE001 - the run folder holds the model and its threshold; only the flavour lags
        return (
            f"the MLflow model of {run.path} was not made again with the cross-fitted threshold "
            f"({type(err).__name__}: {str(err)[:300]}); make it with `medtricks export {run.path} --format mlflow`"
        )
    return None


def _complete_final(
    final: RunDir, final_id: Optional[str], store, final_recipe: Recipe, result: FinetuneResult, *, positive: int
) -> None:
    """The final run's operating point and adaptation record (``result.record``), written and logged (idempotent)."""
    record, warn = result.record, result.warnings
    threshold, crossfit = record["operating_point"]["threshold"], record["crossfit"]
    own = load_operating_point(final.path)  # the run's own, chosen on its validation part (unless already replaced)
    record["operating_point"]["final_run_val_threshold"] = (
        float(own.threshold) if own is not None and own.method != THRESHOLD_METHOD else None
    )
    point = OperatingPoint(
        threshold=threshold,
        method=THRESHOLD_METHOD,
        positive_index=positive,
        train_priors=list(own.train_priors) if own is not None else [],
    )
    final.model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(final.operating_point) as tmp:
        point.to_json(tmp)
    record_path = final.model_dir / ADAPTATION_FILE
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    if final_id:
        store.start(
            experiment=final_recipe.tracking.experiment or final_recipe.experiment.name,
            run_name="",
            tags={"run_dir": str(final.path)},
            resume_run_id=final_id,
        )
        try:
            store.log_params(
                {
                    "adapt.method": "finetune",
                    "adapt.parent_run": str(record["parent_run_id"]),
                    "adapt.site_root": record["site_root"],
                    "adapt.folds": crossfit["folds"],
                    "adapt.crossfit_id": crossfit["id"],
                    "adapt.n_site_images": record["sample"]["n_images"],
                    "adapt.threshold": THRESHOLD_METHOD,
                }
            )
            store.log_metrics({**flat_metrics(crossfit["metrics"]), "finetune/threshold": threshold}, step=0)
            store.log_artifact(final.operating_point, MODEL_ARTIFACT_DIR)
            store.log_artifact(record_path, MODEL_ARTIFACT_DIR)
            problem = _refresh_mlflow_model(final, store)
            if problem:
                warn.append(problem)
        finally:  # the run itself trained and finished: a failure here loses only these extras
            store.end()
        result.logged_to = store.describe()
    final.write_state(
        finetune_id=crossfit["id"],
        finetune_status="complete",
        adapt_method="finetune",
        parent_run_id=record["parent_run_id"],
        parent_run_dir=record["parent_run_dir"],
    )


# ----------------------------------------------------------------------------------- the command
def finetune_run(
    ref: str,
    *,
    card: str,
    root: str,
    folds: int = 5,
    epochs: int = 3,
    lr: Optional[float] = None,
    freeze: Optional[Sequence] = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    batch_size: Optional[int] = None,
    output_dir: Optional[str | Path] = None,
    tracking_uri: Optional[str] = None,
    runs_dir: Optional[str | Path] = None,
    log: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the trained binary run ``ref`` on the labelled site images of ``root`` (as ``card`` describes
    them), cross-fitted by patient in ``folds`` folds, then once on every site image (see the module docstring).

    ``epochs``, ``lr`` (default the parent's ``optim.lr`` × 0.1), ``freeze`` (``model.freeze``; default the
    parent's, ``[]``: nothing), ``batch_size`` and ``overrides`` (``KEY=VALUE``) set the fine-tuning; ``seed``
    draws the folds and the bootstrap; ``output_dir`` (default: where the parent run lives) holds the
    cross-fit folder and the final run; ``log=False`` tracks the final run in its folder only.
    """
    warn: list[str] = []
    check_overrides(overrides)  # before anything is loaded
    opts = _Options(
        folds=folds,
        epochs=epochs,
        lr=lr,
        freeze=freeze,
        overrides=overrides,
        seed=seed,
        n_bootstrap=n_bootstrap,
        ci=ci,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    site_card = load_card(card)
    parent = _parent(trained, site_card, card, output_dir)

    # ---- the site sample, scored out of the box (every check before any training)
    sample = _site_sample(parent, site_card, card, root, tracking_uri=tracking_uri, opts=opts, warn=warn)
    plan = _plan(parent, sample, card, root, opts)
    op = load_operating_point(trained.run_dir)
    positive = op.positive_index if op is not None else 1
    stored = float(op.threshold) if op is not None else 0.5
    if op is None:
        warn.append(f"run {parent.name} stored no operating point: its 'stored threshold' rule is 0.5")
    loader = DataLoader(sample.dataset, batch_size=64, shuffle=False, num_workers=trained.recipe.data.num_workers)
    y_seen, parent_probs, _ = predict(trained.model, loader, device=dev, progress=progress, desc="out of the box")
    if not np.array_equal(np.asarray(y_seen).astype(int), sample.y):
        raise ConfigError("the site dataset's labels changed order while scoring it (a bug): nothing was trained")
    trained.model = None  # the fold runs build their own from the parent's files

    # ---- the cross-fit
    crossfit = _cross_fit(
        plan, sample, parent_probs, positive=positive, stored=stored, classes=list(trained.classes), opts=opts
    )

    # ---- the final run on every site image
    final_recipe = _final_recipe(plan, trained, tracking_uri=tracking_uri, log=log, progress=progress)
    threshold = float(np.mean(crossfit.fold_thresholds))
    found, how = find_final(
        RunDir.experiment_dir(parent.out, final_recipe.experiment.name), final_recipe, plan.id, set(plan.ids)
    )
    store = create_store(
        final_recipe.tracking.backend, final_recipe.tracking.uri, root=final_recipe.experiment.output_dir
    )
    if how in (None, "resume"):
        if progress:
            say(
                f"{'continuing' if how else 'training'} the final run: {final_recipe.experiment.name} on the "
                f"{len(sample.y)} site images, {final_recipe.train.epochs} epoch(s)"
            )
        parent_id = trained.run_id if trained.run_id and store.run_exists(trained.run_id) else None
        tags = {
            "medtricks.adapt_method": "finetune",
            "medtricks.parent_run": str(trained.run_id),
            "medtricks.finetune_id": plan.id,
        }
        result = run_recipe(
            final_recipe,
            resume=str(found.path) if how == "resume" else None,
            tracker=store,
            parent_run_id=parent_id,
            extra_tags=tags,
            quiet=True,
        )
        final, final_id = RunDir(result.run_dir), result.run_id
    else:
        final, final_id = found, found.read_state().get("run_id")

    record = _record(parent, sample, plan, crossfit, opts, root=root, threshold=threshold, stored=stored)
    final_result = FinetuneResult(
        run_dir=final.path,
        run_id=final_id,
        crossfit_dir=plan.folder,
        record=record,
        trained_folds=crossfit.trained_folds,
        final_reused=how == "done",
        warnings=warn,
    )
    if how != "done":
        _complete_final(final, final_id, store, final_recipe, final_result, positive=positive)
    return final_result
