"""After training: the best checkpoint evaluated on val and test (bootstrap CIs, the operating point chosen
on val, per-image predictions, plots, the side-by-side report), audited, and saved with its model card."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from medtricks.chained import describe_lineage
from medtricks.data import redact_paths
from medtricks.evaluate import compute_metrics, plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
from medtricks.evaluate.operating_point import class_priors, probs_at_threshold, select_threshold
from medtricks.evaluate.split_table import bootstrap_note, headline_keys, split_gaps, split_table
from medtricks.posthoc import audit_model, log_audit, log_shortcut, shortcut_audit_model
from medtricks.posthoc.export import export_model
from medtricks.posthoc.load import load_trained
from medtricks.recipe import Recipe
from medtricks.rundir import MODEL_ARTIFACT_DIR, PREDICTIONS_ARTIFACT_DIR, RunDir, best_key
from medtricks.run.prepare import eval_loader
from medtricks.run.seed_spread import THRESHOLD_KEY
from medtricks.tracking import MLFLOW_MODEL_ARTIFACT_DIR, RunStore
from medtricks.train import predict
from medtricks.train.checkpoint import save_checkpoint
from medtricks.tricks.registry import merged_options

__all__ = [
    "FinalEvaluation",
    "final_evaluation",
    "audit",
    "save_model",
    "choose_operating_point",
    "final_report",
    "model_card",
]


@dataclass
class FinalEvaluation:
    by_split: dict = field(default_factory=dict)  # split -> MetricsResult at argmax / 0.5
    at_op: dict = field(default_factory=dict)  # split -> MetricsResult at the operating point
    operating_point: Any = None
    logged: dict = field(default_factory=dict)  # every best/... metric logged here (the seed spread reads them)


def final_evaluation(
    recipe: Recipe,
    run: RunDir,
    tracker: RunStore,
    say,
    eval_model,
    bundle,
    classes,
    device,
    amp_dtype,
    *,
    step: int,
    best_epoch,
    tricks=(),
) -> FinalEvaluation:
    """Val and test with bootstrap CIs, the operating point (chosen on val only), per-image
    predictions, plots, the test-val gaps, and the side-by-side report."""
    out = FinalEvaluation()
    ci = dict(n_bootstrap=recipe.eval.n_bootstrap, ci=recipe.eval.ci, seed=recipe.experiment.seed)
    for split, dataset in (("val", bundle.val), ("test", bundle.test)):
        if dataset is None or len(dataset) == 0:
            continue
        targets, probs, loss = predict(
            eval_model,
            eval_loader(dataset, recipe),
            device=device,
            amp_dtype=amp_dtype,
            channels_last=recipe.train.channels_last,
        )
        metrics = out.by_split[split] = compute_metrics(targets, probs, classes, **ci)
        flat = {best_key(split, k): float(v) for k, v in metrics.to_dict().items() if isinstance(v, (int, float))}
        flat[best_key(split, "loss")] = loss
        # val comes first: the operating point is chosen there, then applied to test
        if split == "val" and len(classes) == 2 and recipe.eval.threshold != "none":
            out.operating_point = choose_operating_point(
                targets, probs, recipe, bundle.train.targets, say, tricks=tricks
            )
        if out.operating_point is not None:
            at_op = out.at_op[split] = compute_metrics(
                targets, probs_at_threshold(probs, out.operating_point.threshold), classes, **ci
            )
            flat.update(
                {
                    best_key(split, k, op=True): float(v)
                    for k, v in at_op.to_dict().items()
                    if isinstance(v, (int, float))
                }
            )
            if split == "val":
                flat[THRESHOLD_KEY] = float(out.operating_point.threshold)
        # per-image predictions: ablations and `compare` pair runs image by image
        np.savez_compressed(run.predictions(split), y_true=targets, probs=probs.astype(np.float32))
        tracker.log_artifact(run.predictions(split), PREDICTIONS_ARTIFACT_DIR)
        tracker.log_metrics(flat, step=step)
        out.logged.update(flat)
        if recipe.eval.plots:
            tracker.log_figure(
                plot_confusion_matrix(targets, probs.argmax(1), classes), f"plots/{split}_confusion_matrix.png"
            )
            tracker.log_figure(plot_roc_curves(targets, probs, classes), f"plots/{split}_roc.png")
            tracker.log_figure(plot_reliability_diagram(targets, probs), f"plots/{split}_reliability.png")
    if "test" in out.by_split:
        keys = headline_keys(out.by_split["val"].values, positive_class(classes))
        tracker.log_metrics(split_gaps(out.by_split, keys=keys), step=step)
    say(final_report(recipe, best_epoch, classes, out.by_split, out.at_op, out.operating_point))
    return out


def audit(recipe: Recipe, tracker: RunStore, say, eval_model, dataset, classes, data_config, device) -> None:
    """The recipe's audits of the best checkpoint on the validation split: robustness, shortcut."""
    if recipe.audit.enabled:
        surrogate = None
        if recipe.audit.surrogate:
            surrogate = load_trained(
                recipe.audit.surrogate,
                tracking_uri=recipe.tracking.uri,
                device=str(device),
                runs_dir=recipe.experiment.output_dir,
            ).model
        result = audit_model(
            eval_model,
            dataset,
            audit_cfg=recipe.audit,
            classes=classes,
            data_config=data_config,
            device=device,
            seed=recipe.experiment.seed,
            surrogate=surrogate,
            progress=recipe.train.progress,
            batch_size=recipe.train.batch_size,
        )
        log_audit(tracker, result)
        say(result.table())
    if recipe.audit.shortcut:
        shortcut = shortcut_audit_model(
            eval_model,
            dataset,
            audit_cfg=recipe.audit,
            classes=classes,
            data_config=data_config,
            device=device,
            seed=recipe.experiment.seed,
            progress=recipe.train.progress,
            batch_size=recipe.train.batch_size,
        )
        log_shortcut(tracker, shortcut)
        say(shortcut.table())


def save_model(
    recipe: Recipe,
    run: RunDir,
    tracker: RunStore,
    eval_model,
    classes,
    info,
    data_config,
    fit_result,
    final: FinalEvaluation,
) -> None:
    """The model: state dict, data config, operating point and a model card (enough to rebuild it)."""
    run.model_dir.mkdir(exist_ok=True)
    save_checkpoint(eval_model.state_dict(), run.model_state)  # atomic; a full disk is one clear error
    run.data_config.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}))
    run.model_card.write_text(model_card(recipe, classes, info, data_config, fit_result, final.by_split.get("val")))
    files = [run.model_state, run.model_card, run.data_config]
    if final.operating_point is not None:
        final.operating_point.to_json(run.operating_point)
        files.insert(0, run.operating_point)
    if recipe.tracking.log_model:
        for path in files:
            tracker.log_artifact(path, MODEL_ARTIFACT_DIR)
        if tracker.logs_models:
            _log_mlflow_model(recipe, run, tracker)


def _log_mlflow_model(recipe: Recipe, run: RunDir, tracker: RunStore) -> None:
    """The MLflow pyfunc model (``runs:/<id>/mlflow_model``: ``mlflow models serve`` answers it), made by
    ``export --format mlflow`` from the saved model (parity-checked). Training is over: a failure here
    warns and tags the run, it does not fail it."""
    try:
        shutil.rmtree(run.mlflow_model, ignore_errors=True)  # a resumed run makes it again
        result = export_model(str(run.path), "mlflow", run.mlflow_model)
        tracker.log_model(run.mlflow_model, MLFLOW_MODEL_ARTIFACT_DIR)
        tracker.set_tags(
            {
                "medtricks.mlflow_model": f"{MLFLOW_MODEL_ARTIFACT_DIR} (parity max |delta prob| "
                f"{result.max_abs_diff:.1e})"
            }
        )
    except Exception as err:  # noqa: BLE001 - the trained model is saved; only its MLflow flavour is missing
        message = f"{type(err).__name__}: {str(err)[:500]}"
        warnings.warn(
            f"the MLflow model of run {run.path} was not logged ({message}); the run's model/ is; "
            f"make one later with `medtricks export {run.path} --format mlflow --out DIR`",
            RuntimeWarning,
            stacklevel=2,
        )
        tracker.set_tags({"medtricks.mlflow_model": f"not logged: {redact_paths(message, recipe.data.root)}"})


def choose_operating_point(y_val, probs_val, recipe: Recipe, train_targets, say, tricks=()):
    """The decision threshold on validation (``eval.threshold``), with the training class priors (the
    split's frequencies, unless a trick trained against others: its ``operating_point_options``)."""
    options = merged_options(tricks, "operating_point_options")
    if "train_priors" not in options:
        options["train_priors"] = class_priors(train_targets, 2)
    try:
        op = select_threshold(
            y_val, probs_val, method=recipe.eval.threshold, target_sensitivity=recipe.eval.target_sensitivity, **options
        )
    except ValueError as err:  # e.g. a validation split with one class: keep 0.5 and say why
        say(f"warning: no operating point chosen ({err}); predictions use the 0.5 threshold")
        return None
    return op


def positive_class(classes) -> Optional[str]:
    """Binary: the positive class ``classes[1]`` (whose sensitivity/specificity lead the tables); else None."""
    return classes[1] if len(classes) == 2 else None


def final_report(recipe: Recipe, best_epoch, classes, by_split: dict, at_op: dict, operating_point) -> str:
    """Validation and test side by side (with the gap), at 0.5 and at the stored operating point."""
    name, seed = recipe.experiment.name, recipe.experiment.seed
    keys = headline_keys(by_split["val"].values, positive_class(classes))
    parts = [
        split_table(
            by_split,
            keys=keys,
            ci_note=False,
            title=f"{name} — best epoch {best_epoch} (chosen on val), seed {seed}, "
            f"{'argmax' if len(classes) > 2 else 'threshold 0.5'}",
        )
    ]
    if operating_point is not None:
        parts.append(
            split_table(
                at_op,
                keys=[k for k in keys if k not in ("auroc", "ece")],
                ci_note=False,
                title=f"at the stored operating point: {operating_point.describe()} "
                "(val is optimistic here: the threshold was chosen on it)",
            )
        )
    if bootstrap_note(by_split["val"]):  # said once, under every table of the report
        parts[-1] += "\n" + bootstrap_note(by_split["val"])
    if "test" not in by_split:
        parts.append(
            "no test split: these numbers come from the split that chose the checkpoint and will "
            "flatter the model; set data.test_fraction (or give the card a test folder)"
        )
    return "\n\n".join(parts)


def model_card(recipe: Recipe, classes, info, data_config, fit_result, metrics) -> str:
    lines = [
        f"# {recipe.experiment.name}",
        "",
        f"- architecture: {info.get('name', recipe.model.name)}",
        f"- weights: {recipe.model.weights} ({info.get('weights_source')}, sha256 {info.get('weights_sha256')})",
        *([f"- parent run: {describe_lineage(info)}"] if info.get("lineage") else []),
        f"- classes: {', '.join(classes)}",
        f"- input: {recipe.model.in_chans} channel(s), normalize mean {tuple(data_config['mean'])} "
        f"std {tuple(data_config['std'])}",
        f"- resizer: {recipe.model.resizer.model_dump() if recipe.model.resizer.enabled else 'off'}",
        f"- tricks: {', '.join(recipe.tricks_on()) or 'none'}",
        f"- best epoch: {fit_result.best_epoch} by {recipe.train.best_metric} = {fit_result.best_value}"
        + (
            f" (ties broken by {recipe.train.best_tiebreak}, {recipe.train.best_tiebreak_mode}: "
            f"{fit_result.best_tiebreak_value})"
            if recipe.train.best_tiebreak
            else ""
        ),
        "",
        "Rebuild: `medtricks.run.build_model(load_recipe('recipe.yaml'), num_classes)` then "
        "`load_state_dict(torch.load('model_state.pt'))`.",
        "",
        "```",
        metrics.table() if metrics else "",
        "```",
    ]
    return "\n".join(lines) + "\n"
