"""Export a trained run as one self-contained file: ONNX or TorchScript, preprocessing and softmax inside.

The exported graph is ``clamp(0, 1) -> (x - mean) / std -> model -> softmax``:

- **input** ``images``: float32 ``(N, in_chans, S, S)`` with values in [0, 1], ``S`` the run's input
  size (:meth:`Recipe.input_image_size`: ``data.image_size``, or the learnable resizer's
  ``input_size``); ``N`` is free (a dynamic axis in ONNX).
- **output** ``probs``: float32 ``(N, n_classes)`` class probabilities, in the order of the run's card.

The geometric part of the eval transform stays *outside* the graph, on purpose: medtricks resizes the
shorter side with OpenCV's area filter (linear when enlarging), which no ``torch.nn.functional.interpolate``
mode reproduces exactly at non-integer scales, so a resize in the graph would not give the parity that
is checked here. Callers do these steps (:func:`prepare_input` does them exactly as medtricks does):
decode to a gray float image in [0, 1] (:func:`medtricks.data.read_image`), resize the shorter side to
``ceil(S / crop_pct)`` (crop_pct 0.875 for ``paper_baseline``, else 1), round to 16-bit levels, center
crop ``S x S``, clip to [0, 1] and repeat the gray channel ``in_chans`` times.

After writing, the file is run (onnxruntime, or the TorchScript module loaded back) on real-looking
images -- the run's own validation images when its data is on this machine, else synthetic phantoms --
and compared with medtricks' own torch pipeline (eval transform, model, softmax). A max |delta prob|
above ``tolerance`` (1e-4) is an :class:`ExportParityError` and leaves no file behind. A model card
(``<out>.md``) records classes, input contract, mean/std, the parity number, the run and its stored
operating point.

``mlflow``: an MLflow pyfunc model folder (``mlflow models serve -m <folder>``) around the same
TorchScript file, parity-checked the same way, with the model card as ``<folder>/MODEL_CARD.md``
(:mod:`medtricks.tracking.mlflow_model`: input the same float32 tensor, output ``prob_<class>`` and
``predicted`` at the stored operating point).

Example::

    from medtricks.posthoc.export import export_model
    result = export_model("runs/quickstart/20261201-101406-d20d09", "onnx", "exports/model.onnx")
    print(result.max_abs_diff, result.card_path)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from medtricks import __version__
from medtricks._atomic import atomic_paths, write_bytes
from medtricks.data import build_eval_dataset, synthesize_phantoms
from medtricks.data.datasets import resize_shorter_side
from medtricks.data.transforms import build_transforms, eval_resize_side
from medtricks.errors import ConfigError, MedtricksError, MissingFileError, ResourceError
from medtricks.posthoc.decision import load_operating_point
from medtricks.tracking import save_mlflow_model
from medtricks.posthoc.load import load_trained

__all__ = [
    "FORMATS",
    "ExportWrapper",
    "ExportResult",
    "ExportParityError",
    "export_model",
    "prepare_input",
    "DEFAULT_OPSET",
    "PARITY_TOLERANCE",
]

FORMATS = ("onnx", "torchscript", "mlflow")
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
MLFLOW_CARD = "MODEL_CARD.md"  # the model card's name inside an MLflow model folder


class ExportParityError(MedtricksError, RuntimeError):
    """The exported file's probabilities differ from medtricks' torch pipeline by more than the tolerance."""


class ExportWrapper(nn.Module):
    """``images`` in [0, 1], ``(N, C, S, S)`` -> class probabilities: clamp, normalize, model, softmax."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", _per_channel(mean, in_chans, "mean").view(1, in_chans, 1, 1))
        self.register_buffer("std", _per_channel(std, in_chans, "std").view(1, in_chans, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(0.0, 1.0) - self.mean) / self.std  # the eval transform clips, then normalizes
        return torch.softmax(self.model(x).float(), dim=1)


def _per_channel(values: Sequence[float], in_chans: int, name: str) -> torch.Tensor:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans:
        raise ConfigError(f"{name} has {len(values)} values {values}; expected 1 or in_chans={in_chans}")
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how closely the file matches the torch pipeline."""

    path: Path
    card_path: Path
    fmt: str
    input_shape: tuple  # (None, C, S, S): None is the free batch axis
    classes: list[str]
    max_abs_diff: float  # max |delta prob| of the exported file vs medtricks' torch eval pipeline
    n_checked: int
    check_source: str  # "validation split of the run's data (N images)" or "synthetic phantoms (N images)"
    run_id: Optional[str] = None
    opset: Optional[int] = None  # ONNX: the opset the file holds

    def summary(self) -> str:
        return (
            f"exported {self.fmt} model: {self.path}\n"
            f"model card: {self.card_path}\n"
            f"input: float32 {_shape_text(self.input_shape)} in [0, 1]; output: probabilities of "
            f"{', '.join(self.classes)}\n"
            f"parity: max |delta prob| = {self.max_abs_diff:.2e} vs the torch eval pipeline on "
            f"{self.check_source} (tolerance {PARITY_TOLERANCE:g})"
        )


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


# ------------------------------------------------------------------------------------ preprocessing
def prepare_input(image, *, image_size: int, in_chans: int = 1, augment: str = "cxr_light") -> np.ndarray:
    """A decoded gray float image (H, W) in [0, 1] -> float32 ``(in_chans, S, S)`` in [0, 1]: what the
    exported graph expects, made exactly as medtricks' eval pipeline makes it before normalization
    (shorter side to the eval side -- area filter when shrinking, linear when enlarging --, 16-bit
    levels, center crop, clip, channel repeat). ``augment`` is the run's ``data.augment`` preset (it
    decides the crop fraction); ``image_size`` the run's ``recipe.input_image_size()``.

    Example::

        x = np.stack([prepare_input(read_image(p), image_size=224) for p in paths])
        probs = session.run(None, {"images": x})[0]
    """

    transform = build_transforms(augment, image_size, mean=(0.0,), std=(1.0,), in_chans=in_chans, train=False)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ConfigError(f"expected a gray image of shape (H, W), got shape {image.shape}")
    image = resize_shorter_side(image, transform.base_side)
    levels = np.round(np.clip(image, 0.0, 1.0) * 65535.0)  # the decode step's 16-bit quantization
    return transform((levels / 65535.0).astype(np.float32)).numpy()


# ---------------------------------------------------------------------------------- parity images
def _check_images(trained, n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` eval-transformed images in [0, 1] (before normalization): the run's validation split
    when its data is here, else synthetic phantoms."""
    recipe = trained.recipe
    size, in_chans = recipe.input_image_size(), recipe.model.in_chans
    kwargs = dict(
        image_size=size,
        mean=(0.0,),
        std=(1.0,),
        in_chans=in_chans,
        augment=recipe.data.augment,
        on_bad_image="skip",
        progress=False,
    )
    root = Path(recipe.data.root).expanduser()
    if root.is_dir():
        with contextlib.suppress(MedtricksError, OSError, ValueError, KeyError):
            dataset, _ = build_eval_dataset(
                recipe.data.card,
                root,
                split="val",
                split_seed=recipe.data.split_seed,
                val_fraction=recipe.data.val_fraction,
                test_fraction=recipe.data.test_fraction,
                test_by=recipe.data.test_by,
                **kwargs,
            )
            if len(dataset):
                images = np.stack([dataset[i][0].numpy() for i in range(min(n, len(dataset)))])
                return images, f"the validation split of the run's data ({len(images)} images)"
    with tempfile.TemporaryDirectory(prefix="medtricks-export-") as tmp:
        side = max(16, int(math.ceil(size * 1.25)))  # not square-on-size: the resize and crop are exercised
        synthesize_phantoms(tmp, n=max(n, 6), size=side, seed=0)
        dataset, _ = build_eval_dataset("synthetic-phantoms", tmp, split="all", **kwargs)
        images = np.stack([dataset[i][0].numpy() for i in range(min(n, len(dataset)))])
    return images, f"synthetic phantoms ({len(images)} images; the run's data is not on this machine)"


def _reference_probs(trained, images: np.ndarray) -> np.ndarray:
    """medtricks' own torch pipeline: the eval transform's normalization (numpy float32), model, softmax."""
    c = images.shape[1]
    mean = _per_channel(trained.data_config["mean"], c, "mean").numpy().reshape(1, c, 1, 1)
    std = _per_channel(trained.data_config["std"], c, "std").numpy().reshape(1, c, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray((images - mean) / std, dtype=np.float32))
    with torch.no_grad():
        return torch.softmax(trained.model(x).float(), dim=1).numpy()


# ------------------------------------------------------------------------------------------ export
def _needs(fmt: str) -> None:
    if fmt != "onnx":
        return
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MedtricksError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'medtricks[export]' "
            "(or pip install onnx onnxruntime)"
        )


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> tuple[int, str]:
    """Write the ONNX file; returns (the opset it holds, the exporter used). The TorchScript-based
    exporter first (no extra dependency); a graph it cannot translate (the learnable resizer's antialiased
    resize) goes through the torch.export-based one, which needs ``onnxscript`` and opset >= 18."""
    from torch.onnx.errors import UnsupportedOperatorError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                input_names=["images"],
                output_names=["probs"],
                opset_version=int(opset),
                do_constant_folding=True,
                dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}},
            )
        exporter = "TorchScript-based exporter"
    except UnsupportedOperatorError as err:
        import importlib.util

        if importlib.util.find_spec("onnxscript") is None:
            raise MedtricksError(
                f"this model needs the torch.export-based ONNX exporter ({err}), which needs "
                "onnxscript: pip install 'medtricks[export]' (or pip install onnxscript)"
            ) from None
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=["probs"],
                opset_version=max(int(opset), 18),
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
            program.save(str(path), external_data=False)
        exporter = "torch.export-based exporter"
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    held = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=int(opset))
    return int(held), exporter


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace and save; the archive is built in memory and written by Python, so a full disk is an
    ``OSError`` (``torch.jit.save`` to a path aborts the whole process on a failed write: rc 134)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)  # (torch.jit is deprecated in favour of torch.export, still supported)
    write_bytes(path, buffer.getbuffer())


def _run_torchscript(path: Path, images: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


def export_model(
    ref: str,
    fmt: str,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    runs_dir: Optional[str | Path] = None,
    tracking_uri: Optional[str] = None,
    n_check: int = 8,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportResult:
    """Export a trained run (a run folder, its model file, or a run id) as ``fmt`` (``onnx`` or
    ``torchscript``) to ``out`` (a file path, or an existing folder: ``model.onnx`` / ``model.pt`` in it),
    with a model card ``<out>.md``; see the module docstring for the input contract and the parity check.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of {FORMATS}")
    if fmt == "onnx" and not 7 <= int(opset) <= 23:
        raise ConfigError(f"opset={opset}: expected an ONNX opset between 7 and 23 (default {DEFAULT_OPSET})")
    if int(n_check) < 1:
        raise ConfigError(f"n_check={n_check}: expected at least one image for the parity check")
    _needs(fmt)
    out = Path(out).expanduser()
    if fmt == "mlflow":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out}: exists and is not an empty folder; an MLflow model goes into a new folder")
    elif out.is_dir():
        out = out / f"model{_SUFFIX[fmt]}"
    if not out.parent.is_dir():
        raise MissingFileError(f"{out.parent} does not exist: create the folder for --out first")

    trained = load_trained(ref, tracking_uri=tracking_uri, runs_dir=runs_dir)
    recipe = trained.recipe
    size, in_chans = recipe.input_image_size(), recipe.model.in_chans
    wrapper = ExportWrapper(trained.model, trained.data_config["mean"], trained.data_config["std"], in_chans).eval()
    images, source = _check_images(trained, int(n_check))
    reference = _reference_probs(trained, images)
    example = torch.from_numpy(images[:1].copy())

    if fmt == "mlflow":
        return _export_mlflow(trained, wrapper, example, images, reference, source, out, tolerance)
    card_path = out.with_name(out.name + ".md")
    try:
        # the file and its card appear together, once the file passed the parity check; the temporary
        # files have unique names beside them and are removed on any failure
        with atomic_paths(out, card_path) as (tmp, card_tmp):
            if fmt == "onnx":
                opset, exporter = _export_onnx(wrapper, example, tmp, opset)
                run = _run_onnx
            else:
                _export_torchscript(wrapper, example, tmp)
                run, exporter = _run_torchscript, "torch.jit.trace"
            diff = _parity(run, tmp, images, reference, fmt, source, tolerance)
            result = ExportResult(
                path=out,
                card_path=card_path,
                fmt=fmt,
                input_shape=(None, in_chans, size, size),
                classes=list(trained.classes),
                max_abs_diff=diff,
                n_checked=len(images),
                check_source=source,
                run_id=trained.run_id,
            )
            result.opset = opset if fmt == "onnx" else None
            write_bytes(card_tmp, _model_card(trained, result, opset, exporter).encode())
    except OSError as err:
        raise _write_error(out, err) from None
    return result


def _write_error(out: Path, err: OSError) -> ResourceError:
    return ResourceError(
        f"cannot write the export {out} ({err.strerror or err or type(err).__name__}); nothing was "
        "written and anything already at that path is unchanged"
    )


def _parity(
    run, path: Path, images: np.ndarray, reference: np.ndarray, fmt: str, source: str, tolerance: float
) -> float:
    """max |delta prob| of the written file vs the torch pipeline, whole batch and batch of 1;
    :class:`ExportParityError` above ``tolerance``."""
    got = run(path, images)  # the whole batch: also checks the free batch axis
    got_one = run(path, images[:1])
    diff = float(max(np.abs(got - reference).max(), np.abs(got_one - reference[:1]).max()))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportParityError(
            f"the exported {fmt} model's probabilities differ from the torch pipeline by "
            f"max |delta prob| = {diff:.3g} > {tolerance:g} on {source}; nothing was written"
        )
    return diff


def mlflow_model_info(trained) -> dict:
    """What the MLflow model's ``info.json`` records: classes, input contract, mean/std, stored operating point."""
    recipe = trained.recipe
    in_chans = recipe.model.in_chans
    op = load_operating_point(trained.run_dir)
    return {
        "classes": list(trained.classes),
        "in_chans": in_chans,
        "image_size": recipe.input_image_size(),
        "mean": [float(v) for v in _per_channel(trained.data_config["mean"], in_chans, "mean")],
        "std": [float(v) for v in _per_channel(trained.data_config["std"], in_chans, "std")],
        "threshold": None if op is None else float(op.threshold),
        "positive_index": None if op is None else int(op.positive_index),
        "operating_point": None if op is None else op.describe(),
        "run_id": trained.run_id,
        "experiment": recipe.experiment.name,
        "medtricks_version": __version__,
    }


def _export_mlflow(trained, wrapper, example, images, reference, source, out: Path, tolerance: float) -> ExportResult:
    """The TorchScript file (parity-checked) inside an MLflow pyfunc model folder, with its model card."""
    try:
        return _write_mlflow(trained, wrapper, example, images, reference, source, out, tolerance)
    except OSError as err:
        raise _write_error(out, err) from None


def _write_mlflow(trained, wrapper, example, images, reference, source, out: Path, tolerance: float) -> ExportResult:
    recipe = trained.recipe
    size, in_chans = recipe.input_image_size(), recipe.model.in_chans
    with tempfile.TemporaryDirectory(prefix="medtricks-export-") as tmp:
        script = Path(tmp) / "model.pt"
        _export_torchscript(wrapper, example, script)
        diff = _parity(_run_torchscript, script, images, reference, "mlflow", source, tolerance)
        # the folder appears whole, or not at all: built in a new folder of our own beside it (never one
        # that was there before), renamed onto ``out``, removed on any failure
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            save_mlflow_model(staging, script, mlflow_model_info(trained))
            result = ExportResult(
                path=out,
                card_path=out / MLFLOW_CARD,
                fmt="mlflow",
                input_shape=(None, in_chans, size, size),
                classes=list(trained.classes),
                max_abs_diff=diff,
                n_checked=len(images),
                check_source=source,
                run_id=trained.run_id,
            )
            (staging / MLFLOW_CARD).write_text(_model_card(trained, result, None, "torch.jit.trace"))
            os.replace(staging, out)  # onto a missing or empty folder
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result


# --------------------------------------------------------------------------------------- model card
def _model_card(trained, result: ExportResult, opset: int, exporter: str) -> str:
    recipe = trained.recipe
    size, in_chans = recipe.input_image_size(), recipe.model.in_chans
    mean = [round(float(v), 6) for v in _per_channel(trained.data_config["mean"], in_chans, "mean")]
    std = [round(float(v), 6) for v in _per_channel(trained.data_config["std"], in_chans, "std")]
    side = eval_resize_side(recipe.data.augment, size)
    if result.fmt == "onnx":
        import onnxruntime

        how = (
            f"ONNX (opset {opset}, {exporter}, torch {torch.__version__}; checked with onnxruntime "
            f"{onnxruntime.__version__}); "
            "input name `images`, output name `probs`"
        )
    elif result.fmt == "mlflow":
        how = (
            f"MLflow pyfunc model (a TorchScript file inside, torch {torch.__version__}); "
            "`mlflow.pyfunc.load_model(folder)` or `mlflow models serve -m folder`; a single unnamed input "
            "tensor, output columns `prob_<class>` and `predicted` (at the operating point below)"
        )
    else:
        how = f"TorchScript (torch.jit.trace, torch {torch.__version__}); load with `torch.jit.load`"
    run_name = Path(trained.run_dir).name if trained.run_dir is not None else "?"
    lines = [
        f"# {recipe.experiment.name}: exported model ({result.fmt})",
        "",
        f"- {'Folder' if result.fmt == 'mlflow' else 'File'}: `{result.path.name}`, {how}.",
        f"- From run: id `{trained.run_id or '-'}`, folder `{run_name}`, model `{recipe.model.name}` "
        f"(weights `{recipe.model.weights}`{', learnable resizer' if recipe.model.resizer.enabled else ''}); "
        f"exported by medtricks {__version__}.",
        "",
        "## Classes (output columns, in order)",
        "",
        *[f"{i}. {name}" for i, name in enumerate(result.classes)],
        "",
        "## Input contract",
        "",
        f"- `images`: float32, shape {_shape_text(result.input_shape)}, values in [0, 1]; N (batch) is free, "
        f"the height and width are fixed at {size}.",
        "- Before the graph (the caller; `medtricks.posthoc.export.prepare_input` does exactly this): decode to a gray "
        "float image in [0, 1] (`medtricks.data.read_image`: DICOM VOI/windowing, MONOCHROME1 inverted, bit "
        f"depth), resize the shorter side to {side} px (OpenCV area filter when shrinking, linear when "
        f"enlarging), round to 16-bit levels, center crop {size} x {size}, repeat the gray channel {in_chans} "
        "time(s). The resize is not in the graph: no torch interpolation mode matches OpenCV's area filter "
        "exactly, and the parity below would not hold.",
        f"- In the graph: clamp to [0, 1]; normalize `(x - mean) / std` with mean {mean}, std {std} "
        "(the run's); the model; softmax.",
        f"- Output `probs`: float32 (N, {len(result.classes)}) class probabilities (rows sum to 1).",
        "",
        "## Parity",
        "",
        f"max |delta prob| = {result.max_abs_diff:.2e} between this file and medtricks' torch eval pipeline "
        f"(eval transform, model, softmax) on {result.check_source}, whole batch and batch of 1; "
        f"the export fails above {PARITY_TOLERANCE:g}.",
        "",
        "## Operating point",
        "",
    ]
    op = load_operating_point(trained.run_dir)
    if op is None:
        lines.append("None stored with the run: the decision is the argmax of `probs`.")
    else:
        name = result.classes[op.positive_index] if op.positive_index < len(result.classes) else op.positive_index
        lines.append(
            f"Decide `{name}` when `probs[:, {op.positive_index}] >= {op.threshold:.6g}`: "
            f"{op.describe()} (the run's model/operating_point.json; chosen on validation data). "
            "At another prevalence than in training, shift the probabilities first "
            "(`medtricks evaluate --prevalence`)."
        )
    lines += [
        "",
        "Performance numbers are not repeated here: see the run's test-split metrics "
        "(data that model selection never saw) or `medtricks evaluate` on external data.",
        "",
    ]
    return "\n".join(lines)
