"""``medtricks calibrate``: fit a trained run's decision rule on a labelled sample of a new site.

On the site's images only (never the run's training or validation data: :func:`calibrate_site` refuses a
sample that shares images or patients with them, by the same check ``evaluate`` warns with), it fits

- temperature scaling (one scalar on the log-probabilities; Guo et al. 2017),
- the decision threshold on the temperature-scaled probabilities (Youden's J, or the most specific
  threshold that reaches ``target_sensitivity``),
- the site prevalence (the sample's share of the positive class, with an EM estimate beside it),

with patient-level bootstrap intervals, and a patient-level cross-fitted estimate of how well the
calibration holds on patients it was not fitted on (against the run's own stored threshold on the same
images). The result is a :class:`~medtricks.deploy.profiles.SiteProfile` saved as
``model/sites/<name>.json`` in the run folder and logged to the run's store.

Example::

    result = calibrate_site("runs/kermany/20261201-101406-d20d09", card="kermany-pneumonia",
                            root="../shared/data/kermany224_site", name="guangzhou-test")
    print(result.profile.table())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch.utils.data import DataLoader

from medtricks.data import folder_id, load_card
from medtricks.deploy.fit import bootstrap_site, cross_fit, em_prior, fit_site
from medtricks.deploy.profiles import SiteProfile, check_site_name, log_site_profile, save_site_profile
from medtricks.errors import ConfigError, MedtricksError
from medtricks.posthoc.decision import load_operating_point, train_priors_from_manifest
from medtricks.posthoc.evaluation import eval_dataset, image_set_digest
from medtricks.posthoc.overlap import split_overlap
from medtricks.posthoc.store import posthoc_store
from medtricks.train import predict, resolve_device
from medtricks.posthoc.load import load_trained

__all__ = [
    "calibrate_site",
    "calibrate_predictions",
    "CalibrationResult",
    "SiteSampleError",
    "SiteOverlapError",
    "MIN_PER_CLASS",
]

#: Fewer labelled images than this in a class: too few to fit a threshold and a temperature safely.
MIN_PER_CLASS = 20


class SiteSampleError(MedtricksError):
    """A site sample too small (or with one class) to calibrate on."""


class SiteOverlapError(MedtricksError):
    """A site sample that shares images or patients with the run's training or validation data."""


@dataclass
class CalibrationResult:
    profile: SiteProfile
    path: Optional[Path] = None  # model/sites/<name>.json
    logged_run: Optional[str] = None
    logged_to: Optional[str] = None
    warnings: list[str] = field(default_factory=list)


def _check_sample(y: np.ndarray, classes: list[str], min_per_class: int) -> dict[str, int]:
    counts = {c: int((y == k).sum()) for k, c in enumerate(classes)}
    short = {c: n for c, n in counts.items() if n < min_per_class}
    if short:
        raise SiteSampleError(
            "the site sample is too small to calibrate safely: "
            + ", ".join(f"{n} image(s) of class {c!r}" for c, n in short.items())
            + f" (at least {min_per_class} of every class are needed for a threshold, a temperature and their "
            f"intervals; counts: {counts}). Label more site images, or keep the run's own threshold"
        )
    return counts


def calibrate_predictions(
    y: Any,
    probs: Any,
    groups: Any,
    *,
    name: str,
    classes: list[str],
    target_sensitivity: Optional[float] = None,
    positive_index: int = 1,
    stored_threshold: Optional[float] = None,
    train_priors: Optional[list[float]] = None,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    min_per_class: int = MIN_PER_CLASS,
) -> SiteProfile:
    """A :class:`SiteProfile` from a site sample's labels, probabilities and patient groups (plain arrays)."""
    check_site_name(name)
    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    groups = np.asarray(groups)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ConfigError(f"calibrate applies to binary models; the predictions have shape {p.shape}")
    counts = _check_sample(y, classes, min_per_class)
    n_patients = {c: int(len(np.unique(groups[y == k]))) for k, c in enumerate(classes)}
    if min(n_patients.values()) < folds:
        raise SiteSampleError(
            f"the site sample has {n_patients} patients per class; cross-fitting in {folds} folds "
            "needs at least that many patients of every class"
        )
    if target_sensitivity is not None and not 0.0 < float(target_sensitivity) <= 1.0:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity!r}")
    method = "youden" if target_sensitivity is None else "sensitivity"
    fitted = fit_site(y, p, method=method, target_sensitivity=target_sensitivity, positive_index=positive_index)
    intervals = bootstrap_site(
        y,
        p,
        groups,
        method=method,
        target_sensitivity=target_sensitivity,
        positive_index=positive_index,
        n_bootstrap=n_bootstrap,
        ci=ci,
        seed=seed,
    )
    checked = cross_fit(
        y,
        p,
        groups,
        method=method,
        target_sensitivity=target_sensitivity,
        positive_index=positive_index,
        stored_threshold=stored_threshold,
        folds=folds,
        seed=seed,
        n_bootstrap=n_bootstrap,
        ci=ci,
    )
    notes = []
    if train_priors is not None and len(train_priors) == 2:
        est, _ = em_prior(p, train_priors)
        checked["em_prevalence"] = float(est[positive_index])  # what EM would have said without labels
        notes.append(
            f"EM (no labels) estimates the prevalence at {est[positive_index]:.3f}; the labelled sample "
            f"has {fitted['prevalence']:.3f}"
        )
    if fitted["threshold"] < 0.02 or fitted["threshold"] > 0.98:
        notes.append(
            f"the fitted threshold {fitted['threshold']:.4f} is near the edge: the model's site "
            "probabilities are extreme; check the cross-fitted numbers before trusting it"
        )
    return SiteProfile(
        name=name,
        method=method,
        threshold=fitted["threshold"],
        temperature=fitted["temperature"],
        prevalence=fitted["prevalence"],
        shift_from=None,
        positive_index=positive_index,
        classes=list(classes),
        target_sensitivity=None if target_sensitivity is None else float(target_sensitivity),
        intervals=intervals,
        ci_level=ci,
        n_bootstrap=int(n_bootstrap),
        cross_fit=checked,
        sample={
            "n_images": int(len(y)),
            "n_patients": int(len(np.unique(groups))),
            "per_class": counts,
            "patients_per_class": n_patients,
        },
        stored_threshold=stored_threshold,
        notes=notes,
    )


def check_site_overlap(trained, manifest, root, tracking_uri: Optional[str], run_name: str, *, why: str) -> list[str]:
    """Refuse a site sample that shares images or patients with the run's training/validation data
    (:class:`SiteOverlapError`, ending with ``why``); return the warnings (no split manifest to check against,
    overlap with the run's internal test split)."""
    warnings: list[str] = []
    overlap = split_overlap(trained, manifest, root, tracking_uri)
    if overlap is None:
        warnings.append(
            f"run {run_name} kept no split manifest: whether the site sample shares images or patients "
            "with its training data cannot be checked"
        )
        return warnings
    seen = {
        s: (overlap.images.get(s, 0), overlap.patients.get(s, 0))
        for s in ("train", "val")
        if overlap.images.get(s) or overlap.patients.get(s)
    }
    if seen:
        raise SiteOverlapError(
            f"the site sample shares data with run {run_name}'s own training/validation data ("
            + "; ".join(f"{s}: {i} identical images, {p} patients" for s, (i, p) in seen.items())
            + f"): {why}"
        )
    if overlap.images.get("test") or overlap.patients.get("test"):
        warnings.append(f"the site sample shares {overlap.summary()} with the run's own internal test split")
    return warnings


def calibrate_site(
    ref: str,
    *,
    card: str,
    root: str,
    name: str = "site",
    target_sensitivity: Optional[float] = None,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    min_per_class: int = MIN_PER_CLASS,
    tracking_uri: Optional[str] = None,
    log: bool = True,
    device: str = "auto",
    progress: bool = True,
    runs_dir: Optional[str | Path] = None,
    class_map: Any = None,
) -> CalibrationResult:
    """Fit and store the site profile ``name`` of a trained binary run on the labelled images of ``root``
    (as ``card`` describes them); see the module docstring. Refuses (:class:`SiteOverlapError`) a sample
    that shares identical images or patients with the run's train or val split, and
    (:class:`SiteSampleError`) fewer than ``min_per_class`` images of a class."""
    check_site_name(name)
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    run_name = trained.run_id or str(trained.run_dir)
    if len(trained.classes) != 2:
        raise ConfigError(
            f"calibrate applies to binary models; run {run_name} has {len(trained.classes)} classes {trained.classes}"
        )
    dataset, quarantine = eval_dataset(trained, card, root, split="all", progress=progress, class_map=class_map)
    warnings = check_site_overlap(
        trained,
        dataset.manifest,
        root,
        tracking_uri,
        run_name,
        why="a threshold and temperature fitted on images the model trained or was selected on are not a site "
        "calibration. Remove those images (their patients) from the sample, or use images of other patients",
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=trained.recipe.data.num_workers)
    y, probs, _ = predict(trained.model, loader, device=dev, progress=progress, desc="calibrate")
    op = load_operating_point(trained.run_dir)
    positive = op.positive_index if op is not None else 1
    train_priors = (
        list(op.train_priors)
        if op is not None and op.train_priors
        else train_priors_from_manifest(trained, tracking_uri)
    )
    groups = dataset.manifest["patient"].astype(str).to_numpy()
    profile = calibrate_predictions(
        y,
        probs,
        groups,
        name=name,
        classes=list(trained.classes),
        target_sensitivity=target_sensitivity,
        positive_index=positive,
        stored_threshold=float(op.threshold) if op is not None else 0.5,
        train_priors=train_priors,
        n_bootstrap=n_bootstrap,
        ci=ci,
        folds=folds,
        seed=seed,
        min_per_class=min_per_class,
    )
    card_name = load_card(card).name
    profile.source_run = trained.run_id
    profile.sample.update(
        {
            "card": card_name,
            "root": folder_id(root),
            "image_set": image_set_digest(dataset, root),
            "n_quarantined": int(len(quarantine)),
        }
    )
    profile.notes.extend(warnings)
    result = CalibrationResult(profile=profile, warnings=warnings)
    if trained.run_dir is not None:
        result.path = save_site_profile(trained.run_dir, profile)
    if log:
        store = posthoc_store(trained, tracking_uri, runs_dir)
        result.logged_to = store.describe()
        result.logged_run = log_site_profile(
            store,
            profile,
            experiment=trained.recipe.tracking.experiment or trained.recipe.experiment.name,
            run_id=trained.run_id,
            params={"card": card_name, "root": folder_id(root), "folds": folds, "seed": seed},
        )
    return result
