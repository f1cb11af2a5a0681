"""``medtricks audit`` on a finished run: adversarial and corruption curves, or the shortcut audit.

:func:`audit_model` / :func:`shortcut_audit_model` run :mod:`medtricks.audit` as a recipe's ``audit``
section says (``medtricks run`` calls them after training too); :func:`audit_trained` loads a run, audits
it and logs the result onto it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from medtricks.audit import run_audit
from medtricks.audit.shortcut import run_shortcut_audit
from medtricks.errors import ConfigError
from medtricks.posthoc.evaluation import eval_dataset
from medtricks.posthoc.load import load_trained
from medtricks.posthoc.store import posthoc_store, start_posthoc_run
from medtricks.train import resolve_device

__all__ = [
    "AuditReport",
    "parse_eps",
    "audit_model",
    "shortcut_audit_model",
    "log_shortcut",
    "log_audit",
    "audit_trained",
]


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


def audit_model(
    model: nn.Module,
    dataset,
    *,
    audit_cfg,
    classes,
    data_config,
    device,
    seed: int = 0,
    surrogate: Optional[nn.Module] = None,
    progress: bool = True,
    batch_size: int = 32,
    attacks=None,
    eps=None,
    corruptions=None,
    n: Optional[int] = None,
    target_class=None,
):
    """Run :func:`medtricks.audit.run_audit` as the recipe's ``audit`` section says (arguments override)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return run_audit(
        model,
        loader,
        classes=classes,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        attacks=audit_cfg.attacks if attacks is None else attacks,
        eps=list(eps if eps is not None else audit_cfg.eps),
        pgd_steps=audit_cfg.pgd_steps,
        corruptions=audit_cfg.corruptions if corruptions is None else corruptions,
        severities=audit_cfg.severities,
        n=n or audit_cfg.n,
        surrogate=surrogate,
        device=device,
        target_class=target_class if target_class is not None else audit_cfg.target_class,
        n_bootstrap=audit_cfg.n_bootstrap,
        seed=seed,
        progress=progress,
        square_queries=audit_cfg.square_queries,
        masking=audit_cfg.masking_checks,
    )


def shortcut_audit_model(
    model: nn.Module,
    dataset,
    *,
    audit_cfg,
    classes,
    data_config,
    device,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 32,
    n: Optional[int] = None,
):
    """Run :func:`medtricks.audit.shortcut.run_shortcut_audit` as the recipe's ``audit`` section says."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return run_shortcut_audit(
        model,
        loader,
        classes=classes,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        n=n or audit_cfg.n,
        border=audit_cfg.shortcut_border,
        n_bootstrap=audit_cfg.n_bootstrap,
        seed=seed,
        device=device,
        progress=progress,
    )


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


def audit_trained(
    ref: str,
    *,
    card: Optional[str] = None,
    root: Optional[str] = None,
    split: Optional[str] = None,
    attacks=None,
    eps=None,
    corruptions=None,
    n: Optional[int] = None,
    surrogate: Optional[str] = None,
    target_class: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    log: bool = True,
    device: str = "auto",
    progress: bool = True,
    runs_dir: Optional[str | Path] = None,
    shortcut: bool = False,
) -> AuditReport:
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
        dataset, _ = eval_dataset(
            trained, card, root, split=split or "all", progress=progress, class_map_option=None
        )  # audit takes no class map
    else:
        dataset, _ = eval_dataset(trained, recipe.data.card, recipe.data.root, split=split or "val", progress=progress)
    surrogate_model = (
        load_trained(surrogate, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir).model
        if surrogate
        else None
    )
    eps_values = parse_eps(eps) if isinstance(eps, str) else eps
    if shortcut:
        result = shortcut_audit_model(
            trained.model,
            dataset,
            audit_cfg=recipe.audit,
            classes=trained.classes,
            data_config=trained.data_config,
            device=dev,
            seed=recipe.experiment.seed,
            progress=progress,
            n=n,
        )
    else:
        result = audit_model(
            trained.model,
            dataset,
            audit_cfg=recipe.audit,
            classes=trained.classes,
            data_config=trained.data_config,
            device=dev,
            seed=recipe.experiment.seed,
            surrogate=surrogate_model,
            progress=progress,
            attacks=attacks,
            eps=eps_values,
            corruptions=corruptions,
            n=n,
            target_class=target_class,
        )
    report = AuditReport(result=result, table=result.table(), n_images=int(result.config["n_images"]))
    if log:
        tracker = posthoc_store(trained, tracking_uri, runs_dir)
        report.logged_to = tracker.describe()
        report.run_id = start_posthoc_run(
            tracker,
            trained,
            kind="audit",
            tags={"medtricks.audited_run": str(trained.run_id), "medtricks.role": "audit"},
        )
        (log_shortcut if shortcut else log_audit)(tracker, result)
        tracker.end()
    return report
