"""Work on an already trained run: evaluate it on any dataset a card describes, audit it.

Orchestration like :mod:`medtricks.run` (it knows data, models, evaluate, audit and tracking);
split out so run.py stays about training.

    from medtricks.posthoc import evaluate_trained
    report = evaluate_trained("runs/quickstart/20261123-101500-a1b2c3", card="synthetic-phantoms",
                              root="data/phantoms", split="val")
    print(report.metrics.table())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["EvaluationReport", "evaluate_trained", "FlipTTA", "eval_dataset", "AuditReport", "audit_trained",
           "audit_model", "log_audit", "parse_eps"]


class FlipTTA(nn.Module):
    """Test-time augmentation: mean softmax of the image and its horizontal flip (returned as log-probs,
    so a softmax on top gives the averaged probabilities)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x).float(), dim=1) + torch.softmax(self.model(x.flip(-1)).float(), dim=1)
        return torch.log(probs / 2)


@dataclass
class EvaluationReport:
    metrics: Any  # MetricsResult
    split: str
    n_images: int
    run_id: Optional[str] = None  # the MLflow evaluation run
    source_run: Optional[str] = None
    figures: dict[str, Any] = field(default_factory=dict)


def eval_dataset(trained, card, root, *, split: str = "all", split_seed: Optional[int] = None,
                 val_fraction: Optional[float] = None, test_fraction: Optional[float] = None,
                 on_bad_image: str = "error", progress: bool = True):
    """The eval-transform dataset of ``root`` as ``card`` describes it, normalized as the run trained.

    ``split``: ``all`` (every image: an external test set), or ``train``/``val``/``test`` of the
    card's patient-level split (defaults: the run's own split settings).
    """
    from medtricks.data import (BadImageError, XrayDataset, build_manifest, build_transforms, check_leakage,
                                load_card, scan_images)

    recipe = trained.recipe
    card = load_card(card)
    unknown = sorted(set(card.classes) - set(trained.classes))
    if list(card.classes) != list(trained.classes):
        raise ValueError(f"card {card.name!r} has classes {list(card.classes)} but the model was trained on "
                         f"{trained.classes} (order matters){'; unknown: ' + str(unknown) if unknown else ''}")
    if split not in ("all", "train", "val", "test"):
        raise ValueError(f"split must be all, train, val or test, got {split!r}")
    manifest = build_manifest(
        card, root, split_seed=recipe.data.split_seed if split_seed is None else split_seed,
        val_fraction=recipe.data.val_fraction if val_fraction is None else val_fraction,
        test_fraction=recipe.data.test_fraction if test_fraction is None else test_fraction, on_missing="keep")
    if split != "all":
        manifest = manifest[manifest["split"] == split]
        if not len(manifest):
            raise ValueError(f"no images in split {split!r} of {root} (card {card.name!r})")
    image_size = recipe.model.resizer.input_size if recipe.model.resizer.enabled else recipe.data.image_size
    transform = build_transforms(recipe.data.augment, image_size, mean=tuple(trained.data_config["mean"]),
                                 std=tuple(trained.data_config["std"]), in_chans=recipe.model.in_chans, train=False)
    good, quarantine = scan_images(manifest, side=transform.base_side, progress=progress)
    if split != "all":
        check_leakage(good)  # the split is the card's: make sure it holds no patient of another split
    if len(quarantine):
        if on_bad_image == "error":
            listed = "\n".join(f"  {p}: {r}" for p, r in zip(quarantine["path"][:20], quarantine["reason"][:20]))
            raise BadImageError(quarantine["path"].iloc[0], f"{len(quarantine)} unusable image(s):\n{listed}")
        print(f"warning: skipped {len(quarantine)} unusable images (on_bad_image=skip)")
    return XrayDataset(good.drop(columns=["height", "width"]), transform), quarantine


def evaluate_trained(ref: str, *, card: str, root: str, split: str = "all", tta: bool = False,
                     n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0, batch_size: int = 64,
                     tracking_uri: Optional[str] = None, log: bool = True, device: str = "auto",
                     progress: bool = True) -> EvaluationReport:
    """Evaluate a trained run (folder, model file or MLflow run id) on a card's data, without training.

    Prints nothing; returns metrics with bootstrap CIs and, with ``log=True``, logs them with
    confusion matrix / ROC / reliability PNGs to a new MLflow evaluation run nested under the
    trained run (tag ``medtricks.evaluated_run``).
    """
    from medtricks.evaluate import compute_metrics, plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
    from medtricks.run import load_trained
    from medtricks.train import predict, resolve_device

    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev))
    dataset, quarantine = eval_dataset(trained, card, root, split=split, progress=progress)
    model = FlipTTA(trained.model) if tta else trained.model
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=trained.recipe.data.num_workers)
    targets, probs, loss = predict(model, loader, device=dev, progress=progress, desc="evaluate")
    metrics = compute_metrics(targets, probs, trained.classes, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    figures = {"plots/confusion_matrix.png": plot_confusion_matrix(targets, probs.argmax(1), trained.classes),
               "plots/roc.png": plot_roc_curves(targets, probs, trained.classes),
               "plots/reliability.png": plot_reliability_diagram(targets, probs)}
    report = EvaluationReport(metrics=metrics, split=split, n_images=len(dataset), source_run=trained.run_id,
                              figures=figures)
    if log:
        from medtricks.tracking import create_tracker

        uri = tracking_uri or trained.recipe.tracking.uri
        tracker = create_tracker("mlflow", uri)
        from medtricks.data import load_card

        card_name = load_card(card).name
        report.run_id = tracker.start(
            experiment=trained.recipe.tracking.experiment or trained.recipe.experiment.name,
            run_name=f"eval-{card_name}-{split}", tags={"medtricks.evaluated_run": str(trained.run_id),
                                                         "medtricks.kind": "evaluation"},
            parent_run_id=trained.run_id if trained.run_id and tracker.run_exists(trained.run_id) else None)
        tracker.log_params({"card": card_name, "root": str(Path(root).resolve()), "split": split, "tta": tta,
                            "n_bootstrap": n_bootstrap, "seed": seed, "source_run": str(trained.run_id),
                            "source_run_dir": str(trained.run_dir), "n_images": len(dataset),
                            "n_quarantined": len(quarantine)})
        flat = {f"eval/{k}": float(v) for k, v in metrics.to_dict().items() if isinstance(v, (int, float))}
        flat["eval/loss"] = loss
        tracker.log_metrics(flat, step=0)
        for name, figure in figures.items():
            tracker.log_figure(figure, name)
        tracker.end()
    return report


# ------------------------------------------------------------------------------------------ audit
@dataclass
class AuditReport:
    result: Any  # medtricks.audit.AuditResult
    table: str
    run_id: Optional[str] = None
    n_images: int = 0


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
            raise ValueError(f"--eps: {part!r} is not a number or a fraction like 2/255") from None
    return values


def audit_model(model: nn.Module, dataset, *, audit_cfg, classes, data_config, device, seed: int = 0,
                surrogate: Optional[nn.Module] = None, progress: bool = True, batch_size: int = 32,
                attacks=None, eps=None, corruptions=None, n: Optional[int] = None, target_class=None):
    """Run :func:`medtricks.audit.run_audit` as the recipe's ``audit`` section says (arguments override)."""
    from medtricks.audit import run_audit

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return run_audit(model, loader, classes=classes, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                     attacks=audit_cfg.attacks if attacks is None else attacks, eps=list(eps if eps is not None else audit_cfg.eps),
                     pgd_steps=audit_cfg.pgd_steps, corruptions=audit_cfg.corruptions if corruptions is None else corruptions,
                     severities=audit_cfg.severities, n=n or audit_cfg.n, surrogate=surrogate, device=device,
                     target_class=target_class if target_class is not None else audit_cfg.target_class,
                     n_bootstrap=audit_cfg.n_bootstrap, seed=seed, progress=progress)


def log_audit(tracker, result) -> None:
    """Audit metrics, the JSON report and the PNG plots onto the tracker's current run."""
    tracker.log_metrics(result.metrics, step=0)
    tracker.log_text(result.to_json(), "audit/report.json")
    for name, figure in result.figures().items():
        tracker.log_figure(figure, name)


def audit_trained(ref: str, *, card: Optional[str] = None, root: Optional[str] = None, split: Optional[str] = None,
                  attacks=None, eps=None, corruptions=None, n: Optional[int] = None, surrogate: Optional[str] = None,
                  target_class: Optional[str] = None, tracking_uri: Optional[str] = None, log: bool = True,
                  device: str = "auto", progress: bool = True) -> AuditReport:
    """Adversarial and corruption audit of a trained run (folder, model file or MLflow run id).

    Data: the run's own validation split by default, or ``card``/``root`` (all images unless
    ``split``). Settings: the run's ``audit`` recipe section, overridden by the arguments
    (``attacks``/``corruptions`` as lists or comma-separated strings, ``eps`` as floats or a string
    like ``"0,1/255,2/255"``, ``target_class`` a class name for targeted attacks). With ``log=True``
    everything is logged onto the audited MLflow run (re-opened) when it is in this store, else onto
    a new run tagged ``medtricks.audited_run``.
    """
    from medtricks.run import load_trained
    from medtricks.train import resolve_device

    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev))
    recipe = trained.recipe
    if card is None and root is not None:
        raise ValueError("--root needs --card (the card that describes that data)")
    if card is not None:
        if root is None:
            raise ValueError("--card needs --root (where that data lies)")
        dataset, _ = eval_dataset(trained, card, root, split=split or "all", progress=progress)
    else:
        dataset, _ = eval_dataset(trained, recipe.data.card, recipe.data.root, split=split or "val", progress=progress)
    surrogate_model = load_trained(surrogate, tracking_uri=tracking_uri, device=str(dev)).model if surrogate else None
    eps_values = parse_eps(eps) if isinstance(eps, str) else eps
    result = audit_model(trained.model, dataset, audit_cfg=recipe.audit, classes=trained.classes,
                         data_config=trained.data_config, device=dev, seed=recipe.experiment.seed,
                         surrogate=surrogate_model, progress=progress, attacks=attacks, eps=eps_values,
                         corruptions=corruptions, n=n, target_class=target_class)
    report = AuditReport(result=result, table=result.table(), n_images=int(result.config["n_images"]))
    if log:
        from medtricks.tracking import create_tracker

        tracker = create_tracker("mlflow", tracking_uri or recipe.tracking.uri)
        if trained.run_id and tracker.run_exists(trained.run_id):
            report.run_id = tracker.start(experiment="", run_name="", tags={}, resume_run_id=trained.run_id)
        else:
            report.run_id = tracker.start(experiment=recipe.tracking.experiment or recipe.experiment.name,
                                          run_name=f"audit-{recipe.experiment.name}",
                                          tags={"medtricks.audited_run": str(trained.run_id),
                                                "medtricks.kind": "audit"})
        log_audit(tracker, result)
        tracker.end()
    return report
