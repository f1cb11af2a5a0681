"""``medtricks adapt``: adapt a trained run to a new site's *unlabelled* images.

- ``em-prior``: the site prevalence by EM (Saerens et al. 2002) on the run's predictions for the site
  images; stored as a site profile (the run's stored threshold after a prior shift from the training
  priors to the estimate) that ``evaluate``/``predict --site NAME`` apply. The model is unchanged.
- ``adabn``: BatchNorm running statistics re-estimated on the site images (:func:`medtricks.deploy.bn.adabn`).
- ``tent``: BatchNorm γ/β by entropy minimisation on the site images (:func:`medtricks.deploy.bn.tent`),
  then the running statistics re-estimated on the same images with the adapted γ/β, so the saved
  model predicts one image at a time like any run (TENT as published keeps normalising by each test
  batch; the adaptation record says so).

With *labelled* site images, ``finetune`` (``medtricks adapt RUN --method finetune --card C --root SITE``)
fine-tunes the run on them, cross-fitted by patient: :func:`medtricks.deploy.finetune.finetune_run`.

``adabn`` and ``tent`` write a new run folder beside the parent's (same experiment): the parent's
recipe, data config, operating point and split manifest (so ``evaluate`` still finds the parent's
training data in an evaluation set), the adapted ``model_state.pt``, and ``model/adaptation.json``:
the parent run (id and folder), the method and its settings, the site folder as a salted ``r_`` id,
and the salted ``i_`` id of every image used (never a path). ``load_trained``/``evaluate``/``predict``
work on it like on any run; it is logged to the parent's run store as a run nested under the parent.

Example::

    result = adapt_run("runs/kermany/20261201-101406-d20d09", root="site_images/", method="adabn")
    print(result.run_dir)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import medtricks
from medtricks._atomic import atomic_path
from medtricks.data import folder_id
from medtricks.data.datasets import XrayDataset
from medtricks.data.manifest import image_id, patient_salt
from medtricks.data.transforms import build_transforms
from medtricks.deploy.bn import AdaptReport, adabn, tent
from medtricks.deploy.fit import em_prior
from medtricks.deploy.profiles import SiteProfile, check_site_name, log_site_profile, save_site_profile
from medtricks.errors import ConfigError, MissingFileError
from medtricks.posthoc.decision import load_operating_point, train_priors_from_manifest
from medtricks.posthoc.store import posthoc_store
from medtricks.posthoc.predict import collect_images
from medtricks.rundir import MODEL_ARTIFACT_DIR, RunDir
from medtricks.train import predict, resolve_device
from medtricks.train.checkpoint import save_checkpoint
from medtricks.posthoc.load import load_trained

__all__ = ["adapt_run", "AdaptResult", "ADAPT_METHODS", "LABELLED_METHODS", "ADAPTATION_FILE", "site_images"]

ADAPT_METHODS = ("em-prior", "adabn", "tent")  # unlabelled site images: adapt_run
LABELLED_METHODS = ("finetune",)  # labelled site images (a data card): medtricks.deploy.finetune.finetune_run
ADAPTATION_FILE = "adaptation.json"  # model/adaptation.json of an adapted run


@dataclass
class AdaptResult:
    method: str
    run_dir: Optional[Path] = None  # the new run (adabn, tent)
    run_id: Optional[str] = None
    profile: Optional[SiteProfile] = None  # em-prior
    report: Optional[AdaptReport] = None
    n_images: int = 0
    n_not_images: int = 0
    logged_to: Optional[str] = None
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"adapt --method {self.method}: {self.n_images} site images"
            + (f" ({self.n_not_images} other files not read)" if self.n_not_images else "")
        ]
        if self.report is not None:
            lines.append(self.report.summary())
        if self.profile is not None:
            lines.append(self.profile.table())
        if self.run_dir is not None:
            lines.append(f"adapted run: {self.run_dir}" + (f" (run id {self.run_id})" if self.run_id else ""))
        return "\n".join(lines)


class _Images(torch.utils.data.Dataset):
    """Site images with a dummy label (``(image, 0)``), as ``medtricks.train.inference`` expects."""

    def __init__(self, dataset: XrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0], 0


def site_images(trained, root: str | Path) -> tuple[_Images, list[str], int]:
    """The unlabelled images under ``root`` with the run's eval transform → ``(dataset, salted image ids,
    number of other files)``. A file that cannot be read as an image stops the adaptation, naming it."""
    items, not_images = collect_images([root])
    if not items:
        raise MissingFileError(f"no images under {root} (PNG, JPEG, TIFF or DICOM)")
    recipe = trained.recipe
    transform = build_transforms(
        recipe.data.augment,
        recipe.input_image_size(),
        mean=tuple(trained.data_config["mean"]),
        std=tuple(trained.data_config["std"]),
        in_chans=recipe.model.in_chans,
        train=False,
    )
    manifest = pd.DataFrame({"path": [str(i.path) for i in items], "target": 0})
    salt = patient_salt()
    ids = [image_id(i.image, salt) for i in items]
    return _Images(XrayDataset(manifest, transform)), ids, len(not_images)


def _copy_parent(parent: RunDir, child: RunDir) -> None:
    """What an adapted run shares with its parent: recipe, data config, operating point, model card, split manifest."""
    shutil.copy2(parent.recipe, child.recipe)
    child.model_dir.mkdir(parents=True, exist_ok=True)
    for src, dest in (
        (parent.data_config, child.data_config),
        (parent.operating_point, child.operating_point),
        (parent.model_card, child.model_card),
        (parent.split_manifest, child.split_manifest),
    ):
        if src.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)


def _em_profile(
    trained, probs: np.ndarray, *, name: str, tracking_uri: Optional[str], n_bootstrap: int, ci: float, seed: int
) -> SiteProfile:
    op = load_operating_point(trained.run_dir)
    priors = (
        list(op.train_priors)
        if op is not None and op.train_priors
        else train_priors_from_manifest(trained, tracking_uri)
    )
    if priors is None or len(priors) != 2:
        raise ConfigError(
            f"--method em-prior needs the class priors run {trained.run_id or trained.run_dir} was "
            "trained with (train_priors in model/operating_point.json, or artifacts/split_manifest.csv)"
        )
    positive = op.positive_index if op is not None else 1
    est, iterations = em_prior(probs, priors)
    rng = np.random.default_rng(seed)
    draws = [
        float(em_prior(probs[rng.integers(0, len(probs), len(probs))], priors)[0][positive])
        for _ in range(int(n_bootstrap))
    ]
    a = (1 - ci) / 2
    interval = [float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a))] if len(draws) > 1 else None
    threshold = float(op.threshold) if op is not None else 0.5
    return SiteProfile(
        name=name,
        method="em-prior",
        threshold=threshold,
        temperature=1.0,
        prevalence=float(min(max(est[positive], 1e-4), 1 - 1e-4)),
        shift_from=[float(v) for v in priors],
        positive_index=positive,
        classes=list(trained.classes),
        intervals={"prevalence": interval},
        ci_level=ci,
        n_bootstrap=int(n_bootstrap),
        sample={"n_images": int(len(probs)), "em_iterations": int(iterations)},
        source_run=trained.run_id,
        stored_threshold=threshold,
        notes=[
            "no labels: the prevalence is an EM estimate (images resampled for its interval, "
            "patients unknown); the threshold is the run's own, applied after the prior shift"
        ],
    )


def adapt_run(
    ref: str,
    *,
    root: str,
    method: str,
    name: Optional[str] = None,
    steps: int = 1,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    tracking_uri: Optional[str] = None,
    log: bool = True,
    device: str = "auto",
    progress: bool = True,
    runs_dir: Optional[str | Path] = None,
    output_dir: Optional[str | Path] = None,
) -> AdaptResult:
    """Adapt the trained run ``ref`` to the unlabelled images under ``root`` (see the module docstring).

    ``em-prior`` stores the site profile ``name`` (default ``em-prior``) in the run; ``adabn``/``tent``
    write a new run under ``output_dir`` (default: beside the parent, same experiment). ``steps``,
    ``lr``: TENT's passes over the images and SGD learning rate; ``seed``: TENT's batch order."""
    if method in LABELLED_METHODS:
        raise ConfigError(
            f"--method {method} learns from labelled site images: it needs their data card "
            "(`medtricks adapt RUN --method finetune --card C --root SITE`, or in Python "
            "medtricks.deploy.finetune.finetune_run(RUN, card=C, root=SITE))"
        )
    if method not in ADAPT_METHODS:
        raise ConfigError(f"--method {method!r}: expected one of {', '.join(ADAPT_METHODS + LABELLED_METHODS)}")
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    parent_name = trained.run_id or str(trained.run_dir)
    dataset, ids, n_other = site_images(trained, root)
    result = AdaptResult(method=method, n_images=len(dataset), n_not_images=n_other)
    experiment = trained.recipe.tracking.experiment or trained.recipe.experiment.name
    store = posthoc_store(trained, tracking_uri, runs_dir) if log else None

    if method == "em-prior":
        if len(trained.classes) != 2:
            raise ConfigError(
                f"--method em-prior applies to binary models; run {parent_name} has {len(trained.classes)} classes"
            )
        name = check_site_name(name or "em-prior")
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        _, probs, _ = predict(trained.model, loader, device=dev, progress=progress, desc="em-prior")
        profile = _em_profile(
            trained, probs, name=name, tracking_uri=tracking_uri, n_bootstrap=n_bootstrap, ci=ci, seed=seed
        )
        profile.sample.update({"root": folder_id(root), "image_set": _id_digest(ids)})
        result.profile = profile
        if trained.run_dir is not None:
            save_site_profile(trained.run_dir, profile)
        if store is not None:
            result.logged_to = store.describe()
            result.run_id = log_site_profile(
                store,
                profile,
                experiment=experiment,
                run_id=trained.run_id,
                params={"root": folder_id(root), "seed": seed},
            )
        return result

    model = trained.model
    if method == "adabn":
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        report = adabn(model, loader, device=dev)
        settings = {"batch_size": batch_size}
    else:
        report = tent(model, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=dev)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        stats = adabn(model, loader, device=dev)
        report.layers += [{**row, "after": "tent"} for row in stats.layers]
        settings = {
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "optimizer": "SGD momentum 0.9",
            "then": "BatchNorm running statistics re-estimated on the same images (AdaBN) so the saved model "
            "predicts image by image; TENT as published normalises by each test batch",
        }
    result.report = report

    parent = RunDir(trained.run_dir)
    base = (
        Path(output_dir)
        if output_dir is not None
        else (parent.output_dir if parent.state_file.is_file() else Path(trained.recipe.experiment.output_dir))
    )
    child = RunDir.create(base, trained.recipe.experiment.name)
    _copy_parent(parent, child)
    save_checkpoint({k: v.detach().cpu() for k, v in model.state_dict().items()}, child.model_state)
    record = {
        "format": "medtricks-adaptation/1",
        "method": method,
        "parent_run_id": trained.run_id,
        "parent_run_dir": str(parent.path),
        "settings": settings,
        "site_root": folder_id(root),
        "n_images": len(ids),
        "image_set": _id_digest(ids),
        "image_ids": ids,
        "bn_layers": report.layers,
        "medtricks_version": medtricks.__version__,
    }
    record_path = child.model_dir / ADAPTATION_FILE
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    result.record, result.run_dir = record, child.path
    child.write_state(
        status="finished",
        experiment=trained.recipe.experiment.name,
        kind="adaptation",
        adapt_method=method,
        parent_run_id=trained.run_id,
        parent_run_dir=str(parent.path),
    )
    if store is not None:
        result.logged_to = store.describe()
        tags = {
            "medtricks.kind": "adaptation",
            "medtricks.role": "adaptation",
            "medtricks.adapt_method": method,
            "medtricks.parent_run": str(trained.run_id),
            "run_dir": str(child.path),
            "medtricks.version": medtricks.__version__,
        }
        parent_id = trained.run_id if trained.run_id and store.run_exists(trained.run_id) else None
        run_id = store.start(
            experiment=experiment, run_name=f"adapt-{method}-{child.short_id}", tags=tags, parent_run_id=parent_id
        )
        try:
            store.log_params(
                {
                    "method": method,
                    "parent_run": str(trained.run_id),
                    "site_root": folder_id(root),
                    "n_images": len(ids),
                    "image_set": record["image_set"],
                    **{f"adapt.{k}": v for k, v in settings.items() if k != "then"},
                }
            )
            if report.losses:
                store.log_metrics(
                    {"adapt/entropy_first": report.losses[0], "adapt/entropy_last": report.losses[-1]}, step=0
                )
            store.log_artifact(child.recipe)
            for path in (child.model_state, child.data_config, child.operating_point, child.model_card, record_path):
                if path.is_file():
                    store.log_artifact(path, MODEL_ARTIFACT_DIR)
            if child.split_manifest.is_file():
                store.log_artifact(child.split_manifest, "data")
        except BaseException:
            store.end("FAILED")
            raise
        store.end()
        result.run_id = run_id
        child.write_state(run_id=run_id)
    return result


def _id_digest(ids: list[str]) -> str:
    """SHA-256 of the sorted salted image ids: equal digests, the same image set (on this machine)."""
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode() + b"\n")
    return h.hexdigest()
