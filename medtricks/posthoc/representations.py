"""``medtricks cka``: which layers did fine-tuning move? CKA between the blocks of two trained runs, or
of a run and its starting weights, on the same images.

    from medtricks.posthoc.representations import cka_trained
    result = cka_trained("runs/kermany/<id>", vs_init=True, n=500)
    print(result.table()); result.save("cka_out")

Layers: by default every residual block of a CNN (the block finder of the BN-gamma strategies,
:mod:`medtricks.gamma.blocks`) or every transformer block of a ViT (that of the
LayerScale-gamma strategies); ``granularity="stage"`` takes each CNN stage's output instead (``layer1``
.. ``layer4``; a ViT keeps its blocks); ``layers`` (fnmatch patterns on qualified module names) picks
others, for both runs, or for run A only when ``layers_b`` picks run B's. Each selected module's output
is captured with a forward hook and flattened per image, so a ViT block's tokens ``(N, C)`` and a CNN
stage's map ``(C, h, w)`` compare alike: CKA needs only each layer's ``n x n`` Gram matrix.

Across architectures (``medtricks cka RUN_VIT RUN_CNN --granularity stage``): each model gets the images
through its own evaluation transform (its own image size and normalization), and the two runs must read
the same image files in the same order (:func:`~medtricks.posthoc.evaluation.image_set_digest` compares the paths),
which the same ``card``/``root``/``split`` with run A's split settings give. The heat map then has no
diagonal; the table lists, for each layer of A, the layer of B most like it.

Data: ``card``/``root`` (every image, or ``split``) or, by default, the *validation* split of run A's
own data (``split`` overrides). The same ``n`` images (a seeded random subset) go through both models,
each normalized as its own run trained. CKA describes representations, not performance: no image
of a test split is needed, and none is used unless asked for.

``method``: ``minibatch`` (default; Nguyen et al. 2021, unbiased HSIC averaged over minibatches of
``batch_size``, memory O(batch^2) per layer) or ``linear`` (Kornblith et al. 2019 on all ``n`` images at
once; holds every selected layer's activations in memory).

``vs_init``: model B is run A's recipe rebuilt with its starting weights (:func:`medtricks.posthoc.load.
build_model` after seeding with ``experiment.seed`` as ``medtricks run`` does: the pretrained weights as
loaded, and the same random head, *before* any gamma strategy), so the diagonal reads "how much did
fine-tuning change block i" (1 = unchanged).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from medtricks.data import load_card
from medtricks.errors import ConfigError
from medtricks.evaluate.cka import MinibatchCKA, linear_cka
from medtricks.evaluate.plots import plot_cka
from medtricks.posthoc.evaluation import eval_dataset, image_set_digest
from medtricks.posthoc.store import posthoc_store, start_posthoc_run
from medtricks.train import resolve_device, seed_everything
from medtricks.posthoc.load import build_model, load_trained
from medtricks.gamma.blocks import find_residual_norms, find_stages
from medtricks.gamma.layerscale import find_layerscale

__all__ = ["CKAResult", "cka_trained", "default_layers", "select_layers", "capture_cka", "METHODS", "GRANULARITIES"]

METHODS = ("minibatch", "linear")
GRANULARITIES = ("block", "stage")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"--granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")


def default_layers(model: nn.Module, granularity: str = "block") -> list[str]:
    """The modules whose outputs CKA compares by default: every transformer block (ViT, either
    granularity), every residual block (CNN, ``granularity="block"``) or every stage container (CNN,
    ``"stage"``: :func:`~medtricks.gamma.blocks.find_stages`); a model with neither: its
    top-level children."""
    _check_granularity(granularity)
    blocks = list(dict.fromkeys(s.block_name for s in find_layerscale(model)))
    if blocks:
        return blocks
    blocks = [r.name for r in find_residual_norms(model)] if granularity == "block" else find_stages(model)
    if blocks:
        return blocks
    return [name for name, _ in model.named_children()]


def select_layers(
    model: nn.Module,
    patterns: Optional[str | Sequence[str]] = None,
    *,
    granularity: str = "block",
    option: str = "--layers",
) -> list[str]:
    """Module names picked by fnmatch ``patterns`` (a list, or a comma-separated string), in model
    order; ``None``: :func:`default_layers` at ``granularity``. A pattern that matches nothing is an error
    naming it (and ``option``, the command-line option that gave it)."""
    if patterns is None:
        layers = default_layers(model, granularity)
    else:
        pats = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else list(patterns)
        pats = [p for p in pats if p]
        names = [n for n, _ in model.named_modules() if n]
        for p in pats:
            if not any(fnmatchcase(n, p) for n in names):
                example = ", ".join(default_layers(model, granularity)[:3])
                raise ConfigError(
                    f"{option} pattern {p!r} matches no module of the model (its blocks are named like {example})"
                )
        layers = [n for n in names if any(fnmatchcase(n, p) for p in pats)]
    if not layers:
        raise ConfigError(f"no layer selected for CKA; give {option} PATTERN")
    return layers


class _Capture:
    """Forward hooks that keep the latest output of each named module, flattened per image."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in layers:
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = next(o for o in output if isinstance(o, torch.Tensor))
            self.out[name] = output.detach().reshape(output.shape[0], -1).to("cpu", torch.float64)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def capture_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    loader_a,
    loader_b,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
    *,
    method: str = "minibatch",
    device: Any = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """CKA matrix ``(len(layers_a), len(layers_b))`` of two models over two loaders that yield the same
    images in the same order (each normalized for its model). ``method``: see the module docstring."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    cap_a, cap_b = _Capture(model_a, layers_a), _Capture(model_b, layers_b)
    acc = MinibatchCKA(len(layers_a), len(layers_b))
    kept_a: list[list[torch.Tensor]] = [[] for _ in layers_a]
    kept_b: list[list[torch.Tensor]] = [[] for _ in layers_b]
    batches = zip(loader_a, loader_b)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=len(loader_a), desc="cka", leave=False)
    try:
        with torch.no_grad():
            for (xa, _), (xb, _) in batches:
                model_a(xa.to(device))
                model_b(xb.to(device))
                fa = [cap_a.out[n] for n in layers_a]
                fb = [cap_b.out[n] for n in layers_b]
                if method == "linear":
                    for keep, f in zip(kept_a, fa):
                        keep.append(f)
                    for keep, f in zip(kept_b, fb):
                        keep.append(f)
                elif fa[0].shape[0] >= 4:  # the unbiased HSIC needs 4 images; a tiny last batch is left out
                    acc.update(fa, fb)
    finally:
        cap_a.close()
        cap_b.close()
    if method == "minibatch":
        return acc.compute()
    xa = [torch.cat(k) for k in kept_a]
    xb = [torch.cat(k) for k in kept_b]
    return np.array([[linear_cka(a, b) for b in xb] for a in xa])


@dataclass
class CKAResult:
    """A CKA matrix between the layers of run A (rows) and of B (columns), with what it was computed on."""

    matrix: np.ndarray
    layers_a: list[str]
    layers_b: list[str]
    label_a: str
    label_b: str
    method: str
    n_images: int
    data: str
    batch_size: int
    vs_init: bool = False
    granularity: str = "block"
    model_a: str = ""
    model_b: str = ""
    logged_to: Optional[str] = None
    run_id: Optional[str] = None
    files: list[Path] = field(default_factory=list)

    @property
    def cross_architecture(self) -> bool:
        """Whether A and B are different architectures (their layers do not pair up one to one)."""
        return bool(self.model_a and self.model_b and self.model_a != self.model_b)

    @property
    def diagonal(self) -> Optional[list[float]]:
        """CKA of layer i of A with layer i of B, when both are the same architecture with the same layer names."""
        if self.layers_a != self.layers_b or self.cross_architecture:
            return None
        return [float(self.matrix[i, i]) for i in range(len(self.layers_a))]

    def table(self) -> str:
        head = (
            f"CKA ({self.method}{f', batch {self.batch_size}' if self.method == 'minibatch' else ''}) "
            f"of {self.label_a} vs {self.label_b} on {self.n_images} images ({self.data})"
        )
        diag = self.diagonal
        if diag is None:
            return head + "\n" + self._best_matches()
        width = max(len("layer"), *(len(n) for n in self.layers_a))
        lines = [head, f"{'layer'.ljust(width)}  {'CKA':>6}  {'1-CKA':>6}", f"{'-' * width}  ------  ------"]
        lines += [f"{n.ljust(width)}  {v:6.3f}  {1 - v:6.3f}" for n, v in zip(self.layers_a, diag)]
        if self.vs_init:
            finite = [(v, n) for v, n in zip(diag, self.layers_a) if math.isfinite(v)]
            if finite:
                lowest = min(finite)
                lines.append(f"moved most by fine-tuning: {lowest[1]} (CKA {lowest[0]:.3f} with its starting weights)")
        return "\n".join(lines)

    def _best_matches(self) -> str:
        """For each layer of A, the layer of B most like it (the heat map's brightest cell in each row)."""
        width = max(len("layer of A"), *(len(n) for n in self.layers_a))
        lines = [
            f"{len(self.layers_a)} x {len(self.layers_b)} layers (heat map / JSON); most similar layer of B:",
            f"{'layer of A'.ljust(width)}  {'CKA':>6}  layer of B",
            f"{'-' * width}  ------  ----------",
        ]
        for name, row in zip(self.layers_a, self.matrix):
            finite = [(v, j) for j, v in enumerate(row) if math.isfinite(v)]
            if finite:
                value, j = max(finite)
                lines.append(f"{name.ljust(width)}  {value:6.3f}  {self.layers_b[j]}")
            else:
                lines.append(f"{name.ljust(width)}  {'nan':>6}  -")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "batch_size": self.batch_size,
            "n_images": self.n_images,
            "data": self.data,
            "a": self.label_a,
            "b": self.label_b,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "granularity": self.granularity,
            "vs_init": self.vs_init,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "matrix": [[None if not math.isfinite(v) else float(v) for v in row] for row in self.matrix],
            "diagonal": self.diagonal,
        }

    def figure(self):
        title = f"CKA {self.label_a} vs {self.label_b}\n{self.method}, {self.n_images} images ({self.data})"
        ylabel, xlabel = self.label_a, self.label_b
        if self.cross_architecture:
            ylabel, xlabel = f"{ylabel} ({self.model_a})", f"{xlabel} ({self.model_b})"
        return plot_cka(self.matrix, self.layers_a, self.layers_b, title=title, ylabel=ylabel, xlabel=xlabel)

    def save(self, out_dir: str | Path, stem: str = "cka") -> list[Path]:
        """Write ``<stem>.json`` and ``<stem>.png`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, png = out / f"{stem}.json", out / f"{stem}.png"
        js.write_text(json.dumps(self.to_dict(), indent=2))
        self.figure().savefig(png, dpi=120)
        self.files = [js, png]
        return self.files

    def metrics(self) -> dict[str, float]:
        """Per-layer diagonal values as metrics (``cka_init/<layer>`` or ``cka/<layer>``) and their mean."""
        diag = self.diagonal
        if diag is None:
            return {}
        prefix = "cka_init" if self.vs_init else "cka"
        out = {f"{prefix}/{_metric_name(n)}": v for n, v in zip(self.layers_a, diag) if math.isfinite(v)}
        finite = [v for v in diag if math.isfinite(v)]
        if finite:
            out[f"{prefix}/mean"] = float(np.mean(finite))
        return out


def _metric_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", layer)


def _label(trained, ref: str) -> str:
    if trained.run_id:
        return f"{trained.recipe.experiment.name}:{str(trained.run_id)[:8]}"
    return Path(ref).name or str(ref)


def _labels_unused(card_name: str, trained) -> Optional[dict[str, str]]:
    """CKA compares activations and never reads a label: a card whose classes differ from the model's is
    read with each class the model lacks labelled as the model's first class (every image kept; no class
    map to give)."""
    classes = list(load_card(card_name).classes)
    model_classes = list(trained.classes)
    if set(classes) == set(model_classes):
        return None
    return {c: c if c in model_classes else model_classes[0] for c in classes}


def cka_trained(
    run_a: str,
    run_b: Optional[str] = None,
    *,
    vs_init: bool = False,
    layers: Optional[str | Sequence[str]] = None,
    layers_b: Optional[str | Sequence[str]] = None,
    granularity: str = "block",
    card: Optional[str] = None,
    root: Optional[str] = None,
    split: Optional[str] = None,
    n: int = 500,
    batch_size: int = 64,
    method: str = "minibatch",
    seed: int = 0,
    out_dir: Optional[str | Path] = None,
    log: bool = False,
    tracking_uri: Optional[str] = None,
    runs_dir: Optional[str | Path] = None,
    device: str = "auto",
    progress: bool = True,
) -> CKAResult:
    """CKA between the layers of two trained runs (folders or run ids), or of one run and its starting
    weights (``vs_init=True``), on the same ``n`` images. Writes ``cka.json``/``cka.png`` into ``out_dir``
    when given; with ``log=True`` logs them (and the diagonal as metrics) to run A's run store, onto run A
    when that store has it (as ``audit`` does), else onto a new run tagged ``medtricks.cka_of``.

    ``layers``: fnmatch patterns for both runs, or for run A only when ``layers_b`` gives run B's.
    ``granularity``: ``block`` (default: residual blocks of a CNN) or ``stage`` (each CNN stage's output);
    a ViT's layers are its blocks either way. A and B may be different architectures (a ViT and a CNN,
    trained at different image sizes): see the module docstring."""
    if (run_b is None) == (not vs_init):
        raise ConfigError("give a second run (RUN_B) or --vs-init, not both and not neither")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    _check_granularity(granularity)
    if n < 4 or batch_size < 4:
        raise ConfigError(f"--n {n} and --batch-size {batch_size}: expected at least 4 each (unbiased HSIC)")
    if (card is None) != (root is None):
        raise ConfigError("--card and --root go together (the card that describes the data, and where it lies)")
    dev = resolve_device(device)
    a = load_trained(run_a, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    recipe = a.recipe
    card_name, data_root = (card, root) if card is not None else (recipe.data.card, recipe.data.root)
    split = split or ("all" if card is not None else "val")
    split_opts = dict(
        split_seed=recipe.data.split_seed,
        val_fraction=recipe.data.val_fraction,
        test_fraction=recipe.data.test_fraction,
    )
    ds_a, _ = eval_dataset(
        a, card_name, data_root, split=split, progress=progress, class_map=_labels_unused(card_name, a), **split_opts
    )

    if vs_init:
        # seeded as `medtricks run` seeds before it builds: weights none / a new head start exactly as the run did
        seed_everything(recipe.experiment.seed)
        model_b, _ = build_model(recipe, num_classes=len(a.classes))
        model_b.to(dev).eval()
        ds_b, label_b = ds_a, f"{_label(a, run_a)} at init ({recipe.model.weights})"
        name_b = recipe.model.name
    else:
        b = load_trained(run_b, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
        model_b, label_b, name_b = b.model, _label(b, run_b), b.recipe.model.name
        # run A's split settings, so that both runs see the very same images
        ds_b, _ = eval_dataset(
            b,
            card_name,
            data_root,
            split=split,
            progress=progress,
            class_map=_labels_unused(card_name, b),
            **split_opts,
        )
        if len(ds_b) != len(ds_a) or image_set_digest(ds_a, data_root) != image_set_digest(ds_b, data_root):
            raise ConfigError(
                f"runs {run_a} and {run_b} do not see the same images of {card_name} ({split}); "
                "give --card/--root with --split all"
            )
    count = min(n, len(ds_a))
    if count < 4:
        raise ConfigError(f"{card_name} ({split}) has {len(ds_a)} images; CKA needs at least 4")
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(ds_a), size=count, replace=False).tolist())
    bs = min(batch_size, count)
    loader_a = DataLoader(Subset(ds_a, idx), batch_size=bs, shuffle=False)
    loader_b = DataLoader(Subset(ds_b, idx), batch_size=bs, shuffle=False)
    layers_a = select_layers(a.model, layers, granularity=granularity)
    layers_b = (
        select_layers(model_b, layers_b, granularity=granularity, option="--layers-b")
        if layers_b is not None
        else select_layers(model_b, layers, granularity=granularity)
    )
    a.model.eval()
    matrix = capture_cka(
        a.model, model_b, loader_a, loader_b, layers_a, layers_b, method=method, device=dev, progress=progress
    )
    used = count if method == "linear" else count - (count % bs if count % bs < 4 else 0)
    result = CKAResult(
        matrix=matrix,
        layers_a=layers_a,
        layers_b=layers_b,
        label_a=_label(a, run_a),
        label_b=label_b,
        method=method,
        n_images=used,
        data=f"{card_name} {split}",
        batch_size=bs,
        vs_init=vs_init,
        granularity=granularity,
        model_a=recipe.model.name,
        model_b=name_b,
    )
    stem = "cka_vs_init" if vs_init else "cka"
    if out_dir is not None:
        result.save(out_dir, stem)
    if log:
        _log(result, a, stem, tracking_uri, runs_dir)
    return result


def _log(result: CKAResult, trained, stem: str, tracking_uri, runs_dir) -> None:
    import tempfile

    store = posthoc_store(trained, tracking_uri, runs_dir)
    result.logged_to = store.describe()
    result.run_id = start_posthoc_run(store, trained, kind="cka", tags={"medtricks.cka_of": str(trained.run_id)})
    try:
        kept = result.files
        with tempfile.TemporaryDirectory(prefix="medtricks-cka-") as tmp:
            for path in result.save(tmp, stem):
                store.log_artifact(path, "cka")
        result.files = kept
        store.log_metrics(result.metrics())
    finally:
        store.end()
