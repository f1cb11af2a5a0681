"""The final run of ``medtricks adapt --method finetune`` (:mod:`medtricks.deploy.finetune`): its recipe (the
fine-tuning recipe on every site image, tracked as the parent is), the adaptation record
(``model/adaptation.json``), and its completion: the cross-fitted operating point and the record written
into the run folder and logged to its run store."""

from __future__ import annotations

import json
import shutil
from typing import Any, Optional

import numpy as np

import medtricks
from medtricks._atomic import atomic_path
from medtricks.data import folder_id
from medtricks.deploy.adapt import ADAPTATION_FILE
from medtricks.deploy.finetune_recipe import CHECKPOINT_METRIC, RESET_TRICKS
from medtricks.deploy.finetune_report import FinetuneResult, flat_metrics
from medtricks.deploy.finetune_setup import CrossFit, CrossFitPlan, FinetuneOptions, ParentRun, SiteSample
from medtricks.evaluate.operating_point import OperatingPoint
from medtricks.posthoc.decision import load_operating_point
from medtricks.posthoc.export import export_model
from medtricks.recipe import Recipe, recipe_from_dict
from medtricks.rundir import MODEL_ARTIFACT_DIR, RunDir
from medtricks.tracking import MLFLOW_MODEL_ARTIFACT_DIR

RECORD_FORMAT = "medtricks-adaptation/1"  # the format of adapt's model/adaptation.json
#: ``method`` of the final run's model/operating_point.json: the mean of the fold Youden thresholds.
THRESHOLD_METHOD = "crossfit-youden"


def final_run_recipe(plan: CrossFitPlan, trained, *, tracking_uri: Optional[str], log: bool, progress: bool) -> Recipe:
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


def adaptation_record(
    parent: ParentRun,
    sample: SiteSample,
    plan: CrossFitPlan,
    crossfit: CrossFit,
    opts: FinetuneOptions,
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


def refresh_mlflow_model(run: RunDir, store) -> Optional[str]:
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


def complete_final_run(
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
            problem = refresh_mlflow_model(final, store)
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
