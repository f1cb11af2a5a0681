"""Ensembles of trained runs: the mean of the members' softmax probabilities on the same images.

Members may differ in architecture, image size and normalization (each one sees the data through
its own eval transform) but must predict the same classes in the same order and see the same
images in the same order. The report shows every member and the ensemble with 95% bootstrap CIs,
the paired image-bootstrap Δ AUROC of the ensemble against each member, and — for binary models —
metrics at an operating point:

* if every member saved validation predictions (``artifacts/predictions_val.npz``) for the same
  validation images (same data settings, same labels), the ensemble's threshold is chosen on the
  averaged validation probabilities with :func:`~medtricks.evaluate.operating_point.select_threshold`
  (the members' own method when they agree, else Youden's J) — never on the evaluated data;
* otherwise it is the mean of the members' stored thresholds (a member without one counts as 0.5,
  the threshold its argmax uses), and the report says why.

Example::

    from medtricks.posthoc.ensemble import ensemble_runs
    report = ensemble_runs(["runs/a/20261123-101500-a1b2c3", "runs/b/20261124-090000-d4e5f6"],
                           card="kermany-pneumonia", root="/data/kermany/test", log=False)
    print(report.table())
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader

from medtricks.data import folder_id, load_card, redact_paths
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import fmt_delta_ci, fmt_mean_ci, fmt_num, markdown_table
from medtricks.evaluate.metrics import paired_bootstrap_delta
from medtricks.evaluate.operating_point import select_threshold
from medtricks.evaluate.paired import load_predictions
from medtricks.posthoc.decision import DecisionRule, load_operating_point, resolve_decision_rule
from medtricks.posthoc.evaluation import eval_dataset, image_set_digest, log_evaluation, summarize_predictions
from medtricks.posthoc.overlap import split_overlap
from medtricks.posthoc.store import posthoc_store, run_file
from medtricks.posthoc.tta import FlipTTA, flip_tta_warning, resolve_tta
from medtricks.rundir import RunDir
from medtricks.train import predict, resolve_device
from medtricks.posthoc.load import load_trained

__all__ = ["EnsembleReport", "ensemble_runs", "ensemble_threshold"]

_SPLITS = ("all", "test", "val")


@dataclass
class EnsembleReport:
    """Members and ensemble on the same images. ``ensemble`` and ``members`` are
    :class:`~medtricks.posthoc.evaluation.EvaluationReport` (metrics at 0.5, at the operating point, predictions);
    ``deltas[i]``: paired bootstrap of ensemble − member ``i`` (AUROC)."""

    ensemble: Any  # EvaluationReport
    members: list[Any]  # EvaluationReport per member, in the given order
    member_names: list[str]
    classes: list[str]
    card: str
    split: str
    tta: bool = False
    threshold_note: str = ""
    deltas: list[dict[str, Any]] = field(default_factory=list)
    run_id: Optional[str] = None  # the evaluation run of the ensemble in the run store
    logged_to: Optional[str] = None  # that run store, in words

    @property
    def n_images(self) -> int:
        return self.ensemble.n_images

    @property
    def probs(self) -> np.ndarray:
        return self.ensemble.probs

    def summary(self) -> str:
        """One Markdown row per member and one for the ensemble: headline metrics with CIs."""
        binary = len(self.classes) == 2
        pct = f"{100 * self.ensemble.metrics.ci_level:g}%"
        pos = self.classes[-1]

        def cell(result, key: str) -> str:
            if result is None or key not in result.values:
                return "-"
            low, high = result.ci.get(key, (math.nan, math.nan))
            return fmt_mean_ci(result.values[key], low, high)

        if binary:
            header = [
                "model",
                f"AUROC [{pct} CI]",
                "accuracy @0.5",
                "threshold",
                "accuracy @op",
                f"sensitivity/{pos} @op",
                f"specificity/{pos} @op",
                "Δ AUROC ensemble − member",
            ]
        else:
            header = [
                "model",
                f"AUROC [{pct} CI]",
                "accuracy",
                "balanced_accuracy",
                "f1",
                "ece",
                "Δ AUROC ensemble − member",
            ]
        rows = []
        for i, report in enumerate([*self.members, self.ensemble]):
            is_ensemble = i == len(self.members)
            name = f"ensemble (mean of {len(self.members)})" if is_ensemble else self.member_names[i]
            row = [name, cell(report.metrics, "auroc")]
            if binary:
                row += [
                    cell(report.metrics, "accuracy"),
                    fmt_num(report.rule.threshold) if report.rule else "-",
                    cell(report.metrics_op, "accuracy"),
                    cell(report.metrics_op, f"sensitivity/{pos}"),
                    cell(report.metrics_op, f"specificity/{pos}"),
                ]
            else:
                row += [cell(report.metrics, k) for k in ("accuracy", "balanced_accuracy", "f1", "ece")]
            d = None if is_ensemble or i >= len(self.deltas) else self.deltas[i]
            row.append("" if is_ensemble else (fmt_delta_ci(d["delta"], d["ci_low"], d["ci_high"]) if d else "-"))
            rows.append(row)
        return markdown_table(header, rows)

    def table(self) -> str:
        """Printable: the summary table, how the threshold was chosen, the ensemble's full metrics."""
        head = (
            f"Ensemble of {len(self.members)} runs on {self.card} ({self.split}, {self.n_images} images"
            f"{', flip TTA' if self.tta else ''}); {self.ensemble.metrics.n_bootstrap} bootstrap resamples"
        )
        parts = [head, self.summary()]
        if self.threshold_note:
            parts.append(f"Operating point: {self.threshold_note}")
        if self.deltas:
            parts.append("Δ AUROC: paired bootstrap over the same images (ensemble − member).")
        parts.append(self.ensemble.table(title="ensemble"))
        return "\n\n".join(parts)


def _name(trained) -> str:
    ident = trained.run_id[:12] if trained.run_id else Path(trained.run_dir).name
    return f"{trained.recipe.experiment.name} ({ident})"


def _data_settings(trained) -> tuple:
    """What decides a run's validation images: same settings, same val split."""
    d = trained.recipe.data
    return (
        load_card(d.card).name,
        str(Path(d.root).expanduser().resolve()),
        d.split_seed,
        d.val_fraction,
        d.test_fraction,
        getattr(d, "test_by", None),
    )


def _model_digest(trained) -> str:
    """SHA-256 of the run's ``model/model_state.pt`` bytes (two runs with one digest are one model)."""
    digest = hashlib.sha256()
    with open(RunDir(trained.run_dir).model_state, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_duplicate_members(refs: Sequence[str], members: Sequence[Any]) -> None:
    """:class:`~medtricks.errors.ConfigError` naming both runs when one run is given twice (same folder or
    run id) or two runs hold the same model (identical ``model_state.pt`` bytes, e.g. a copied folder):
    the "mean of 2" would be one model counted twice."""
    seen: dict[Any, str] = {}
    for ref, trained in zip(refs, members):
        run_dir = os.path.realpath(trained.run_dir) if trained.run_dir is not None else None
        keys = [("run", run_dir), ("id", trained.run_id), ("model", _model_digest(trained))]
        for kind, value in keys:
            if value is None:
                continue
            if (kind, value) in seen:
                first = seen[(kind, value)]
                why = (
                    "are the same run"
                    if kind != "model"
                    else "hold the same model (identical model/model_state.pt bytes)"
                )
                raise ConfigError(
                    f"runs {first} and {ref} {why}: an ensemble of one model counted twice is not "
                    "an ensemble; give distinct runs"
                )
            seen[(kind, value)] = ref


def ensemble_threshold(
    members: Sequence[Any], rules: Sequence[Any], *, tracking_uri: Optional[str] = None
) -> tuple[float, str, str, Optional[Any]]:
    """The ensemble's decision threshold for binary members: ``(threshold, source, note, operating_point)``.

    ``source`` is ``"ensemble-val"`` (chosen on the members' averaged validation predictions, when
    every member saved them for the same validation images) or ``"members-mean"`` (the mean of the
    members' thresholds in ``rules``; ``note`` says why validation could not be used).
    """
    mean = float(np.mean([r.threshold for r in rules]))
    no_stored = [_name(t) for t, r in zip(members, rules) if r.source != "stored"]
    fallback = f"mean of the members' stored thresholds, {mean:.4f}" + (
        f" (no stored operating point, counted as 0.5: {', '.join(no_stored)})" if no_stored else ""
    )

    def fall_back(why: str):
        return mean, "members-mean", f"{fallback}; not chosen on validation: {why}", None

    settings = {_data_settings(t) for t in members}
    if len(settings) > 1:
        return fall_back("the members were trained with different data or split settings (other validation images)")
    val = []
    for trained in members:
        preds = run_file(trained, RunDir.predictions_artifact("val"), load_predictions, tracking_uri)
        if preds is None:
            run = RunDir(trained.run_dir)
            return fall_back(f"run {_name(trained)} saved no {run.predictions('val').relative_to(run.path).as_posix()}")
        val.append(preds)
    y_val = val[0][0]
    if any(len(y) != len(y_val) or not np.array_equal(y, y_val) for y, _ in val):
        return fall_back("the members' validation predictions hold different labels (other images)")
    ops = [load_operating_point(t.run_dir) for t in members]
    methods = {(op.method, op.target_sensitivity) for op in ops if op is not None}
    method, target = methods.pop() if len(methods) == 1 and None not in ops else ("youden", None)
    if method not in ("youden", "sensitivity"):
        method, target = "youden", None
    try:
        op = select_threshold(
            y_val,
            np.mean([p for _, p in val], axis=0),
            method=method,
            target_sensitivity=target,
            positive_index=rules[0].positive_index,
        )
    except ValueError as err:
        return fall_back(str(err))
    return (
        op.threshold,
        "ensemble-val",
        (f"{op.describe()}, chosen on the mean of the members' validation predictions ({len(y_val)} images)"),
        op,
    )


def ensemble_runs(
    refs: Sequence[str],
    *,
    card: str,
    root: str,
    split: str = "all",
    tta: Any = "none",
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
) -> EnsembleReport:
    """Evaluate the mean of several trained runs' softmax probabilities on a card's data.

    Args:
        refs: two or more run folders, model files or run ids (of the local run store under ``runs_dir``,
            default ``runs``, or of MLflow at ``tracking_uri``) with the same classes.
        card, root, split: the evaluation data (``all`` images, or the card's ``test``/``val`` split;
            a split must hold the same images for every member, i.e. the same split settings).
        tta: ``"none"`` (default) or ``"flip"``: every member averages with the horizontally mirrored image
            (opt-in, with a warning: see :func:`medtricks.posthoc.tta.resolve_tta`).
        prevalence: binary models: prior-shift the ensemble (from the mean of the members' training
            priors) and every member to this positive-class prevalence before thresholding.
        log: log the ensemble like an evaluation (``eval/<m>``, ``eval/op/<m>``, plots, predictions)
            to a new run tagged ``medtricks.kind=ensemble`` in the run store of the first member's
            ``tracking.backend`` (MLflow, or the local run store); ``medtricks compare`` reads it.

    Raises:
        ValueError: fewer than two runs, different classes, or different images (lists or order).
    """
    tta = resolve_tta(tta) == "flip"
    refs = [str(r) for r in refs]
    if len(refs) < 2:
        raise ConfigError(f"an ensemble needs at least two runs, got {len(refs)}: {refs}")
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}")
    dev = resolve_device(device)
    members = [load_trained(r, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir) for r in refs]
    refuse_duplicate_members(refs, members)
    classes = list(members[0].classes)
    for ref, trained in zip(refs[1:], members[1:]):
        if list(trained.classes) != classes:
            raise ConfigError(
                f"run {ref} predicts classes {trained.classes} but run {refs[0]} predicts {classes}: "
                "ensemble members must have the same classes in the same order"
            )
    # Rules first: a bad --prevalence (a member without training priors) fails before any prediction.
    rules = [
        resolve_decision_rule(t, threshold="stored", prevalence=prevalence, tracking_uri=tracking_uri) for t in members
    ]

    datasets = []
    for ref, trained in zip(refs, members):
        dataset, _ = eval_dataset(trained, card, root, split=split, progress=progress, class_map_option=None)
        datasets.append(dataset)
    paths0 = [str(Path(p).resolve()) for p in datasets[0].manifest["path"]]
    for ref, dataset in zip(refs[1:], datasets[1:]):
        paths = [str(Path(p).resolve()) for p in dataset.manifest["path"]]
        if paths != paths0:
            where = (
                f"{len(paths)} vs {len(paths0)} images"
                if len(paths) != len(paths0)
                else f"same count, first difference at position {next(i for i, (a, b) in enumerate(zip(paths, paths0)) if a != b)}"
            )
            hint = (
                (
                    f"; members split the card differently (data.split_seed / val_fraction / test_fraction), so one "
                    f"member's {split} images may be another's training images: use --split all on data none of them "
                    "trained on"
                )
                if split != "all"
                else ""
            )
            raise ConfigError(f"run {ref} sees other images of {root} ({split}) than run {refs[0]} ({where}){hint}")

    card_name = load_card(card).name
    warns = [w for w in map(flip_tta_warning, members) if w] if tta else []
    overlap_notes, overlap_tags = [], []
    for trained, dataset in zip(members, datasets):  # evaluate's check, per member: data it trained or selected on
        overlap = split_overlap(trained, dataset.manifest, root, tracking_uri)
        if overlap is not None:
            more, notes = overlap.messages(synthetic=card_name == "synthetic-phantoms")
            warns += [f"member {_name(trained)}: {w}" for w in more]
            overlap_notes += [f"member {_name(trained)}: {n}" for n in notes]
            overlap_tags.append(f"{_name(trained)}: {overlap.summary() or 'none'}")
    warns = list(dict.fromkeys(warns))
    for text in warns:
        print(f"warning: {text}", flush=True)
    outputs = []
    for trained, dataset in zip(members, datasets):
        model = FlipTTA(trained.model) if tta else trained.model
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=trained.recipe.data.num_workers)
        outputs.append(predict(model, loader, device=dev, progress=progress, desc=f"ensemble {_name(trained)}"))
    y = outputs[0][0]
    for ref, (targets, _, _) in zip(refs[1:], outputs[1:]):
        if not np.array_equal(targets, y):  # same paths but another label reading: a card/label_map issue
            raise ConfigError(f"run {ref} reads other labels for the same images than run {refs[0]}")
    mean_probs = np.mean([probs for _, probs, _ in outputs], axis=0)
    image_set = image_set_digest(datasets[0], root)

    ensemble_rule, note = None, ""
    if len(classes) == 2:
        threshold, source, note, _ = ensemble_threshold(members, rules, tracking_uri=tracking_uri)
        if tta and source == "ensemble-val":
            note += " (validation predictions are without flip TTA)"
        ensemble_rule = DecisionRule(
            threshold=threshold, source=source, description=note, positive_index=rules[0].positive_index
        )
        if prevalence is not None:
            ensemble_rule.prevalence = float(prevalence)
            ensemble_rule.train_priors = list(np.mean([r.train_priors for r in rules], axis=0))
            ensemble_rule.priors_source = "the mean of the members' training priors"
    member_reports = [
        summarize_predictions(
            y,
            probs,
            classes,
            rule=rule,
            split=split,
            n_bootstrap=n_bootstrap,
            ci=ci,
            seed=seed,
            source_run=t.run_id,
            figures=False,
            loss=loss,
            image_set=image_set,
        )
        for t, rule, (_, probs, loss) in zip(members, rules, outputs)
    ]
    ensemble = summarize_predictions(
        y,
        mean_probs,
        classes,
        rule=ensemble_rule,
        split=split,
        n_bootstrap=n_bootstrap,
        ci=ci,
        seed=seed,
        figures=log,
        image_set=image_set,
    )
    deltas = [
        paired_bootstrap_delta(y, mean_probs, probs, "auroc", n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        for _, probs, _ in outputs
    ]
    ensemble.warnings = warns
    ensemble.notes.extend(overlap_notes)
    report = EnsembleReport(
        ensemble=ensemble,
        members=member_reports,
        member_names=[_name(t) for t in members],
        classes=classes,
        card=card_name,
        split=split,
        tta=tta,
        threshold_note=note,
        deltas=deltas,
    )
    if log:
        first = members[0].recipe
        store = posthoc_store(members[0], tracking_uri, runs_dir)
        report.logged_to = store.describe()
        report.run_id = log_evaluation(
            ensemble,
            uri=tracking_uri or first.tracking.uri,
            store=store,
            experiment=first.tracking.experiment or first.experiment.name,
            run_name=f"ensemble-{card_name}-{split}{'-tta' if tta else ''}",
            tags={
                "medtricks.kind": "ensemble",
                "medtricks.ensemble_members": ",".join(str(t.run_id) for t in members),
                **({"medtricks.overlap": " | ".join(overlap_tags)[:5000]} if overlap_tags else {}),
            },
            params={
                "card": card_name,
                "root": folder_id(root),
                "split": split,
                "tta": "flip" if tta else "none",
                "n_bootstrap": n_bootstrap,
                "seed": seed,
                "n_members": len(members),
                "members": ",".join(str(t.run_id) for t in members),
                "member_dirs": ",".join(str(t.run_dir) for t in members),
            },
            texts={"ensemble/report.md": redact_paths(report.table(), root) + "\n"},
        )
    return report
