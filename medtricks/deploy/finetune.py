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

This module trains (the fold runs and the final run); :mod:`~medtricks.deploy.finetune_setup` checks and
plans everything before that, :mod:`~medtricks.deploy.finetune_final` writes the final run's record and
operating point.

Example::

    result = finetune_run("runs/kermany_pneumonia/20261201-101406-d20d09", card="kermany-pneumonia",
                          root="../shared/data/kermany224_site")
    print(result.summary())
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medtricks.console import say
from medtricks.data import load_card
from medtricks.deploy.finetune_final import (
    RECORD_FORMAT,
    THRESHOLD_METHOD,
    adaptation_record,
    complete_final_run,
    final_run_recipe,
)
from medtricks.deploy.finetune_folds import find_final, finished_fold, fold_predictions, fold_splits, write_fold_data
from medtricks.deploy.finetune_recipe import (
    CHECKPOINT_METRIC,
    check_overrides,
    finetune_recipe,
    fold_recipe,
    parse_freeze,
)
from medtricks.deploy.finetune_report import RULES, FinetuneResult, clamp_threshold, crossfit_metrics
from medtricks.deploy.finetune_setup import (
    CrossFit,
    CrossFitPlan,
    FinetuneOptions,
    SiteSample,
    crossfit_plan,
    parent_run,
    site_sample,
)
from medtricks.deploy.fit import patient_folds
from medtricks.errors import ConfigError
from medtricks.evaluate.operating_point import select_threshold
from medtricks.posthoc.decision import load_operating_point
from medtricks.posthoc.load import load_trained
from medtricks.run import run_recipe
from medtricks.rundir import RunDir
from medtricks.tracking import create_store
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
    "RECORD_FORMAT",
    "RULES",
]


# ------------------------------------------------------------------------------------ the cross-fit
def _cross_fit(
    plan: CrossFitPlan,
    sample: SiteSample,
    parent_probs: np.ndarray,
    *,
    positive: int,
    stored: float,
    classes: list[str],
    opts: FinetuneOptions,
) -> CrossFit:
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
    return CrossFit(
        probs=probs,
        fold_thresholds=fold_thresholds,
        parent_thresholds=parent_thresholds,
        fold_runs=fold_runs,
        trained_folds=trained_folds,
        metrics=metrics,
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
    opts = FinetuneOptions(
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
    parent = parent_run(trained, site_card, card, output_dir)

    # ---- the site sample, scored out of the box (every check before any training)
    sample = site_sample(parent, site_card, card, root, tracking_uri=tracking_uri, opts=opts, warn=warn)
    plan = crossfit_plan(parent, sample, card, root, opts)
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
    final_recipe = final_run_recipe(plan, trained, tracking_uri=tracking_uri, log=log, progress=progress)
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

    record = adaptation_record(parent, sample, plan, crossfit, opts, root=root, threshold=threshold, stored=stored)
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
        complete_final_run(final, final_id, store, final_recipe, final_result, positive=positive)
    return final_result
