"""``medtricks attention``: where does a trained model look? Attention maps of a ViT, per-stage activation
maps of a CNN, over the X-rays you give it.

    from medtricks import attention_maps
    result = attention_maps("runs/vit/<id>", ["/data/xrays"], out_dir="attention_out")
    print(result.table())

Images are read as ``medtricks predict`` reads them (:func:`medtricks.posthoc.predict.collect_images`: files and
folders, PNG/JPEG/TIFF/DICOM) and preprocessed with the run's own evaluation transform, so the model sees
what ``evaluate`` feeds it. An image that cannot be read is an error naming it.

**ViT** (timm VisionTransformer, :mod:`medtricks.evaluate.attention_capture`): per selected block and
head, the class token's attention over the patches; the attention rollout through *all* blocks (Abnar &
Zuidema 2020); the mean attention distance per block and head (Dosovitskiy et al. 2021, Fig. 7), averaged
over the images. The numbers: :mod:`medtricks.evaluate.attention_stats`.

**CNN**: per stage, the mean over channels of the absolute activation -- the side-by-side view of what
each stage responds to (not an attribution: for "why this class", use ``predict --cam``).

Outputs (:meth:`AttentionResult.save`): ``attention.json`` (the numbers, small), ``attention.npz`` (every
map at full resolution), ``attention_distance.png`` (ViT), and ``maps/<image>.png`` per image.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from medtricks.data.datasets import XrayDataset
from medtricks.errors import ConfigError, ResourceError
from medtricks.evaluate.attention_capture import AttentionProbe, StageProbe, VitLayout, cnn_stages, find_vit
from medtricks.evaluate.attention_plots import plot_attention_distance, plot_cnn_stages, plot_vit_attention
from medtricks.evaluate.attention_stats import attention_rollout, class_token_maps, mean_attention_distance
from medtricks.posthoc.store import posthoc_store, start_posthoc_run
from medtricks.posthoc.predict import check_outputs, collect_images, eval_transform
from medtricks.audit.saliency import cam_file_name
from medtricks.train import resolve_device
from medtricks.posthoc.load import load_trained

__all__ = ["attention_maps", "AttentionResult", "RESIDUAL"]

#: Weight of the identity in each rollout step (Abnar & Zuidema 2020: 0.5 A + 0.5 I).
RESIDUAL = 0.5
_JSON_GRID = 16  # CNN maps in the JSON: average-pooled to at most 16 x 16


@dataclass
class AttentionResult:
    """What :func:`attention_maps` found, per image. ViT: ``cls_maps`` ``(n, layers, heads, gh, gw)``,
    ``rollout`` ``(n, gh, gw)``, ``distances`` ``(n, layers, heads)`` in pixels of the backbone input.
    CNN: ``stage_maps``, one ``(n, h, w)`` array per stage. ``gray``: the images as the model saw them
    (channel 0, un-normalised, ``(n, H, W)`` in [0, 1])."""

    kind: str
    label: str
    model_name: str
    images: list[str]
    gray: np.ndarray = field(repr=False)
    layers: list[str]
    cls_maps: Optional[np.ndarray] = field(default=None, repr=False)
    rollout: Optional[np.ndarray] = field(default=None, repr=False)
    distances: Optional[np.ndarray] = field(default=None, repr=False)
    grid: Optional[tuple[int, int]] = None
    patch_size: Optional[tuple[int, int]] = None
    backbone_input: Optional[tuple[int, int]] = None
    num_prefix_tokens: int = 0
    class_token: bool = True
    residual: float = RESIDUAL
    layers_total: int = 0
    stage_maps: Optional[list[np.ndarray]] = field(default=None, repr=False)
    skipped: list[dict] = field(default_factory=list)
    logged_to: Optional[str] = None
    run_id: Optional[str] = None
    files: list[Path] = field(default_factory=list)

    @property
    def query(self) -> str:
        return "class token" if self.class_token else "mean of all tokens (no class token)"

    @property
    def mean_distance(self) -> Optional[np.ndarray]:
        """Mean attention distance ``(layers, heads)`` averaged over the images (ViT), else ``None``."""
        if self.distances is None:
            return None
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.distances, axis=0)

    def table(self) -> str:
        head = f"{self.kind.upper()} maps of {self.label} ({self.model_name}) on {len(self.images)} image(s)"
        if self.kind == "cnn":
            shapes = ", ".join(f"{n} {m.shape[1]}x{m.shape[2]}" for n, m in zip(self.layers, self.stage_maps))
            return f"{head}\nstages: {shapes}"
        md = self.mean_distance
        width = max(len("layer"), *(len(n) for n in self.layers))
        lines = [
            head,
            f"patch {self.patch_size[0]}x{self.patch_size[1]} px, grid {self.grid[0]}x{self.grid[1]}, "
            f"{self.num_prefix_tokens} prefix token(s); query: {self.query}",
            f"{'layer'.ljust(width)}  mean attention distance (px): mean over heads [min, max]",
        ]
        for name, row in zip(self.layers, md):
            lines.append(f"{name.ljust(width)}  {np.nanmean(row):7.2f} [{np.nanmin(row):.2f}, {np.nanmax(row):.2f}]")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "kind": self.kind,
            "run": self.label,
            "model": self.model_name,
            "images": self.images,
            "input_size": list(self.gray.shape[1:]),
            "layers": self.layers,
        }
        if self.skipped:
            out["skipped"] = [{"image": s["image"], "reason": s["reason"]} for s in self.skipped]
        if self.kind == "cnn":
            out["map"] = "mean over channels of |activation| at each stage's output (raw values, pooled to <= 16x16)"
            out["grids"] = {n: list(m.shape[1:]) for n, m in zip(self.layers, self.stage_maps)}
            out["per_image"] = {
                name: {n: _small(m[i]) for n, m in zip(self.layers, self.stage_maps)}
                for i, name in enumerate(self.images)
            }
            return out
        md = self.mean_distance
        out.update(
            {
                "patch_size": list(self.patch_size),
                "grid": list(self.grid),
                "backbone_input": list(self.backbone_input),
                "num_prefix_tokens": self.num_prefix_tokens,
                "query": self.query,
                "heads": int(md.shape[1]),
                "mean_attention_distance": {
                    "unit": "pixels of the backbone input",
                    "definition": "per query patch: sum over key patches of weight x distance between patch centres, "
                    "weights renormalised over the patch keys (prefix tokens left out); mean over query "
                    "patches and images (Dosovitskiy et al. 2021, Fig. 7)",
                    "per_layer_head": [[_num(v) for v in row] for row in md],
                    "per_layer": [_num(np.nanmean(row)) for row in md],
                },
                "rollout": {
                    "definition": f"Abnar & Zuidema 2020 through all {self.layers_total} blocks: mean over heads, "
                    f"{1 - self.residual:g} A + {self.residual:g} I, rows renormalised, multiplied; "
                    f"the {self.query} row over the patches",
                    "per_image": {
                        name: [[_num(v) for v in row] for row in self.rollout[i]] for i, name in enumerate(self.images)
                    },
                },
            }
        )
        return out

    def metrics(self) -> dict[str, float]:
        """ViT: ``attention_distance/<layer>`` (mean over heads and images, pixels) and their mean."""
        md = self.mean_distance
        if md is None:
            return {}
        per_layer = {n: float(np.nanmean(row)) for n, row in zip(self.layers, md)}
        out = {f"attention_distance/{_metric_name(n)}": v for n, v in per_layer.items() if math.isfinite(v)}
        finite = [v for v in per_layer.values() if math.isfinite(v)]
        if finite:
            out["attention_distance/mean"] = float(np.mean(finite))
        return out

    def figures(self) -> Iterator[tuple[str, Any]]:
        """``(relative file name, figure)`` pairs, one at a time: the distance plot (ViT), then one per image."""
        if self.kind == "vit":
            yield (
                "attention_distance.png",
                plot_attention_distance(
                    self.mean_distance,
                    self.layers,
                    patch_size=self.patch_size,
                    image_size=self.backbone_input,
                    title=f"{self.label} ({self.model_name}), {len(self.images)} image(s)",
                ),
            )
        taken: set[str] = set()
        for i, name in enumerate(self.images):
            rel = "maps/" + cam_file_name(name, taken)
            if self.kind == "vit":
                fig = plot_vit_attention(
                    self.gray[i],
                    self.cls_maps[i],
                    self.rollout[i],
                    self.layers,
                    title=f"{name} -- {self.label}",
                    query=self.query,
                )
            else:
                fig = plot_cnn_stages(
                    self.gray[i], [m[i] for m in self.stage_maps], self.layers, title=f"{name} -- {self.label}"
                )
            yield rel, fig

    def save(self, out_dir: str | Path, stem: str = "attention") -> list[Path]:
        """Write ``<stem>.json``, ``<stem>.npz``, the figures (:meth:`figures`) into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        js, npz = out / f"{stem}.json", out / f"{stem}.npz"
        arrays = {"gray": self.gray}
        if self.kind == "vit":
            arrays.update(cls_maps=self.cls_maps, rollout=self.rollout, distances=self.distances)
        else:
            arrays.update({f"stage_{i}": m for i, m in enumerate(self.stage_maps)})
        path = out
        try:
            out.mkdir(parents=True, exist_ok=True)
            path = js
            js.write_text(json.dumps(self.to_dict(), indent=1))
            path = npz
            np.savez_compressed(npz, images=np.array(self.images), layers=np.array(self.layers), **arrays)
            files = [js, npz]
            for rel, fig in self.figures():
                path = out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=100)
                files.append(path)
        except OSError as err:
            raise ResourceError(f"cannot write {path} ({err.strerror or err or type(err).__name__})") from None
        self.files = files
        return files


def _num(v: float) -> Optional[float]:
    v = float(v)
    return round(v, 5) if math.isfinite(v) else None


def _small(heat: np.ndarray) -> list[list[Optional[float]]]:
    t = torch.as_tensor(heat, dtype=torch.float64)[None, None]
    if max(t.shape[-2:]) > _JSON_GRID:
        t = F.adaptive_avg_pool2d(t, (min(t.shape[-2], _JSON_GRID), min(t.shape[-1], _JSON_GRID)))
    return [[_num(v) for v in row] for row in t[0, 0].tolist()]


def _metric_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", layer)


def _patterns(layers: Optional[str | Sequence[str]]) -> Optional[list[str]]:
    if layers is None:
        return None
    pats = [p.strip() for p in layers.split(",")] if isinstance(layers, str) else [str(p).strip() for p in layers]
    pats = [p for p in pats if p]
    return pats or None


def _select_vit(layout: VitLayout, layers) -> list[str]:
    names = [layer.name for layer in layout.layers]
    pats = _patterns(layers)
    if pats is None:
        return names
    for p in pats:
        if not any(fnmatchcase(layer.name, p) or fnmatchcase(layer.attn_name, p) for layer in layout.layers):
            raise ConfigError(
                f"--layers pattern {p!r} matches no transformer block (they are named "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
    return [
        layer.name
        for layer in layout.layers
        if any(fnmatchcase(layer.name, p) or fnmatchcase(layer.attn_name, p) for p in pats)
    ]


def _select_cnn(model, layers) -> list[str]:
    pats = _patterns(layers)
    if pats is None:
        return cnn_stages(model)
    names = [n for n, _ in model.named_modules() if n]
    for p in pats:
        if not any(fnmatchcase(n, p) for n in names):
            raise ConfigError(
                f"--layers pattern {p!r} matches no module of the model (its stages are named like "
                f"{', '.join(cnn_stages(model)[:3])})"
            )
    return [n for n in names if any(fnmatchcase(n, p) for p in pats)]


def _label(trained, ref: str) -> str:
    if trained.run_id:
        return f"{trained.recipe.experiment.name}:{str(trained.run_id)[:8]}"
    return Path(ref).name or str(ref)


def attention_maps(
    run: str,
    images: Sequence[str | Path],
    *,
    layers: Optional[str | Sequence[str]] = None,
    out_dir: Optional[str | Path] = None,
    log: bool = False,
    batch_size: int = 8,
    max_images: int = 16,
    residual: float = RESIDUAL,
    device: str = "auto",
    tracking_uri: Optional[str] = None,
    runs_dir: Optional[str | Path] = None,
    progress: bool = True,
) -> AttentionResult:
    """Attention maps (ViT) or per-stage activation maps (CNN) of a trained run on ``images`` (files and
    folders, searched recursively; at most ``max_images``, the first in sorted order).

    ``layers``: fnmatch patterns (a list, or comma-separated) on block names (ViT: ``blocks.1*``; the
    rollout always runs through every block) or module names (CNN; default: each stage's output).
    ``out_dir``: write the outputs there (:meth:`AttentionResult.save`; it must not hold an input image).
    ``log``: also log them (and, for a ViT, ``attention_distance/<block>`` metrics) to the run's store,
    onto the run when the store has it, else onto a new run tagged ``medtricks.attention_of``.
    Returns an :class:`AttentionResult` (``.table()``, ``.to_dict()``, ``.save(dir)``).
    """
    if int(batch_size) < 1 or int(max_images) < 1:
        raise ConfigError(f"--batch-size {batch_size} and --max-images {max_images}: expected at least 1 each")
    if out_dir is not None:
        check_outputs(images, cam_dir=out_dir)  # the per-image PNGs never overwrite an input
    items, not_images = collect_images(images)
    if not items:
        raise ConfigError(
            f"no image found in {', '.join(str(i) for i in images)}"
            + (f" ({len(not_images)} file(s) that are not images)" if not_images else "")
        )
    if len(items) > max_images:
        print(f"note: {len(items)} images found; using the first {max_images} (--max-images)")
        items = items[:max_images]
    dev = resolve_device(device)
    trained = load_trained(run, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    model = trained.model.eval()
    layout = find_vit(model)
    selected = _select_vit(layout, layers) if layout is not None else _select_cnn(model, layers)
    manifest = pd.DataFrame({"path": [str(i.path) for i in items], "target": 0})
    loader = DataLoader(XrayDataset(manifest, eval_transform(trained)), batch_size=int(batch_size), shuffle=False)
    mean = float(np.ravel(trained.data_config["mean"])[0])
    std = float(np.ravel(trained.data_config["std"])[0])
    from tqdm.auto import tqdm

    grays, cls, rolls, dists, stage = [], [], [], [], {n: [] for n in selected}
    info: dict[str, Any] = {}
    for batch, _ in tqdm(loader, desc="attention", unit="batch", disable=not progress, leave=False):
        grays.append((batch[:, 0] * std + mean).clamp(0, 1).numpy())
        x = batch.to(dev)
        if layout is not None:
            with AttentionProbe(layout) as probe, torch.no_grad():
                model(x)
            grid = layout.grid(probe.input_size)
            info.update(grid=grid, backbone_input=probe.input_size)
            probs = [probe.probs[layer.name] for layer in layout.layers]
            kw = dict(num_prefix_tokens=layout.num_prefix_tokens)
            keep = [probe.probs[n] for n in selected]
            cls.append(
                torch.stack([class_token_maps(p, grid, class_token=layout.class_token, **kw) for p in keep], 1)
                .cpu()
                .numpy()
            )
            roll = attention_rollout(probs, residual=residual)
            rolls.append(class_token_maps(roll, grid, class_token=layout.class_token, **kw).cpu().numpy())
            dists.append(
                torch.stack([mean_attention_distance(p, grid, layout.patch_size, **kw) for p in keep], 1).cpu().numpy()
            )
        else:
            with StageProbe(model, selected) as probe, torch.no_grad():
                model(x)
            for n in selected:
                stage[n].append(probe.maps[n].cpu().numpy())
    common = dict(
        label=_label(trained, run),
        model_name=trained.recipe.model.name,
        images=[i.image for i in items],
        gray=np.concatenate(grays),
        layers=selected,
        skipped=not_images,
    )
    if layout is not None:
        result = AttentionResult(
            kind="vit",
            cls_maps=np.concatenate(cls),
            rollout=np.concatenate(rolls),
            distances=np.concatenate(dists),
            patch_size=layout.patch_size,
            num_prefix_tokens=layout.num_prefix_tokens,
            class_token=layout.class_token,
            residual=residual,
            layers_total=len(layout.layers),
            **info,
            **common,
        )
    else:
        result = AttentionResult(kind="cnn", stage_maps=[np.concatenate(stage[n]) for n in selected], **common)
    if out_dir is not None:
        result.save(out_dir)
    if log:
        _log(result, trained, tracking_uri, runs_dir)
    return result


def _log(result: AttentionResult, trained, tracking_uri, runs_dir) -> None:
    """As ``medtricks cka`` logs: onto the run when its store has it, else onto a new run tagged with it."""
    store = posthoc_store(trained, tracking_uri, runs_dir)
    result.logged_to = store.describe()
    result.run_id = start_posthoc_run(
        store, trained, kind="attention", tags={"medtricks.attention_of": str(trained.run_id)}
    )
    try:
        kept = result.files
        with tempfile.TemporaryDirectory(prefix="medtricks-attention-") as tmp:
            for path in result.save(tmp):
                rel = path.parent.relative_to(tmp).as_posix()
                store.log_artifact(path, "attention" if rel == "." else f"attention/{rel}")
        result.files = kept
        store.log_metrics(result.metrics())
    finally:
        store.end()
