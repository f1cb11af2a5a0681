"""Work on an already trained run: evaluate it on any dataset a card describes, audit it.

Orchestration like :mod:`medtricks.run` (it knows data, models, evaluate, audit and tracking);
split out so run.py stays about training.

    from medtricks.posthoc import evaluate_trained
    report = evaluate_trained("runs/quickstart/20261123-101500-a1b2c3", card="synthetic-phantoms",
                              root="data/phantoms", split="val")
    print(report.metrics.table())
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from medtricks.audit import run_audit
from medtricks.audit.shortcut import run_shortcut_audit
from medtricks.data import build_eval_dataset, folder_id, load_card, redact_paths
from medtricks.data.class_map import parse_class_map
from medtricks.data.manifest import content_id, image_id, patient_salt
from medtricks.deploy.fit import apply_temperature
from medtricks.deploy.profiles import load_site_profile, site_profile_path
from medtricks.errors import ConfigError, MissingFileError
from medtricks.evaluate.drop import PerformanceDrop, performance_drop, unpaired_bootstrap_delta
from medtricks.evaluate.metrics import compute_metrics
from medtricks.evaluate.operating_point import (OPERATING_POINT_FILE, OperatingPoint, class_priors, parse_threshold,
                                                prior_shift, probs_at_threshold, select_threshold)
from medtricks.evaluate.paired import load_predictions
from medtricks.evaluate.plots import plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
from medtricks.rundir import PREDICTIONS_ARTIFACT_DIR, PREDICTIONS_EVAL_FILE, RunDir
from medtricks.tracking import create_store
from medtricks.train import predict as predict_loader, resolve_device  # `predict` is the submodule here
from medtricks.posthoc.load import load_trained

__all__ = ["EvaluationReport", "evaluate_trained", "FlipTTA", "eval_dataset", "AuditReport", "audit_trained",
           "audit_model", "log_audit", "parse_eps", "DecisionRule", "resolve_decision_rule", "load_operating_point",
           "unpaired_bootstrap_delta", "performance_drop", "PerformanceDrop", "summarize_predictions",
           "log_evaluation", "image_set_digest", "PREDICTIONS_EVAL_FILE", "posthoc_store", "resolve_tta",
           "flip_tta_warning", "TTA_MODES", "SplitOverlap", "split_overlap"]

# --tta: "none" (default) or "flip". A bare --tta / tta=True is refused: flipping a chest X-ray is not harmless.
TTA_MODES = ("none", "flip")
_FLIPPING_PRESETS = ("paper_baseline",)  # data.augment presets whose training flips images horizontally
_FLIP_EXPLAINED = ("a horizontal flip mirrors the chest: the heart and aortic arch move to the right, the liver "
                   "to the left, and any L/R marker reads backwards; the chest X-ray presets (cxr_light, "
                   "cxr_shift) never flip in training, so the model has not seen mirrored X-rays")


def resolve_tta(tta: Any) -> str:
    """``"none"`` or ``"flip"`` from a ``--tta`` value. ``None``/``False``/``"none"`` mean none; flip TTA
    must be asked for by name (``"flip"``): ``True`` or a bare ``--tta`` is a :class:`ConfigError` that
    explains why."""
    if tta is None or tta is False or (isinstance(tta, str) and tta.strip().lower() == "none"):
        return "none"
    if isinstance(tta, str) and tta.strip().lower() == "flip":
        return "flip"
    given = "a bare --tta" if tta is True or tta == "" else f"--tta {tta!r}"
    raise ConfigError(f"{given}: say which test-time augmentation: 'none' (the default) or 'flip' (the mean of "
                      f"each image and its horizontal mirror). Flip is opt-in because {_FLIP_EXPLAINED}; "
                      "use --tta flip (tta='flip') only if you mean it, and compare it with --tta none")


def flip_tta_warning(trained) -> Optional[str]:
    """The warning ``evaluate``/``ensemble`` print with ``--tta flip`` for a model trained without flips."""
    preset = trained.recipe.data.augment
    if preset in _FLIPPING_PRESETS:
        return None
    return (f"--tta flip averages every prediction with the mirrored X-ray, but {_FLIP_EXPLAINED} "
            f"(this run trained with data.augment={preset}); compare with --tta none before trusting it")


class FlipTTA(nn.Module):
    """Test-time augmentation: mean softmax of the image and its horizontal flip (returned as log-probs,
    so a softmax on top gives the averaged probabilities). For chest X-rays the flip mirrors the anatomy
    (heart on the right), which models trained with the X-ray presets never saw: ``evaluate`` and
    ``ensemble`` use it only with ``--tta flip`` and warn (:func:`resolve_tta`, :func:`flip_tta_warning`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x).float(), dim=1) + torch.softmax(self.model(x.flip(-1)).float(), dim=1)
        return torch.log(probs / 2)


def eval_dataset(trained, card, root, *, split: str = "all", split_seed: Optional[int] = None,
                 val_fraction: Optional[float] = None, test_fraction: Optional[float] = None,
                 on_bad_image: str = "error", progress: bool = True, class_map=None,
                 skip_hint: Optional[str] = None, class_map_option: Optional[str] = "--class-map"):
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
        card, root, image_size=recipe.input_image_size(), mean=tuple(trained.data_config["mean"]),
        std=tuple(trained.data_config["std"]), in_chans=recipe.model.in_chans, augment=recipe.data.augment,
        split=split, split_seed=recipe.data.split_seed if split_seed is None else split_seed,
        val_fraction=recipe.data.val_fraction if val_fraction is None else val_fraction,
        test_fraction=recipe.data.test_fraction if test_fraction is None else test_fraction,
        test_by=recipe.data.test_by, on_bad_image=on_bad_image, progress=progress,
        classes=list(trained.classes), class_map=mapping, skip_hint=skip_hint, class_map_option=class_map_option)
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
        defined = "sensitivity" if len(classes) == 2 and present[0] == 1 else "specificity" if len(classes) == 2 \
            else f"recall of {only!r}"
        notes.append(f"the evaluation set holds only class {only!r}: AUROC, balanced accuracy and the other class's "
                     f"rate are undefined (shown as nan); only {defined} (= accuracy here) means something")
    return notes


# Per-image predictions of an evaluation: y_true (N,), probs (N, K) and, for binary models, probs_op
# (N, 2: argmax = the decision at the operating point) and image_set (a digest of the ordered image
# list). No file names, no patient IDs. Logged as the artifact predictions/predictions_eval.npz
# (PREDICTIONS_EVAL_FILE and PREDICTIONS_ARTIFACT_DIR come from medtricks.rundir).


# ------------------------------------------------------------------------------ operating points
@dataclass
class DecisionRule:
    """How a binary model decides at its operating point: an optional prior shift, then a threshold.

    ``apply(probs)`` returns probabilities whose ``argmax`` is that decision (odds reweighting, see
    :func:`medtricks.evaluate.operating_point.probs_at_threshold`), so ``compute_metrics`` on them gives
    every decision metric at the operating point; AUROC is unchanged (both steps are monotone).
    """

    threshold: float
    source: str  # "stored" (the run's model/operating_point.json) | "default" (0.5, none stored) | "given"
    description: str
    positive_index: int = 1
    prevalence: Optional[float] = None  # deployment prevalence of classes[positive_index]
    train_priors: Optional[list[float]] = None
    priors_source: Optional[str] = None
    temperature: float = 1.0  # a site profile's temperature, applied before the shift and the threshold
    site: Optional[str] = None  # the site profile this rule comes from (``--site``)

    def calibrate(self, probs: Any) -> np.ndarray:
        """``probs`` temperature-scaled (a site profile's temperature; unchanged at 1)."""
        return apply_temperature(probs, self.temperature)

    def shift(self, probs: Any) -> np.ndarray:
        """``probs`` moved from the training priors to ``prevalence`` (unchanged without one)."""
        p = np.asarray(probs, dtype=np.float64)
        if self.prevalence is None:
            return p
        target = [1.0 - self.prevalence] * 2
        target[self.positive_index] = self.prevalence
        return prior_shift(p, self.train_priors, target)

    def apply(self, probs: Any, *, shift: bool = True) -> np.ndarray:
        """Probabilities whose argmax is the decision; ``shift=False`` skips the prior shift (for data
        at the training prevalence, such as the run's own test split)."""
        p = self.calibrate(probs)
        p = self.shift(p) if shift else p
        return probs_at_threshold(p, self.threshold, positive_index=self.positive_index)

    def describe(self) -> str:
        text = self.description
        if self.prevalence is not None:
            pi = self.train_priors[self.positive_index]
            text += (f"; posteriors first shifted from the training prevalence {pi:.3f} to {self.prevalence:.3f} "
                     f"(Saerens et al. 2002; priors from {self.priors_source})")
        return text


def load_operating_point(run_dir: Optional[str | Path]):
    """The run's stored :class:`~medtricks.evaluate.operating_point.OperatingPoint`, or ``None`` (runs
    trained before operating points were stored have no ``model/operating_point.json``)."""
    if run_dir is None:
        return None
    path = RunDir(run_dir).operating_point
    return OperatingPoint.from_json(path) if path.is_file() else None


def _run_file(trained, artifact: str, read, tracking_uri: Optional[str] = None):
    """``read(path)`` of a file of the trained run: the run folder's copy of the store artifact
    ``artifact`` (``RunDir.artifact_for``), else that artifact from the store the run was found in
    (runs given by id may live only in MLflow); ``None`` if neither."""
    run = RunDir(trained.run_dir) if trained.run_dir is not None else None
    if run is not None and run.artifact_for(artifact).is_file():
        return read(run.artifact_for(artifact))
    # A real run folder (state.json) is the whole truth; only a copy downloaded from a store (recipe and
    # model only) sends us to the store, so --no-log never touches (or creates) a tracking database.
    if not trained.run_id or (run is not None and run.state_file.is_file()):
        return None
    store = getattr(trained, "store", None)
    if store is None and trained.recipe.tracking.backend == "mlflow":
        store = create_store("mlflow", tracking_uri or trained.recipe.tracking.uri)
    if store is None:
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="medtricks-run-file-") as tmp:
        try:
            path = store.download_artifact(trained.run_id, artifact, tmp)
        except Exception:  # noqa: BLE001 - another store, or no tracking at all: treat as absent
            return None
        return None if path is None else read(path)


def posthoc_store(trained, tracking_uri: Optional[str] = None, runs_dir: Optional[str | Path] = None):
    """The run store that results about ``trained`` (evaluations, audits, ensembles) are logged to: the
    backend of the run's own recipe. MLflow at ``tracking_uri`` (else the recipe's URI); for
    ``tracking.backend: none`` the local store rooted at ``runs_dir``, else where the run folder lives
    (its ``experiment.output_dir``), else the recipe's ``experiment.output_dir``."""
    recipe = trained.recipe
    if recipe.tracking.backend == "mlflow":
        return create_store("mlflow", tracking_uri or recipe.tracking.uri)
    if runs_dir is None and trained.run_dir is not None and RunDir(trained.run_dir).state_file.is_file():
        runs_dir = RunDir(trained.run_dir).output_dir
    return create_store(recipe.tracking.backend, root=runs_dir if runs_dir is not None else recipe.experiment.output_dir)


def start_posthoc_run(store, trained, *, kind: str, tags: dict[str, str]) -> str:
    """Open the run that a result about ``trained`` is logged to: the trained run itself when ``store``
    holds it, else a new run named ``<kind>-<experiment>`` in the run's experiment, tagged with ``tags``
    and ``medtricks.kind``. Returns its id; the caller ends it."""
    recipe = trained.recipe
    if trained.run_id and store.run_exists(trained.run_id):
        return store.start(experiment="", run_name="", tags={}, resume_run_id=trained.run_id)
    return store.start(experiment=recipe.tracking.experiment or recipe.experiment.name,
                       run_name=f"{kind}-{recipe.experiment.name}", tags={**tags, "medtricks.kind": kind})


def _train_priors_from_manifest(trained, tracking_uri: Optional[str]) -> Optional[list[float]]:
    """Class frequencies of the run's training split, from its logged split manifest."""
    import pandas as pd

    frame = _run_file(trained, RunDir.manifest_artifact(), pd.read_csv, tracking_uri)
    if frame is None or not {"split", "target"} <= set(frame.columns):
        return None
    train = frame.loc[frame["split"] == "train", "target"]
    return class_priors(train.to_numpy(), len(trained.classes)) if len(train) else None


def resolve_decision_rule(trained, *, threshold: Any = "stored", prevalence: Optional[float] = None,
                          tracking_uri: Optional[str] = None, site: Optional[str] = None,
                          runs_dir: Optional[str | Path] = None) -> Optional[DecisionRule]:
    """The operating point ``evaluate`` applies to a trained run; ``None`` for multiclass models.

    ``threshold``: ``"stored"`` (the run's ``model/operating_point.json``; 0.5 when the run has none,
    which the rule's description says), ``"youden"`` or ``"sens=0.95"`` (chosen again with
    :func:`~medtricks.evaluate.operating_point.select_threshold` on the run's stored validation predictions,
    ``artifacts/predictions_val.npz``, from the run folder or its run store), or a number in (0, 1) such
    as ``0.5`` (:func:`~medtricks.evaluate.operating_point.parse_threshold`, as ``predict``). ``prevalence``: the
    deployment prevalence of the positive class ``classes[1]``; the posteriors are prior-shifted from
    the run's training priors (``train_priors`` of the operating point, else the training split of
    its ``artifacts/split_manifest.csv``) before thresholding. ``site``: the run's site profile of that
    name (``model/sites/<site>.json`` or its run store, :mod:`medtricks.deploy.profiles`): its temperature,
    threshold and prior shift; ``prevalence`` then moves from the profile's own prevalence.
    """
    name = trained.run_id or str(trained.run_dir)
    k = len(trained.classes)
    spec = "stored" if threshold is None else str(threshold).strip().lower()
    if site is not None:
        return _site_rule(trained, site, spec=spec, prevalence=prevalence, tracking_uri=tracking_uri, runs_dir=runs_dir)
    if k != 2:
        if spec != "stored":
            raise ConfigError(f"--threshold {threshold} applies to binary models; run {name} has {k} classes "
                             f"{trained.classes} (decisions are argmax)")
        if prevalence is not None:
            raise ConfigError(f"--prevalence applies to binary models; run {name} has {k} classes {trained.classes}")
        return None
    op = load_operating_point(trained.run_dir)
    positive = op.positive_index if op is not None else 1
    if spec == "stored":
        if op is None:
            rule = DecisionRule(threshold=0.5, source="default", positive_index=positive,
                                description=f"threshold 0.5: the run has no model/{OPERATING_POINT_FILE} "
                                            "(trained before operating points were stored)")
        else:
            rule = DecisionRule(threshold=float(op.threshold), source="stored", positive_index=positive,
                                description=f"{op.describe()}; stored in model/{OPERATING_POINT_FILE}")
    else:
        kind, value = parse_threshold(threshold)
        if kind == "given":
            rule = DecisionRule(threshold=value, source="given", positive_index=positive,
                                description=f"threshold {value:g} (given)")
        else:  # youden / sens=S: chosen again on the run's stored validation predictions
            val = _run_file(trained, RunDir.predictions_artifact("val"), load_predictions, tracking_uri)
            if val is None:
                raise MissingFileError(f"--threshold {threshold} is chosen on the run's validation predictions, but "
                                       f"run {name} has no {RunDir.predictions_artifact('val')} (in its folder or its "
                                       "run store); use --threshold stored or a number")
            chosen = select_threshold(*val, method=kind, target_sensitivity=value, positive_index=positive)
            rule = DecisionRule(threshold=float(chosen.threshold), source=chosen.method, positive_index=positive,
                                description=f"{chosen.describe()}; recomputed from the run's stored validation "
                                            "predictions")
    if prevalence is not None:
        value = _prevalence(prevalence)
        priors, source = (list(op.train_priors), f"model/{OPERATING_POINT_FILE}") if op is not None and op.train_priors \
            else (_train_priors_from_manifest(trained, tracking_uri), "the training split of artifacts/split_manifest.csv")
        if priors is None:
            raise ConfigError(f"--prevalence needs the class priors run {name} was trained with (train_priors in "
                             f"{trained.run_dir}/model/{OPERATING_POINT_FILE}, or its artifacts/split_manifest.csv); "
                             "this run has neither")
        if len(priors) != 2:
            raise ConfigError(f"train_priors of run {name} has {len(priors)} values {priors}; a binary model needs 2")
        rule.prevalence, rule.train_priors, rule.priors_source = value, [float(v) for v in priors], source
    return rule


def _prevalence(prevalence: Any) -> float:
    """``--prevalence`` as a number in (0, 1), or a one-line error."""
    try:
        value = float(prevalence)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ConfigError(f"--prevalence must be a number in (0, 1) (the positive class's share), got {prevalence!r}")
    return value


def _site_rule(trained, site: str, *, spec: str, prevalence: Optional[float], tracking_uri: Optional[str],
               runs_dir: Optional[str | Path]) -> DecisionRule:
    """The decision rule of the run's site profile ``site`` (see :func:`resolve_decision_rule`)."""
    name = trained.run_id or str(trained.run_dir)
    if len(trained.classes) != 2:
        raise ConfigError(f"--site applies to binary models; run {name} has {len(trained.classes)} classes")
    if spec != "stored":
        raise ConfigError(f"--site {site} brings its own threshold; leave out --threshold {spec}")
    local = trained.run_dir is not None and site_profile_path(trained.run_dir, site).is_file()
    store = None if local or not trained.run_id else posthoc_store(trained, tracking_uri, runs_dir)
    profile = load_site_profile(trained, site, store=store)
    rule = DecisionRule(threshold=float(profile.threshold), source="site", positive_index=profile.positive_index,
                        description=profile.describe(), temperature=float(profile.temperature), site=profile.name)
    if profile.shift_from and profile.prevalence is not None:
        rule.prevalence, rule.train_priors = float(profile.prevalence), [float(v) for v in profile.shift_from]
        rule.priors_source = f"site profile {profile.name!r}"
    if prevalence is not None:
        value = _prevalence(prevalence)
        base = rule.train_priors
        if base is None:  # calibrated on a labelled sample: the probabilities are at the sample's prevalence
            if profile.prevalence is None:
                raise ConfigError(f"--prevalence with --site {site}: the profile records no prevalence to shift from")
            pi = float(profile.prevalence)
            base = [1.0 - pi, pi] if profile.positive_index == 1 else [pi, 1.0 - pi]
        rule.prevalence, rule.train_priors = value, base
        rule.priors_source = f"site profile {profile.name!r}"
    return rule


# ------------------------------------------------------------------------ overlap with training
@dataclass
class SplitOverlap:
    """Evaluation images found in the trained run's split manifest, per split (``train``/``val``/``test``):
    ``images[split]``: evaluated images with identical bytes (or the same file) in that split;
    ``patients[split]``: evaluated patients (salted hashes) in that split."""

    n_images: int
    n_patients: int
    images: dict[str, int] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    by_bytes: bool = True  # False: the run's manifest predates content ids; files compared by path under one root

    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if self.images.get(s) or self.patients.get(s)]

    def summary(self) -> str:
        """``train: 40 images, 25 patients; val: 8 images, 5 patients`` ('' without overlap)."""
        return "; ".join(f"{s}: {self.images.get(s, 0)} images, {self.patients.get(s, 0)} patients"
                         for s in self.splits())

    def messages(self, synthetic: bool = False) -> tuple[list[str], list[str]]:
        """``(warnings, notes)``: overlap with train or val is a warning (those numbers are not from
        unseen data), with the run's own test split a note (it is the internal, not an external, test)."""
        warns, notes = [], []
        how = "identical bytes" if self.by_bytes else "the same files"
        for split in self.splits():
            text = (f"{self.images.get(split, 0)} of {self.n_images} evaluated images ({how}) and "
                    f"{self.patients.get(split, 0)} of {self.n_patients} patients are in the run's {split} split "
                    "(its artifacts/split_manifest.csv)")
            if split == "test":
                notes.append(f"{text}: this is the run's own held-out test data, not an external set")
                continue
            why = ("the model was trained on them" if split == "train" else
                   "they chose the model's checkpoint and operating point")
            hint = ("; `medtricks data synth` with the same --n/--size/--seed redraws the run's own phantoms: use "
                    "another --seed for an independent set" if synthetic else "")
            warns.append(f"{text}: {why}, so these metrics overstate performance on unseen data{hint}")
        return warns, notes


def split_overlap(trained, manifest, root, tracking_uri: Optional[str] = None) -> Optional[SplitOverlap]:
    """How much of an evaluation set (``manifest``: the eval dataset's rows, with hashed ``patient`` and the
    image scan's ``content_hash``) the trained run saw: compared with its ``artifacts/split_manifest.csv``
    (read with :func:`_run_file`), by salted content ids (identical bytes) and salted patient hashes —
    the same salt (:func:`~medtricks.data.manifest.patient_salt`) as the run's, so this works on the
    machine that trained it (or with a shared ``MEDTRICKS_PATIENT_SALT``). Patient hashes include the
    card name, so patients match under the same card. Runs whose manifest has no ``content_id`` are
    compared by file (same data root) instead. ``None`` when the run kept no split manifest."""
    import pandas as pd

    frame = _run_file(trained, RunDir.manifest_artifact(), pd.read_csv, tracking_uri)
    if frame is None or "split" not in frame.columns:
        return None
    salt = patient_salt()
    eval_patients = manifest["patient"].astype(str) if "patient" in manifest.columns else pd.Series([], dtype=str)
    by_bytes = "content_id" in frame.columns and "content_hash" in manifest.columns
    if by_bytes:
        eval_keys = [content_id(h, salt) if isinstance(h, str) else None for h in manifest["content_hash"]]
        run_keys = frame["content_id"]
    else:
        eval_keys, run_keys = [None] * len(manifest), pd.Series([None] * len(frame))
        try:
            same_root = Path(root).expanduser().resolve() == Path(trained.recipe.data.root).expanduser().resolve()
        except (OSError, RuntimeError):
            same_root = False
        if same_root and "image_id" in frame.columns:
            base = Path(root).expanduser().resolve()
            eval_keys = []
            for p in manifest["path"]:
                try:
                    eval_keys.append(image_id(Path(p).resolve().relative_to(base).as_posix(), salt))
                except ValueError:
                    eval_keys.append(None)
            run_keys = frame["image_id"]
    overlap = SplitOverlap(n_images=len(manifest), n_patients=int(eval_patients.nunique()), by_bytes=by_bytes)
    for split in ("train", "val", "test"):
        rows = frame["split"] == split
        if not rows.any():
            continue
        keys = set(run_keys[rows].dropna().astype(str))
        patients = set(frame.loc[rows, "patient"].astype(str)) if "patient" in frame.columns else set()
        n_img = sum(1 for k in eval_keys if k is not None and k in keys)
        n_pat = int(eval_patients[eval_patients.isin(patients)].nunique())
        if n_img:
            overlap.images[split] = n_img
        if n_pat:
            overlap.patients[split] = n_pat
    return overlap


# ----------------------------------------------------------------------------------- evaluation
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
            parts.append(self.metrics_op.table(title=f"at the operating point: {self.rule.describe()}",
                                               ci_note=not same))
        if self.drop is not None:
            parts.append(self.drop.table())
        if self.warnings or self.notes:
            parts.append("notes:\n" + "\n".join([*(f"- WARNING: {w}" for w in self.warnings),
                                                  *(f"- {n}" for n in self.notes)]))
        return "\n\n".join(parts)

    def to_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The flat dict logged to MLflow: ``eval/<m>``, ``eval/op/<m>``, ``eval/drop/<m>`` (+ CIs)."""
        flat = {f"{prefix}{k}": float(v) for k, v in self.metrics.to_dict().items() if isinstance(v, (int, float))}
        if self.loss is not None:
            flat[f"{prefix}loss"] = float(self.loss)
        if self.metrics_op is not None:
            flat.update({f"{prefix}op/{k}": float(v) for k, v in self.metrics_op.to_dict().items()
                         if isinstance(v, (int, float))})
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
    import hashlib

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


def summarize_predictions(y_true: Any, probs: Any, classes: list[str], *, rule: Optional[DecisionRule] = None,
                          split: str = "all", n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
                          source_run: Optional[str] = None, figures: bool = True,
                          loss: Optional[float] = None, image_set: Optional[str] = None) -> EvaluationReport:
    """An :class:`EvaluationReport` from predictions: metrics with CIs at 0.5 and, with ``rule``, at the
    operating point; confusion matrix / ROC / reliability figures unless ``figures=False``."""
    y, probs = np.asarray(y_true).astype(int), np.asarray(probs, dtype=np.float64)
    metrics = compute_metrics(y, probs, classes, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    report = EvaluationReport(metrics=metrics, split=split, n_images=len(y), source_run=source_run, rule=rule,
                              y_true=y, probs=probs, image_set=image_set, loss=loss)
    if rule is not None:
        report.probs_op = rule.apply(probs)
        report.metrics_op = _without_ece(compute_metrics(y, report.probs_op, classes, n_bootstrap=n_bootstrap,
                                                         ci=ci, seed=seed))
    if figures:
        report.figures = {"plots/confusion_matrix.png": plot_confusion_matrix(y, probs.argmax(1), classes),
                          "plots/roc.png": plot_roc_curves(y, probs, classes),
                          "plots/reliability.png": plot_reliability_diagram(y, probs)}
        if rule is not None:
            report.figures["plots/confusion_matrix_op.png"] = plot_confusion_matrix(y, report.probs_op.argmax(1), classes)
    return report


def _internal_test_predictions(trained, tracking_uri: Optional[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    return _run_file(trained, RunDir.predictions_artifact("test"), load_predictions, tracking_uri)


def log_evaluation(report: EvaluationReport, *, uri: Optional[str], experiment: str, run_name: str,
                   tags: dict[str, str], params: dict[str, Any], parent_run_id: Optional[str] = None,
                   texts: Optional[dict[str, str]] = None, store=None) -> Optional[str]:
    """A new evaluation run in ``store`` (default: MLflow at ``uri``): params, ``report.to_metrics()``,
    figures, ``texts`` (artifact name → text) and the per-image predictions
    (``predictions/predictions_eval.npz``). Returns its run id."""
    import tempfile

    if store is None:
        store = create_store("mlflow", uri)
    tracker = store
    tags = {"medtricks.role": tags.get("medtricks.kind", "evaluation"), **tags}  # evaluation, ensemble
    run_id = tracker.start(experiment=experiment, run_name=run_name, tags=tags,
                           parent_run_id=parent_run_id if parent_run_id and tracker.run_exists(parent_run_id) else None)
    rule = report.rule
    tracker.log_params({**params, "n_images": report.n_images, "eval.ci": report.metrics.ci_level,
                        "image_set": report.image_set,
                        "threshold": rule.threshold if rule else "argmax",
                        "threshold_source": rule.source if rule else "argmax",
                        "prevalence": rule.prevalence if rule else None,
                        "train_priors": ",".join(f"{v:.6g}" for v in rule.train_priors) if rule and rule.train_priors else None})
    tracker.log_metrics(report.to_metrics(), step=0)
    for name, figure in report.figures.items():
        tracker.log_figure(figure, name)
    for name, text in (texts or {}).items():
        tracker.log_text(text, name)
    with tempfile.TemporaryDirectory(prefix="medtricks-eval-") as tmp:
        tracker.log_artifact(report.save_predictions(Path(tmp) / PREDICTIONS_EVAL_FILE), PREDICTIONS_ARTIFACT_DIR)
    tracker.end()
    return run_id


def evaluate_trained(ref: str, *, card: str, root: str, split: str = "all", tta: Any = "none",
                     threshold: Any = "stored", prevalence: Optional[float] = None,
                     n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0, batch_size: int = 64,
                     tracking_uri: Optional[str] = None, log: bool = True, device: str = "auto",
                     progress: bool = True, runs_dir: Optional[str | Path] = None,
                     class_map: Any = None, site: Optional[str] = None,
                     on_bad_image: str = "error") -> EvaluationReport:
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
    rule = resolve_decision_rule(trained, threshold=threshold, prevalence=prevalence, tracking_uri=tracking_uri,
                                 site=site, runs_dir=runs_dir)
    dataset, quarantine = eval_dataset(trained, card, root, split=split, progress=progress, class_map=class_map,
                                       on_bad_image=on_bad_image,
                                       skip_hint="pass --on-bad-image skip (on_bad_image='skip' in Python)")
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
    report = summarize_predictions(targets, probs, trained.classes, rule=rule, split=split, n_bootstrap=n_bootstrap,
                                   ci=ci, seed=seed, source_run=trained.run_id, loss=loss,
                                   image_set=image_set_digest(dataset, root))
    report.warnings, report.overlap = warns, overlap
    report.notes.extend(overlap_notes)
    report.notes.extend(class_map_notes(dataset, targets, trained.classes))
    if rule is not None and rule.source == "default":
        report.notes.append(rule.description)
    internal = _internal_test_predictions(trained, tracking_uri)
    if internal is None:
        report.notes.append("no drop vs the internal test split: the run saved no artifacts/predictions_test.npz "
                            "(trained without a test split, data.test_fraction 0)")
    else:
        y_int, p_int = internal
        # Same decision rule on both sets; the internal split is at the training prevalence: no shift.
        p_int = rule.apply(p_int, shift=False) if rule is not None else p_int
        p_ext = report.probs_op if rule is not None else report.probs
        report.drop = performance_drop(y_int, p_int, targets, p_ext, trained.classes, n_bootstrap=n_bootstrap,
                                       ci=ci, seed=seed, rule=f"threshold {rule.threshold:.4f}" if rule else "argmax")
    if log:
        store = posthoc_store(trained, tracking_uri, runs_dir)
        report.logged_to = store.describe()
        tags = {"medtricks.evaluated_run": str(trained.run_id), "medtricks.kind": "evaluation"}
        if overlap is not None:
            tags["medtricks.overlap"] = overlap.summary() or "none"
        if report.warnings or report.notes:  # the run's description in the MLflow UI; data paths hashed
            tags["mlflow.note.content"] = redact_paths("\n".join([*(f"WARNING: {w}" for w in report.warnings),
                                                                   *report.notes]), root)[:5000]
        report.run_id = log_evaluation(
            report, uri=tracking_uri or trained.recipe.tracking.uri, store=store,
            experiment=trained.recipe.tracking.experiment or trained.recipe.experiment.name,
            run_name=f"eval-{card_name}-{split}{'-tta' if tta == 'flip' else ''}", parent_run_id=trained.run_id,
            tags=tags,
            params={"card": card_name, "root": folder_id(root), "split": split, "tta": tta,
                    "n_bootstrap": n_bootstrap, "seed": seed, "source_run": str(trained.run_id), "site": site,
                    "source_run_dir": str(trained.run_dir), "n_quarantined": len(quarantine)})
    return report


# ------------------------------------------------------------------------------------------ audit
@dataclass
class AuditReport:
    result: Any  # medtricks.audit.AuditResult
    table: str
    run_id: Optional[str] = None
    n_images: int = 0
    logged_to: Optional[str] = None  # the run store of run_id, in words


def parse_eps(text: str) -> list[float]:
    """``"0,0.5/255,1/255"`` → floats; fractions allowed so ε can be written in 1/255 units."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps: {part!r} is not a number or a fraction like 2/255") from None
    return values


def audit_model(model: nn.Module, dataset, *, audit_cfg, classes, data_config, device, seed: int = 0,
                surrogate: Optional[nn.Module] = None, progress: bool = True, batch_size: int = 32,
                attacks=None, eps=None, corruptions=None, n: Optional[int] = None, target_class=None):
    """Run :func:`medtricks.audit.run_audit` as the recipe's ``audit`` section says (arguments override)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return run_audit(model, loader, classes=classes, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                     attacks=audit_cfg.attacks if attacks is None else attacks, eps=list(eps if eps is not None else audit_cfg.eps),
                     pgd_steps=audit_cfg.pgd_steps, corruptions=audit_cfg.corruptions if corruptions is None else corruptions,
                     severities=audit_cfg.severities, n=n or audit_cfg.n, surrogate=surrogate, device=device,
                     target_class=target_class if target_class is not None else audit_cfg.target_class,
                     n_bootstrap=audit_cfg.n_bootstrap, seed=seed, progress=progress,
                     square_queries=audit_cfg.square_queries, masking=audit_cfg.masking_checks)


def shortcut_audit_model(model: nn.Module, dataset, *, audit_cfg, classes, data_config, device, seed: int = 0,
                         progress: bool = True, batch_size: int = 32, n: Optional[int] = None):
    """Run :func:`medtricks.audit.shortcut.run_shortcut_audit` as the recipe's ``audit`` section says."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return run_shortcut_audit(model, loader, classes=classes, mean=tuple(data_config["mean"]),
                              std=tuple(data_config["std"]), n=n or audit_cfg.n, border=audit_cfg.shortcut_border,
                              n_bootstrap=audit_cfg.n_bootstrap, seed=seed, device=device, progress=progress)


def log_shortcut(tracker, result) -> None:
    """Shortcut-audit metrics (``audit/shortcut/...``), its JSON report and the Grad-CAM overlay PNGs."""
    tracker.log_metrics(result.metrics, step=0)
    tracker.log_text(result.to_json(), "audit/shortcut/report.json")
    tracker.log_text(result.table() + "\n", "audit/shortcut/summary.txt")
    if result.overlays:
        with tempfile.TemporaryDirectory(prefix="medtricks-shortcut-") as folder:
            for name, rgb in result.overlays.items():
                path = Path(folder) / f"gradcam_{name}.png"
                Image.fromarray(rgb).save(path)
                tracker.log_artifact(path, "audit/shortcut")


def log_audit(tracker, result) -> None:
    """Audit metrics, the JSON report and the PNG plots onto the tracker's current run."""
    tracker.log_metrics(result.metrics, step=0)
    tracker.log_text(result.to_json(), "audit/report.json")
    for name, figure in result.figures().items():
        tracker.log_figure(figure, name)


def audit_trained(ref: str, *, card: Optional[str] = None, root: Optional[str] = None, split: Optional[str] = None,
                  attacks=None, eps=None, corruptions=None, n: Optional[int] = None, surrogate: Optional[str] = None,
                  target_class: Optional[str] = None, tracking_uri: Optional[str] = None, log: bool = True,
                  device: str = "auto", progress: bool = True, runs_dir: Optional[str | Path] = None,
                  shortcut: bool = False) -> AuditReport:
    """Adversarial and corruption audit of a trained run (folder, model file or run id); with
    ``shortcut=True`` the shortcut audit instead (:mod:`medtricks.audit.shortcut`: lungs hidden / lungs
    only, border blanked, Grad-CAM), logged under ``audit/shortcut/``.

    Data: the run's own validation split by default, or ``card``/``root`` (all images unless
    ``split``). Settings: the run's ``audit`` recipe section, overridden by the arguments
    (``attacks``/``corruptions`` as lists or comma-separated strings, ``eps`` as floats or a string
    like ``"0,1/255,2/255"``, ``target_class`` a class name for targeted attacks). With ``log=True``
    everything is logged onto the audited run (re-opened) when it is in the run store of its recipe's
    ``tracking.backend`` (:func:`posthoc_store`), else onto a new run tagged ``medtricks.audited_run``.
    ``runs_dir``: where run ids of the local store are looked up (default ``runs``).
    """
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    recipe = trained.recipe
    if card is None and root is not None:
        raise ConfigError("--root needs --card (the card that describes that data)")
    if card is not None:
        if root is None:
            raise ConfigError("--card needs --root (where that data lies)")
        dataset, _ = eval_dataset(trained, card, root, split=split or "all", progress=progress,
                                  class_map_option=None)  # audit takes no class map
    else:
        dataset, _ = eval_dataset(trained, recipe.data.card, recipe.data.root, split=split or "val", progress=progress)
    surrogate_model = load_trained(surrogate, tracking_uri=tracking_uri, device=str(dev),
                                   runs_dir=runs_dir).model if surrogate else None
    eps_values = parse_eps(eps) if isinstance(eps, str) else eps
    if shortcut:
        result = shortcut_audit_model(trained.model, dataset, audit_cfg=recipe.audit, classes=trained.classes,
                                      data_config=trained.data_config, device=dev, seed=recipe.experiment.seed,
                                      progress=progress, n=n)
    else:
        result = audit_model(trained.model, dataset, audit_cfg=recipe.audit, classes=trained.classes,
                             data_config=trained.data_config, device=dev, seed=recipe.experiment.seed,
                             surrogate=surrogate_model, progress=progress, attacks=attacks, eps=eps_values,
                             corruptions=corruptions, n=n, target_class=target_class)
    report = AuditReport(result=result, table=result.table(), n_images=int(result.config["n_images"]))
    if log:
        tracker = posthoc_store(trained, tracking_uri, runs_dir)
        report.logged_to = tracker.describe()
        report.run_id = start_posthoc_run(tracker, trained, kind="audit", tags={
            "medtricks.audited_run": str(trained.run_id), "medtricks.role": "audit"})
        (log_shortcut if shortcut else log_audit)(tracker, result)
        tracker.end()
    return report
