"""Shortcut audit: does the model look at the lungs, or at the hospital, the text markers and the borders?

DeGrave, Janizek & Lee (Nature Machine Intelligence 2021) showed COVID-19 chest X-ray classifiers that
score well by recognising the *source* of an image -- laterality markers, text, borders, the way a
site exposes its films -- rather than the lungs. Four probes, every number with a bootstrap CI:

(a) **lungs hidden / lungs only**: the lung field (:func:`lung_field_mask`) is filled with one grey (the
    median of the first batch, the same for every image: a per-image value would leak each image's
    brightness into the hidden region), then everything *except* the lung field is. A model that still separates the classes
    with the lungs hidden (AUROC well above chance) reads something else: flagged.
(b) **border**: a frame of ``border`` (default 8 %) of the side on each edge is filled with that grey (where markers, text and film edges sit). A clear AUROC drop (paired bootstrap CI of the drop
    above ``border_drop``) means the border carried the decision: flagged.
(c) **Grad-CAM overlays** (the ``grad-cam`` package, :mod:`medtricks.audit.saliency`) of the most confident
    right and wrong predictions, one PNG each, for a reader to look at.
(d) **Grad-CAM mass in the lung field**: the share of each image's (non-negative, per-image normalised)
    map inside the lung field, averaged over images; for scale, the lung field covers
    ``lung_area`` of the image.

The lung field is fixed and documented, not segmented: two ellipses centred at 30 % and 70 % of the
width and 50 % of the height, semi-axes 17 % of the width and 30 % of the height (about 32 % of the
image), which covers both lungs of a centred, frontal adult or paediatric film after the centre crop.
No lung segmentation model ships offline here; a better mask can be passed as ``lung_mask``.

    from medtricks.audit.shortcut import run_shortcut_audit
    res = run_shortcut_audit(model, loader, classes=["normal", "covid"], mean=(0.5,), std=(0.25,))
    print(res.table()); tracker.log_metrics(res.metrics)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medtricks.audit.adversarial import _check_mean_std, _frozen, normalized_model
from medtricks.data.lung_field import lung_field_mask
from medtricks.audit.report import _align, _nan_to_none, _with_ci, metric_key
from medtricks.audit.saliency import cam_target_layer, grad_cam, overlay
from medtricks.errors import ConfigError, MedtricksError
from medtricks.evaluate.metrics import _auroc, bootstrap_ci, compute_metrics

__all__ = [
    "lung_field_mask",
    "hide_lungs",
    "lungs_only",
    "blank_border",
    "run_shortcut_audit",
    "ShortcutResult",
    "LUNGS_HIDDEN_AUROC",
    "BORDER_DROP",
]

#: Lungs-hidden AUROC whose CI lower bound above this flags a shortcut (0.5 = chance).
LUNGS_HIDDEN_AUROC = 0.65
#: Smallest feature-map side at which Grad-CAM can tell the lung field from the rest of the image.
MIN_CAM_GRID = 4
#: Border-blanking AUROC drop whose CI lower bound above this flags a shortcut.
BORDER_DROP = 0.02
_CI = 0.95


def _fill(x01: torch.Tensor, region: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    """``x01`` with ``region`` (H, W bool) set to ``value`` (default: the batch's median grey). One value for
    every image: a per-image statistic would leak the image's brightness into the filled region."""
    value = float(x01.median()) if value is None else float(value)
    return torch.where(region.view(1, 1, *region.shape), torch.full_like(x01, value), x01)


def hide_lungs(x01: torch.Tensor, mask: np.ndarray, value: Optional[float] = None) -> torch.Tensor:
    """The lung field filled with one grey ``value``."""
    return _fill(x01, torch.as_tensor(mask, device=x01.device), value)


def lungs_only(x01: torch.Tensor, mask: np.ndarray, value: Optional[float] = None) -> torch.Tensor:
    """Everything but the lung field filled with one grey ``value``."""
    return _fill(x01, ~torch.as_tensor(mask, device=x01.device), value)


def blank_border(x01: torch.Tensor, fraction: float, value: Optional[float] = None) -> torch.Tensor:
    """A frame ``fraction`` of the side wide on each edge filled with one grey ``value``."""
    h, w = x01.shape[-2:]
    k_h, k_w = max(1, round(fraction * h)), max(1, round(fraction * w))
    frame = torch.ones((h, w), dtype=torch.bool, device=x01.device)
    frame[k_h : h - k_h, k_w : w - k_w] = False
    return _fill(x01, frame, value)


@dataclass
class ShortcutResult:
    """What the shortcut audit measured: metrics per variant (with CIs), the Grad-CAM share in the lung
    field, the verdicts, and overlay images (``overlays``: name -> RGB uint8 array)."""

    classes: list[str]
    config: dict[str, Any]
    variants: dict[str, dict[str, float]]
    border_drop: dict[str, float]
    cam_lung_share: dict[str, float]
    flags: dict[str, bool]
    verdict: str
    overlays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """Flat ``audit/shortcut/...`` keys for the run store."""
        out: dict[str, float] = {}
        for variant, values in self.variants.items():
            for name, value in values.items():
                out[metric_key("audit", "shortcut", variant, name)] = float(value)
        for name, value in self.border_drop.items():
            out[metric_key("audit", "shortcut", "border_auroc_drop", name)] = float(value)
        for name, value in self.cam_lung_share.items():
            out[metric_key("audit", "shortcut", "cam_lung_share", name)] = float(value)
        for name, flagged in self.flags.items():
            out[metric_key("audit", "shortcut", "flag", name)] = float(flagged)
        return out

    def to_json(self) -> str:
        doc = {
            "classes": self.classes,
            "config": self.config,
            "variants": self.variants,
            "border_auroc_drop": self.border_drop,
            "cam_lung_share": self.cam_lung_share,
            "flags": self.flags,
            "verdict": self.verdict,
        }
        return json.dumps(_nan_to_none(doc), indent=2, allow_nan=False)

    def table(self) -> str:
        c = self.config
        lines = [
            f"Shortcut audit: n={c['n_images']} images, {100 * _CI:g}% percentile bootstrap "
            f"({c['n_bootstrap']} resamples); lung field = fixed ellipses ({c['lung_area']:.0%} of the image), "
            f"border = {c['border']:.0%} frame"
        ]
        rows = [("variant", "AUROC", "accuracy")]
        rows += [
            (variant, _with_ci(values, "auroc"), _with_ci(values, "accuracy"))
            for variant, values in self.variants.items()
        ]
        lines += _align(rows)
        lines.append(f"border blanked: AUROC drop {_with_ci(self.border_drop, 'value')}")
        lines.append(
            f"Grad-CAM share in the lung field: {_with_ci(self.cam_lung_share, 'value')} "
            f"(the field is {c['lung_area']:.0%} of the image); {c.get('grad_cam', '')}"
        )
        lines.append(self.verdict)
        return "\n".join(lines)


def _scored(y, probs, classes, n_bootstrap, seed) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = compute_metrics(y, probs, classes, n_bootstrap=n_bootstrap, ci=_CI, seed=seed)
    out = {}
    for key in ("auroc", "accuracy"):
        out[key] = float(res.values.get(key, math.nan))
        low, high = res.ci.get(key, (math.nan, math.nan))
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(low), float(high)
    return out


def _paired_drop(y, p_clean, p_other, n_bootstrap, seed) -> dict[str, float]:
    """AUROC(clean) - AUROC(other) on the same images, with a paired percentile-bootstrap CI."""
    k = p_clean.shape[1]
    both = np.concatenate([p_clean, p_other], axis=1)

    def drop(yy, pp):
        return _auroc(yy, pp[:, :k]) - _auroc(yy, pp[:, k:])

    value = drop(y, both)
    low = high = math.nan
    if n_bootstrap:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = bootstrap_ci(drop, y, both, n_bootstrap=n_bootstrap, ci=_CI, seed=seed)
    return {"value": float(value), "value_ci_low": float(low), "value_ci_high": float(high)}


def run_shortcut_audit(
    model: nn.Module,
    loader: Any,
    *,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    n: Optional[int] = 500,
    border: float = 0.08,
    lung_mask: Optional[np.ndarray] = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cam: bool = True,
    n_overlays: int = 4,
    progress: bool = True,
) -> ShortcutResult:
    """Run the four probes of the module docstring on the first ``n`` images of ``loader``.

    ``loader`` yields normalised ``(images, targets)`` as the run's eval loader does; ``mean``/``std`` are
    that normalisation (the probes work on pixels in [0, 1]). ``cam=False`` skips (c) and (d).
    """
    from tqdm.auto import tqdm

    names = [str(c) for c in classes]
    if len(names) < 2:
        raise ConfigError(f"classes must name >= 2 classes, got {classes!r}")
    if not (0.0 < float(border) < 0.5):
        raise ConfigError(f"border must be a fraction of the side in (0, 0.5), e.g. 0.08; got {border!r}")
    mean_l, std_l = _check_mean_std(mean, std)
    device = torch.device(device)
    mean_t = torch.tensor(mean_l, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std_l, device=device).view(1, -1, 1, 1)
    model01 = normalized_model(model, mean_l, std_l)
    ys, xs, probs = [], [], {"clean": [], "lungs_hidden": [], "lungs_only": [], "border_blanked": []}
    mask, fill = None, None
    seen = 0
    with _frozen(model), torch.no_grad():
        model.to(device)
        for images, targets in tqdm(loader, desc="shortcut audit", disable=not progress, leave=False):
            if n is not None and seen >= n:
                break
            if n is not None:
                images, targets = images[: n - seen], targets[: n - seen]
            x01 = (images.to(device) * std_t + mean_t).clamp(0.0, 1.0)
            if mask is None:
                fill = float(x01.median())  # the first batch's median grey, then fixed for every image
                mask = lung_mask if lung_mask is not None else lung_field_mask(*x01.shape[-2:])
                if mask.shape != tuple(x01.shape[-2:]):
                    raise ConfigError(f"lung_mask has shape {mask.shape}, the images {tuple(x01.shape[-2:])}")
            for variant, x in (
                ("clean", x01),
                ("lungs_hidden", hide_lungs(x01, mask, fill)),
                ("lungs_only", lungs_only(x01, mask, fill)),
                ("border_blanked", blank_border(x01, border, fill)),
            ):
                probs[variant].append(torch.softmax(model01(x).float(), dim=1).cpu().numpy())
            ys.append(np.asarray(targets))
            xs.append(x01.cpu())
            seen += len(targets)
    if seen == 0:
        raise ConfigError("the shortcut audit loader yielded no images")
    y = np.concatenate(ys)
    p = {k: np.concatenate(v) for k, v in probs.items()}
    variants = {k: _scored(y, v, names, n_bootstrap, seed) for k, v in p.items()}
    border_drop = _paired_drop(y, p["clean"], p["border_blanked"], n_bootstrap, seed)
    lung_area = float(mask.mean())
    cam_share, overlays = {"value": math.nan, "value_ci_low": math.nan, "value_ci_high": math.nan}, {}
    cam_note = "Grad-CAM not run (cam=False)"
    if cam:
        cam_share, overlays, cam_note = _cam_probe(
            model,
            torch.cat(xs),
            y,
            p["clean"],
            mask,
            mean=mean_l,
            std=std_l,
            device=device,
            n_overlays=n_overlays,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    flags, verdict = _verdict(variants, border_drop, cam_share, lung_area)
    config = {
        "n_images": int(seen),
        "n_requested": n,
        "border": float(border),
        "lung_area": lung_area,
        "fill_grey": fill,
        "grad_cam": cam_note,
        "lung_field": "ellipses at x=0.30/0.70, y=0.50 of the side, semi-axes 0.17 w x 0.30 h"
        if lung_mask is None
        else "given mask",
        "n_bootstrap": int(n_bootstrap),
        "seed": seed,
        "thresholds": {"lungs_hidden_auroc_ci_low": LUNGS_HIDDEN_AUROC, "border_drop_ci_low": BORDER_DROP},
    }
    return ShortcutResult(
        classes=names,
        config=config,
        variants=variants,
        border_drop=border_drop,
        cam_lung_share=cam_share,
        flags=flags,
        verdict=verdict,
        overlays=overlays,
    )


def _cam_probe(model, x01, y, clean_probs, mask, *, mean, std, device, n_overlays, n_bootstrap, seed):
    """(c) overlays of the most confident right and wrong predictions; (d) Grad-CAM mass in the lung field."""
    pred = clean_probs.argmax(1)
    # Binary: the positive class's map; multiclass: the predicted class's (as `predict --cam`).
    target = np.ones_like(pred) if clean_probs.shape[1] == 2 else pred
    norm = (x01 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    # The last feature map, or (small inputs) the deepest one of at least MIN_CAM_GRID^2 cells.
    last_name, _ = cam_target_layer(model, input_shape=tuple(norm.shape[1:]))
    empty = {"value": math.nan, "value_ci_low": math.nan, "value_ci_high": math.nan}
    try:
        name, layer = cam_target_layer(model, input_shape=tuple(norm.shape[1:]), min_grid=MIN_CAM_GRID)
    except MedtricksError:
        return (
            empty,
            {},
            (
                f"Grad-CAM skipped: no feature map of the model is {MIN_CAM_GRID}x{MIN_CAM_GRID} or finer "
                f"at this input size, too coarse to tell the lungs from the rest"
            ),
        )
    grid = _feature_grid(model, layer, norm[:1].to(device))
    maps = []
    for start in range(0, len(norm), 16):
        maps.append(
            grad_cam(model, layer, norm[start : start + 16].to(device), [int(t) for t in target[start : start + 16]])
        )
    heat = np.concatenate(maps).astype(np.float64)  # (N, H, W) in [0, 1]
    total = heat.reshape(len(heat), -1).sum(1)
    inside = (heat * mask[None]).reshape(len(heat), -1).sum(1)
    flat = heat.reshape(len(heat), -1).std(1) < 1e-6  # an all-zero (or constant) map locates nothing
    share = np.where((total > 0) & ~flat, inside / np.maximum(total, 1e-12), np.nan)
    valid = share[np.isfinite(share)]
    where = (
        ""
        if name == last_name
        else (
            f" ({name}: the last feature map, {last_name}, is coarser than "
            f"{MIN_CAM_GRID}x{MIN_CAM_GRID} at this input size)"
        )
    )
    note = (
        f"Grad-CAM at a {grid[0]}x{grid[1]} feature map{where}; {int(flat.sum())} of {len(heat)} maps flat (left out)"
    )
    out = {
        "value": float(valid.mean()) if valid.size else math.nan,
        "value_ci_low": math.nan,
        "value_ci_high": math.nan,
    }
    if valid.size > 1 and n_bootstrap:
        low, high = bootstrap_ci(
            lambda v, _: float(v.mean()), valid, valid[:, None], n_bootstrap=n_bootstrap, ci=_CI, seed=seed
        )
        out["value_ci_low"], out["value_ci_high"] = float(low), float(high)
    confidence = clean_probs.max(1)
    overlays = {}
    gray = x01.mean(1).numpy()  # (N, H, W) for display
    for kind, chosen in (("right", pred == y), ("wrong", pred != y)):
        order = [i for i in np.argsort(-confidence) if chosen[i]][:n_overlays]
        for rank, i in enumerate(order):
            overlays[f"{kind}_{rank + 1}_p{confidence[i]:.2f}"] = overlay(gray[i], heat[i])
    return out, overlays, note


def _feature_grid(model, layer, image) -> tuple[int, int]:
    """Height and width of ``layer``'s output for one image."""
    seen = {}

    def hook(_module, _inputs, output):  # returns None: a forward hook's return value replaces the output
        seen.setdefault("shape", tuple(output.shape[-2:]))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        handle.remove()
    return seen.get("shape", (0, 0))


def _verdict(variants, border_drop, cam_share, lung_area) -> tuple[dict[str, bool], str]:
    hidden = variants["lungs_hidden"]
    flags = {
        "lungs_hidden": bool(math.isfinite(hidden["auroc_ci_low"]) and hidden["auroc_ci_low"] > LUNGS_HIDDEN_AUROC)
        or bool(not math.isfinite(hidden["auroc_ci_low"]) and hidden["auroc"] > 0.8),
        "border": bool(math.isfinite(border_drop["value_ci_low"]) and border_drop["value_ci_low"] > BORDER_DROP),
        "cam_outside_lungs": bool(math.isfinite(cam_share["value_ci_high"]) and cam_share["value_ci_high"] < lung_area),
    }
    reasons = []
    if flags["lungs_hidden"]:
        reasons.append(
            f"with the lungs hidden it still reaches AUROC {hidden['auroc']:.3f} "
            f"(CI low {hidden['auroc_ci_low']:.3f} > {LUNGS_HIDDEN_AUROC})"
        )
    if flags["border"]:
        reasons.append(
            f"blanking the border costs {border_drop['value']:.3f} AUROC "
            f"(CI low {border_drop['value_ci_low']:.3f} > {BORDER_DROP})"
        )
    if flags["cam_outside_lungs"]:
        reasons.append(
            f"Grad-CAM puts less of its mass in the lung field ({cam_share['value']:.2f}) than the field's "
            f"share of the image ({lung_area:.2f})"
        )
    if reasons:
        return flags, "VERDICT: shortcut suspected -- " + "; ".join(reasons) + ". Do not trust this model's AUROC."
    return flags, (
        "VERDICT: no shortcut found by these probes (lungs-hidden AUROC near chance, border not needed, "
        "Grad-CAM mass not outside the lungs); this does not prove the model reads the lungs."
    )
