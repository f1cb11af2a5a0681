"""``medtricks evaluate``: score a finished run on any dataset a card describes, without training.

:func:`eval_dataset` builds the data as the run saw it at evaluation time; :func:`summarize_predictions`
turns predictions into an :class:`EvaluationReport` (metrics with CIs at 0.5 and at the operating point,
figures); :func:`log_evaluation` logs one to the run store; :func:`evaluate_trained` does all of it for a
run, with the drop against its internal test split and a warning when it saw the evaluated data.

    from medtricks.posthoc import evaluate_trained
    report = evaluate_trained("runs/quickstart/20261123-101500-a1b2c3", card="synthetic-phantoms",
                              root="data/phantoms", split="val")
    print(report.metrics.table())
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch.utils.data import DataLoader

from medtricks.data import build_eval_dataset, folder_id, load_card, redact_paths
from medtricks.data.class_map import parse_class_map
from medtricks.evaluate.drop import PerformanceDrop, performance_drop
from medtricks.evaluate.metrics import compute_metrics
from medtricks.evaluate.paired import load_predictions
from medtricks.evaluate.plots import plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
from medtricks.posthoc.decision import DecisionRule, resolve_decision_rule
from medtricks.posthoc.load import load_trained
from medtricks.posthoc.overlap import SplitOverlap, split_overlap
from medtricks.posthoc.store import posthoc_store, run_file
from medtricks.posthoc.tta import FlipTTA, flip_tta_warning, resolve_tta
from medtricks.rundir import PREDICTIONS_ARTIFACT_DIR, PREDICTIONS_EVAL_FILE, RunDir
from medtricks.tracking import create_store
from medtricks.train import predict as predict_loader, resolve_device  # the loader-level predict, not posthoc.predict

__all__ = [
    "eval_dataset",
    "class_map_notes",
    "EvaluationReport",
    "image_set_digest",
    "summarize_predictions",
    "log_evaluation",
    "evaluate_trained",
]


def eval_dataset(
    trained,
    card,
    root,
    *,
    split: str = "all",
    split_seed: Optional[int] = None,
    val_fraction: Optional[float] = None,
    test_fraction: Optional[float] = None,
    on_bad_image: str = "error",
    progress: bool = True,
    class_map=None,
    skip_hint: Optional[str] = None,
    class_map_option: Optional[str] = "--class-map",
):
    """The eval-transform dataset of ``root`` as ``card`` describes it, normalized as the run trained.

    ``split``: ``all`` (every image: an external test set), or ``train``/``val``/``test`` of the
    card's patient-level split (defaults: the run's own split settings). ``class_map``: card class ->
    model class or ``"drop"`` (a dict or ``"covid=pneumonia,..."``), for a card whose classes differ
    from the model's (:mod:`medtricks.data.class_map`); without one the card must have the model's
    classes (any order). ``skip_hint``: how the calling command asks for ``on_bad_image="skip"``, named
    when an image is unusable (None: it cannot); ``class_map_option``: how it takes a class map, named when
    the card's classes differ (None: it takes none).
    """
    recipe = trained.recipe
    card = load_card(card)
    mapping = parse_class_map(class_map) if isinstance(class_map, str) else dict(class_map or {})
    dataset, quarantine = build_eval_dataset(
        card,
        root,
        image_size=recipe.input_image_size(),
        mean=tuple(trained.data_config["mean"]),
        std=tuple(trained.data_config["std"]),
        in_chans=recipe.model.in_chans,
        augment=recipe.data.augment,
        split=split,
        split_seed=recipe.data.split_seed if split_seed is None else split_seed,
        val_fraction=recipe.data.val_fraction if val_fraction is None else val_fraction,
        test_fraction=recipe.data.test_fraction if test_fraction is None else test_fraction,
        test_by=recipe.data.test_by,
        on_bad_image=on_bad_image,
        progress=progress,
        classes=list(trained.classes),
        class_map=mapping,
        skip_hint=skip_hint,
        class_map_option=class_map_option,
    )
    if len(quarantine):
        print(f"warning: skipped {len(quarantine)} unusable images (on_bad_image=skip)")
    return dataset, quarantine


def class_map_notes(dataset, targets, classes) -> list[str]:
    """What a class map did, and which metrics a one-class evaluation set cannot define."""
    notes = []
    attrs = getattr(getattr(dataset, "manifest", None), "attrs", {}) or {}
    mapping = attrs.get("class_map")
    if mapping and any(k != v for k, v in mapping.items()):
        notes.append("classes mapped onto the model's: " + ", ".join(f"{k} -> {v}" for k, v in mapping.items()))
    dropped = attrs.get("dropped_by_class_map") or {}
    if dropped:
        notes.append("left out by the class map: " + ", ".join(f"{k} ({n} images)" for k, n in dropped.items()))
    present = sorted({int(t) for t in np.asarray(targets).tolist()})
    if len(present) == 1:
        only = classes[present[0]]
        defined = (
            "sensitivity"
            if len(classes) == 2 and present[0] == 1
            else "specificity"
            if len(classes) == 2
            else f"recall of {only!r}"
        )
        notes.append(
            f"the evaluation set holds only class {only!r}: AUROC, balanced accuracy and the other class's "
            f"rate are undefined (shown as nan); only {defined} (= accuracy here) means something"
        )
    return notes


# Per-image predictions of an evaluation: y_true (N,), probs (N, K) and, for binary models, probs_op
# (N, 2: argmax = the decision at the operating point) and image_set (a digest of the ordered image
# list). No file names, no patient IDs. Logged as the artifact predictions/predictions_eval.npz
# (PREDICTIONS_EVAL_FILE and PREDICTIONS_ARTIFACT_DIR come from medtricks.rundir).
@dataclass
class EvaluationReport:
    """What ``evaluate`` found. ``metrics``: at 0.5 (argmax), as always; ``metrics_op``: at the
    operating point ``rule`` (binary models only; no ECE: reweighted probabilities are not calibrated
    scores); ``drop``: against the run's own internal test split when it saved predictions for it."""

    metrics: Any  # MetricsResult
    split: str
    n_images: int
    run_id: Optional[str] = None  # the evaluation run in the run store
    source_run: Optional[str] = None
    figures: dict[str, Any] = field(default_factory=dict)
    rule: Optional[DecisionRule] = None
    metrics_op: Any = None
    drop: Optional[PerformanceDrop] = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # printed as "warning: ..." lines, also in the table
    overlap: Optional[SplitOverlap] = None  # evaluated images/patients the run saw (None: no split manifest)
    y_true: Optional[np.ndarray] = None
    probs: Optional[np.ndarray] = None
    probs_op: Optional[np.ndarray] = None
    image_set: Optional[str] = None
    loss: Optional[float] = None
    logged_to: Optional[str] = None  # the run store of run_id, in words

    def table(self, title: Optional[str] = None) -> str:
        """Everything, printable: metrics at 0.5, at the operating point, the drop, notes."""
        at_half = f"{title} — threshold 0.5 (argmax)" if title and self.rule else title
        parts = [self.metrics.table(title=at_half)]
        if self.metrics_op is not None:
            # the same bootstrap (images, resamples, seed) as the table above: said once, there
            same = (self.metrics_op.n_bootstrap, self.metrics_op.seed) == (self.metrics.n_bootstrap, self.metrics.seed)
            parts.append(
                self.metrics_op.table(title=f"at the operating point: {self.rule.describe()}", ci_note=not same)
            )
        if self.drop is not None:
            parts.append(self.drop.table())
        if self.warnings or self.notes:
            parts.append(
                "notes:\n" + "\n".join([*(f"- WARNING: {w}" for w in self.warnings), *(f"- {n}" for n in self.notes)])
            )
        return "\n\n".join(parts)

    def to_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The flat dict logged to MLflow: ``eval/<m>``, ``eval/op/<m>``, ``eval/drop/<m>`` (+ CIs)."""
        flat = {f"{prefix}{k}": float(v) for k, v in self.metrics.to_dict().items() if isinstance(v, (int, float))}
        if self.loss is not None:
            flat[f"{prefix}loss"] = float(self.loss)
        if self.metrics_op is not None:
            flat.update(
                {
                    f"{prefix}op/{k}": float(v)
                    for k, v in self.metrics_op.to_dict().items()
                    if isinstance(v, (int, float))
                }
            )
            flat[f"{prefix}op/threshold"] = self.rule.threshold
        if self.drop is not None:
            flat.update(self.drop.to_metrics(f"{prefix}drop/"))
        return flat

    def save_predictions(self, path: str | Path) -> Path:
        """Write the per-image predictions (see :data:`PREDICTIONS_EVAL_FILE`) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"y_true": np.asarray(self.y_true).astype(np.int64), "probs": np.asarray(self.probs, dtype=np.float32)}
        if self.probs_op is not None:
            # float64: the rule puts images on the threshold at exactly 0.5 vs 0.5 +- tiny; float32 rounding
            # would tie them and flip their decision when compare re-reads the file
            arrays["probs_op"] = np.asarray(self.probs_op, dtype=np.float64)
        if self.image_set:
            arrays["image_set"] = np.array(self.image_set)
        np.savez_compressed(path, **arrays)
        return path


def image_set_digest(dataset, root) -> str:
    """SHA-256 of the dataset's ordered image paths relative to ``root``: equal digests mean the same
    images in the same order, which ``compare`` and ``ensemble`` check without ever logging a name."""
    root = Path(root).expanduser().resolve()
    h = hashlib.sha256()
    for p in dataset.manifest["path"]:
        p = Path(p).resolve()
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        h.update(rel.encode() + b"\n")
    return h.hexdigest()


def _without_ece(result):
    # After odds reweighting the probabilities only encode the decision; their ECE means nothing.
    for key in ("ece",):
        result.values.pop(key, None)
        result.ci.pop(key, None)
        result.n_skipped.pop(key, None)
    return result


def summarize_predictions(
    y_true: Any,
    probs: Any,
    classes: list[str],
    *,
    rule: Optional[DecisionRule] = None,
    split: str = "all",
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    source_run: Optional[str] = None,
    figures: bool = True,
    loss: Optional[float] = None,
    image_set: Optional[str] = None,
) -> EvaluationReport:
    """An :class:`EvaluationReport` from predictions: metrics with CIs at 0.5 and, with ``rule``, at the
    operating point; confusion matrix / ROC / reliability figures unless ``figures=False``."""
    y, probs = np.asarray(y_true).astype(int), np.asarray(probs, dtype=np.float64)
    metrics = compute_metrics(y, probs, classes, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    report = EvaluationReport(
        metrics=metrics,
        split=split,
        n_images=len(y),
        source_run=source_run,
        rule=rule,
        y_true=y,
        probs=probs,
        image_set=image_set,
        loss=loss,
    )
    if rule is not None:
        report.probs_op = rule.apply(probs)
        report.metrics_op = _without_ece(
            compute_metrics(y, report.probs_op, classes, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        )
    if figures:
        report.figures = {
            "plots/confusion_matrix.png": plot_confusion_matrix(y, probs.argmax(1), classes),
            "plots/roc.png": plot_roc_curves(y, probs, classes),
            "plots/reliability.png": plot_reliability_diagram(y, probs),
        }
        if rule is not None:
            report.figures["plots/confusion_matrix_op.png"] = plot_confusion_matrix(
                y, report.probs_op.argmax(1), classes
            )
    return report


def _internal_test_predictions(trained, tracking_uri: Optional[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    return run_file(trained, RunDir.predictions_artifact("test"), load_predictions, tracking_uri)


def log_evaluation(
    report: EvaluationReport,
    *,
    uri: Optional[str],
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    parent_run_id: Optional[str] = None,
    texts: Optional[dict[str, str]] = None,
    store=None,
) -> Optional[str]:
    """A new evaluation run in ``store`` (default: MLflow at ``uri``): params, ``report.to_metrics()``,
    figures, ``texts`` (artifact name → text) and the per-image predictions
    (``predictions/predictions_eval.npz``). Returns its run id."""
    if store is None:
        store = create_store("mlflow", uri)
    tracker = store
    tags = {"medtricks.role": tags.get("medtricks.kind", "evaluation"), **tags}  # evaluation, ensemble
    run_id = tracker.start(
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id if parent_run_id and tracker.run_exists(parent_run_id) else None,
    )
    rule = report.rule
    tracker.log_params(
        {
            **params,
            "n_images": report.n_images,
            "eval.ci": report.metrics.ci_level,
            "image_set": report.image_set,
            "threshold": rule.threshold if rule else "argmax",
            "threshold_source": rule.source if rule else "argmax",
            "prevalence": rule.prevalence if rule else None,
            "train_priors": ",".join(f"{v:.6g}" for v in rule.train_priors) if rule and rule.train_priors else None,
        }
    )
    tracker.log_metrics(report.to_metrics(), step=0)
    for name, figure in report.figures.items():
        tracker.log_figure(figure, name)
    for name, text in (texts or {}).items():
        tracker.log_text(text, name)
    with tempfile.TemporaryDirectory(prefix="medtricks-eval-") as tmp:
        tracker.log_artifact(report.save_predictions(Path(tmp) / PREDICTIONS_EVAL_FILE), PREDICTIONS_ARTIFACT_DIR)
    tracker.end()
    return run_id


def evaluate_trained(
    ref: str,
    *,
    card: str,
    root: str,
    split: str = "all",
    tta: Any = "none",
    threshold: Any = "stored",
    prevalence: Optional[float] = None,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    batch_size: int = 64,
    tracking_uri: Optional[str] = None,
    log: bool = True,
    device: str = "auto",
    progress: bool = True,
    runs_dir: Optional[str | Path] = None,
    class_map: Any = None,
    site: Optional[str] = None,
    on_bad_image: str = "error",
) -> EvaluationReport:
    """Evaluate a trained run (folder, model file or run id) on a card's data, without training.

    ``class_map`` (``"covid=pneumonia,normal=normal"`` or a dict; ``drop`` leaves a class out) scores
    the model on a card whose classes differ from its own (external validation on another site's
    data); when the mapped set holds one class only, AUROC is undefined and the report says so.
    ``on_bad_image``: ``"error"`` (default: an unreadable or corrupt image stops the evaluation, listing
    each) or ``"skip"`` (they are left out, counted in a warning and the logged ``n_quarantined``).

    Prints only ``warning:`` lines; returns metrics with bootstrap CIs at 0.5 and, for a binary model, at its
    operating point (see :func:`resolve_decision_rule` for ``threshold`` and ``prevalence``), and
    the drop against the run's internal test split when the run saved its test predictions
    (``artifacts/predictions_test.npz``). With ``log=True`` it logs metrics (``eval/<m>``,
    ``eval/op/<m>``, ``eval/drop/<m>``), plots and per-image predictions to a new evaluation run
    nested under the trained run (tag ``medtricks.evaluated_run``), in the run store of the trained
    run's ``tracking.backend`` (:func:`posthoc_store`: MLflow, or the local run store). ``runs_dir``:
    where run ids of the local store are looked up (default ``runs``) and its evaluations go.

    ``tta``: ``"none"`` (default) or ``"flip"`` (the mean of each image and its horizontal mirror; a
    warning says the model never saw mirrored X-rays unless its augment preset flips; see
    :func:`resolve_tta`). ``site``: decide with the run's site profile of that name (``medtricks calibrate``;
    see :func:`resolve_decision_rule`). Evaluation data the run trained or selected on is found
    (:func:`split_overlap`: identical bytes or shared patients with its split manifest) and warned
    about: ``report.warnings``, a note in the table, and the tag ``medtricks.overlap`` on the logged run.
    """
    tta = resolve_tta(tta)  # before anything loads: a bare --tta fails at once
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    rule = resolve_decision_rule(
        trained, threshold=threshold, prevalence=prevalence, tracking_uri=tracking_uri, site=site, runs_dir=runs_dir
    )
    dataset, quarantine = eval_dataset(
        trained,
        card,
        root,
        split=split,
        progress=progress,
        class_map=class_map,
        on_bad_image=on_bad_image,
        skip_hint="pass --on-bad-image skip (on_bad_image='skip' in Python)",
    )
    card_name = load_card(card).name
    warns = [w for w in [flip_tta_warning(trained) if tta == "flip" else None] if w]
    overlap = split_overlap(trained, dataset.manifest, root, tracking_uri)
    overlap_notes = []
    if overlap is not None:
        more, overlap_notes = overlap.messages(synthetic=card_name == "synthetic-phantoms")
        warns += more
    for text in warns:
        print(f"warning: {text}", flush=True)
    model = FlipTTA(trained.model) if tta == "flip" else trained.model
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=trained.recipe.data.num_workers)
    targets, probs, loss = predict_loader(model, loader, device=dev, progress=progress, desc="evaluate")
    report = summarize_predictions(
        targets,
        probs,
        trained.classes,
        rule=rule,
        split=split,
        n_bootstrap=n_bootstrap,
        ci=ci,
        seed=seed,
        source_run=trained.run_id,
        loss=loss,
        image_set=image_set_digest(dataset, root),
    )
    report.warnings, report.overlap = warns, overlap
    report.notes.extend(overlap_notes)
    report.notes.extend(class_map_notes(dataset, targets, trained.classes))
    if rule is not None and rule.source == "default":
        report.notes.append(rule.description)
    internal = _internal_test_predictions(trained, tracking_uri)
    if internal is None:
        report.notes.append(
            "no drop vs the internal test split: the run saved no artifacts/predictions_test.npz "
            "(trained without a test split, data.test_fraction 0)"
        )
    else:
        y_int, p_int = internal
        # Same decision rule on both sets; the internal split is at the training prevalence: no shift.
        p_int = rule.apply(p_int, shift=False) if rule is not None else p_int
        p_ext = report.probs_op if rule is not None else report.probs
        report.drop = performance_drop(
            y_int,
            p_int,
            targets,
            p_ext,
            trained.classes,
            n_bootstrap=n_bootstrap,
            ci=ci,
            seed=seed,
            rule=f"threshold {rule.threshold:.4f}" if rule else "argmax",
        )
    if log:
        store = posthoc_store(trained, tracking_uri, runs_dir)
        report.logged_to = store.describe()
        tags = {"medtricks.evaluated_run": str(trained.run_id), "medtricks.kind": "evaluation"}
        if overlap is not None:
            tags["medtricks.overlap"] = overlap.summary() or "none"
        if report.warnings or report.notes:  # the run's description in the MLflow UI; data paths hashed
            tags["mlflow.note.content"] = redact_paths(
                "\n".join([*(f"WARNING: {w}" for w in report.warnings), *report.notes]), root
            )[:5000]
        report.run_id = log_evaluation(
            report,
            uri=tracking_uri or trained.recipe.tracking.uri,
            store=store,
            experiment=trained.recipe.tracking.experiment or trained.recipe.experiment.name,
            run_name=f"eval-{card_name}-{split}{'-tta' if tta == 'flip' else ''}",
            parent_run_id=trained.run_id,
            tags=tags,
            params={
                "card": card_name,
                "root": folder_id(root),
                "split": split,
                "tta": tta,
                "n_bootstrap": n_bootstrap,
                "seed": seed,
                "source_run": str(trained.run_id),
                "site": site,
                "source_run_dir": str(trained.run_dir),
                "n_quarantined": len(quarantine),
            },
        )
    return report
