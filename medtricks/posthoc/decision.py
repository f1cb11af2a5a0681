"""How a binary run decides: its operating point, an optional prior shift, a site profile's temperature.

:func:`resolve_decision_rule` turns ``--threshold``/``--prevalence``/``--site`` into a :class:`DecisionRule`
that ``evaluate``, ``predict`` and ``ensemble`` apply to predicted probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from medtricks.deploy.fit import apply_temperature
from medtricks.deploy.profiles import load_site_profile, site_profile_path
from medtricks.errors import ConfigError, MissingFileError
from medtricks.evaluate.operating_point import (
    OPERATING_POINT_FILE,
    OperatingPoint,
    class_priors,
    parse_threshold,
    prior_shift,
    probs_at_threshold,
    select_threshold,
)
from medtricks.evaluate.paired import load_predictions
from medtricks.posthoc.store import posthoc_store, run_file
from medtricks.rundir import RunDir

__all__ = ["DecisionRule", "load_operating_point", "resolve_decision_rule", "train_priors_from_manifest"]


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
            text += (
                f"; posteriors first shifted from the training prevalence {pi:.3f} to {self.prevalence:.3f} "
                f"(Saerens et al. 2002; priors from {self.priors_source})"
            )
        return text


def load_operating_point(run_dir: Optional[str | Path]):
    """The run's stored :class:`~medtricks.evaluate.operating_point.OperatingPoint`, or ``None`` (runs
    trained before operating points were stored have no ``model/operating_point.json``)."""
    if run_dir is None:
        return None
    path = RunDir(run_dir).operating_point
    return OperatingPoint.from_json(path) if path.is_file() else None


def train_priors_from_manifest(trained, tracking_uri: Optional[str]) -> Optional[list[float]]:
    """Class frequencies of the run's training split, from its logged split manifest."""
    frame = run_file(trained, RunDir.manifest_artifact(), pd.read_csv, tracking_uri)
    if frame is None or not {"split", "target"} <= set(frame.columns):
        return None
    train = frame.loc[frame["split"] == "train", "target"]
    return class_priors(train.to_numpy(), len(trained.classes)) if len(train) else None


def resolve_decision_rule(
    trained,
    *,
    threshold: Any = "stored",
    prevalence: Optional[float] = None,
    tracking_uri: Optional[str] = None,
    site: Optional[str] = None,
    runs_dir: Optional[str | Path] = None,
) -> Optional[DecisionRule]:
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
            raise ConfigError(
                f"--threshold {threshold} applies to binary models; run {name} has {k} classes "
                f"{trained.classes} (decisions are argmax)"
            )
        if prevalence is not None:
            raise ConfigError(f"--prevalence applies to binary models; run {name} has {k} classes {trained.classes}")
        return None
    op = load_operating_point(trained.run_dir)
    positive = op.positive_index if op is not None else 1
    if spec == "stored":
        if op is None:
            rule = DecisionRule(
                threshold=0.5,
                source="default",
                positive_index=positive,
                description=f"threshold 0.5: the run has no model/{OPERATING_POINT_FILE} "
                "(trained before operating points were stored)",
            )
        else:
            rule = DecisionRule(
                threshold=float(op.threshold),
                source="stored",
                positive_index=positive,
                description=f"{op.describe()}; stored in model/{OPERATING_POINT_FILE}",
            )
    else:
        kind, value = parse_threshold(threshold)
        if kind == "given":
            rule = DecisionRule(
                threshold=value, source="given", positive_index=positive, description=f"threshold {value:g} (given)"
            )
        else:  # youden / sens=S: chosen again on the run's stored validation predictions
            val = run_file(trained, RunDir.predictions_artifact("val"), load_predictions, tracking_uri)
            if val is None:
                raise MissingFileError(
                    f"--threshold {threshold} is chosen on the run's validation predictions, but "
                    f"run {name} has no {RunDir.predictions_artifact('val')} (in its folder or its "
                    "run store); use --threshold stored or a number"
                )
            chosen = select_threshold(*val, method=kind, target_sensitivity=value, positive_index=positive)
            rule = DecisionRule(
                threshold=float(chosen.threshold),
                source=chosen.method,
                positive_index=positive,
                description=f"{chosen.describe()}; recomputed from the run's stored validation predictions",
            )
    if prevalence is not None:
        value = _prevalence(prevalence)
        priors, source = (
            (list(op.train_priors), f"model/{OPERATING_POINT_FILE}")
            if op is not None and op.train_priors
            else (
                train_priors_from_manifest(trained, tracking_uri),
                "the training split of artifacts/split_manifest.csv",
            )
        )
        if priors is None:
            raise ConfigError(
                f"--prevalence needs the class priors run {name} was trained with (train_priors in "
                f"{trained.run_dir}/model/{OPERATING_POINT_FILE}, or its artifacts/split_manifest.csv); "
                "this run has neither"
            )
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


def _site_rule(
    trained,
    site: str,
    *,
    spec: str,
    prevalence: Optional[float],
    tracking_uri: Optional[str],
    runs_dir: Optional[str | Path],
) -> DecisionRule:
    """The decision rule of the run's site profile ``site`` (see :func:`resolve_decision_rule`)."""
    name = trained.run_id or str(trained.run_dir)
    if len(trained.classes) != 2:
        raise ConfigError(f"--site applies to binary models; run {name} has {len(trained.classes)} classes")
    if spec != "stored":
        raise ConfigError(f"--site {site} brings its own threshold; leave out --threshold {spec}")
    local = trained.run_dir is not None and site_profile_path(trained.run_dir, site).is_file()
    store = None if local or not trained.run_id else posthoc_store(trained, tracking_uri, runs_dir)
    profile = load_site_profile(trained, site, store=store)
    rule = DecisionRule(
        threshold=float(profile.threshold),
        source="site",
        positive_index=profile.positive_index,
        description=profile.describe(),
        temperature=float(profile.temperature),
        site=profile.name,
    )
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
