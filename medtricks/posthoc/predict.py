"""Use a trained model on new images: per-image probabilities and decisions, as a table.

Orchestration like :mod:`medtricks.posthoc` (it knows the trained run, the data layer's readers and
transforms, and the run's operating point). Images are read and preprocessed exactly as ``evaluate``
reads them (:class:`~medtricks.data.XrayDataset` with the run's eval transform: its augment preset's
resize and center crop, ``recipe.input_image_size()``, ``in_chans`` and the mean/std the run trained
with); files that cannot be used are listed, never fatal (``medtricks predict`` fails only when none
could be predicted, after writing the list). Outputs never overwrite an input (:func:`check_outputs`);
the CSV and its bad-file list are written as a pair, atomically, with formula-like cells quoted.

    from medtricks.posthoc.predict import predict_images
    preds, bad = predict_images("runs/kermany_pneumonia/<id>", ["/data/new_xrays"], threshold="stored")
    preds.to_csv("preds.csv", index=False)

Rows name images by their path relative to the input folder they came from (a file given directly:
its name), never an absolute path. DICOM rows add ``sop_instance_hash``, a salted hash of the
SOPInstanceUID (the salt of the manifest's patient hashes, :func:`~medtricks.data.manifest.patient_salt`);
no other DICOM header value is read or written.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medtricks._atomic import csv_safe, write_csvs
from medtricks.data.datasets import XrayDataset
from medtricks.data.errors import BadImageError
from medtricks.data.manifest import hash_patient, patient_salt
from medtricks.data.readers import DICOM_EXTENSIONS
from medtricks.data.transforms import build_transforms
from medtricks.errors import ConfigError, MedtricksError, MissingFileError, ResourceError
from medtricks.posthoc.decision import DecisionRule, resolve_decision_rule
from medtricks.audit.saliency import cam_file_name, cam_target_layer, grad_cam, save_overlay
from medtricks.train import resolve_device
from medtricks.posthoc.load import load_trained

__all__ = [
    "predict_images",
    "resolve_prediction_rule",
    "collect_images",
    "check_outputs",
    "write_predictions",
    "eval_transform",
    "bad_files_path",
    "require_predictions",
    "NothingPredictedError",
    "IMAGE_EXTENSIONS",
    "InputImage",
]

#: Extensions read as images in folders (case-insensitive); other files are read only if they start
#: with the DICOM preamble (``DICM`` at byte 128), else listed as bad ("not an image").
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", *DICOM_EXTENSIONS)
BAD_COLUMNS = ["image", "reason"]
_MAX_LISTED = 20


@dataclass
class InputImage:
    """One file to predict: ``path`` as found (link names kept), ``image`` its name relative to the input
    folder it came from (a file given directly: its name), ``dicom`` whether it is read as DICOM."""

    path: Path
    image: str
    base: Path  # the input folder (or, for a file given directly, its folder)
    dicom: bool


# ------------------------------------------------------------------------------------ thresholds
def resolve_prediction_rule(
    trained,
    threshold: Any = "stored",
    tracking_uri: Optional[str] = None,
    site: Optional[str] = None,
    runs_dir: Optional[str | Path] = None,
) -> Optional[DecisionRule]:
    """The decision rule ``predict`` applies; ``None`` for multiclass models (argmax).

    ``threshold``: ``"stored"`` (the run's ``model/operating_point.json``; 0.5 when the run has none, which
    the rule's ``description`` says), ``"youden"`` or ``"sens=0.95"`` (chosen again on the run's stored
    validation predictions), or a number in (0, 1): the forms ``evaluate`` takes too
    (:func:`~medtricks.posthoc.decision.resolve_decision_rule`).
    ``site``: the run's site profile of that name (``medtricks calibrate``): its temperature and threshold.
    """
    return resolve_decision_rule(trained, threshold=threshold, tracking_uri=tracking_uri, site=site, runs_dir=runs_dir)


# ---------------------------------------------------------------------------------------- inputs
def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _link_problem(path: Path) -> str:
    """Why a name that is a symbolic link cannot be read ('' when its target is usable)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link points back at itself); not read"
        return "broken symbolic link (its target does not exist); not read"
    return ""


def _walk_inputs(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file under ``root`` like :func:`~medtricks.data.manifest.walk_files` (symlinked folders
    followed, link names kept, '.' names skipped, sorted), plus what such a walk passes over silently:
    ``(path, reason)`` for broken links, link loops, folder links back to a parent and unreadable folders."""
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    chains = {str(root): (os.path.realpath(root),)}

    def unreadable(err: OSError) -> None:
        problems.append(
            (
                Path(err.filename),
                f"folder cannot be read ({err.strerror or type(err).__name__}); its files were not predicted",
            )
        )

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        chain = chains.pop(dirpath, (os.path.realpath(dirpath),))
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            sub = os.path.join(dirpath, name)
            real = os.path.realpath(sub)
            if real in chain:  # a link to one of its own ancestors: following it never ends
                problems.append((Path(sub), "symbolic link to a folder that contains it (a loop); not followed"))
                continue
            chains[sub] = (*chain, real)
            keep.append(name)
        dirnames[:] = keep
        files += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    return sorted(files), sorted(problems)


def collect_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[InputImage], list[dict]]:
    """Files to predict from ``inputs`` (files and folders, folders searched recursively, each folder's files
    in sorted order) → ``(images, not_images)``. A file given directly is always tried; in a folder, files
    with an image extension (:data:`IMAGE_EXTENSIONS`) or the DICOM preamble are, and every other name is
    returned in ``not_images`` (``image``, ``reason``): files that are not images, broken symbolic links,
    link loops, folder links back to a parent, unreadable folders, and things that are not regular files.
    Hidden files and folders ('.' names) are skipped. A link and its target are two inputs (two rows);
    the same name reached twice (a folder given twice) is one. An input that does not exist is a
    :class:`~medtricks.errors.MissingFileError` naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ConfigError("no input given: name image files or folders")
    missing = [str(p) for p in inputs if not Path(p).expanduser().exists()]
    if missing:
        raise MissingFileError(f"input not found: {', '.join(missing)}")
    images: list[InputImage] = []
    not_images: list[dict] = []
    seen: set[str] = set()

    def bad(file: Path, image: str, reason: str) -> None:
        not_images.append({"image": image, "reason": reason, "path": file})

    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            files, problems = _walk_inputs(path)
            for file, reason in problems:
                key = os.path.abspath(file)
                if key not in seen:
                    seen.add(key)
                    bad(file, file.relative_to(path).as_posix() if file != path else path.name, reason)
            for file in files:
                rel = file.relative_to(path)
                key = os.path.abspath(file)  # the name, not its target: a link and its target are both rows
                if key in seen:
                    continue
                seen.add(key)
                problem = _link_problem(file) if file.is_symlink() else ""
                if problem:
                    bad(file, rel.as_posix(), problem)
                    continue
                if not file.is_file():
                    bad(file, rel.as_posix(), "not a regular file (a pipe, socket or device); not read")
                    continue
                suffix = file.suffix.lower()
                if suffix in IMAGE_EXTENSIONS:
                    images.append(InputImage(file, rel.as_posix(), path, suffix in DICOM_EXTENSIONS))
                elif _has_dicom_preamble(file):
                    images.append(InputImage(file, rel.as_posix(), path, True))
                else:
                    bad(file, rel.as_posix(), "not an image (no PNG/JPEG/TIFF/DICOM extension, no DICOM preamble)")
        else:
            key = os.path.abspath(path)
            if key in seen:
                continue
            seen.add(key)
            if not path.is_file():
                bad(path, path.name, "not a regular file (a pipe, socket or device); not read")
                continue
            dicom = path.suffix.lower() in DICOM_EXTENSIONS or _has_dicom_preamble(path)
            images.append(InputImage(path, path.name, path.parent, dicom))
    return images, not_images


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(
    inputs: Sequence[str | os.PathLike], out: Optional[str | Path] = None, cam_dir: Optional[str | Path] = None
) -> None:
    """Refuse outputs that are, or would overwrite, an input, before any work: the predictions CSV ``out``
    or its bad-file list (:func:`bad_files_path`) on an input file, an ``out`` that is a folder, and a
    ``cam_dir`` (overlays are written under it) that is an input folder or holds an input file. Raises a
    :class:`~medtricks.errors.ConfigError` naming the path."""
    if out is None and cam_dir is None:
        return
    items, not_images = collect_images(inputs)
    files = [i.path for i in items] + [b["path"] for b in not_images if Path(b["path"]).is_file()]
    if out is not None and str(out) != "-":
        out = Path(out).expanduser()
        if out.is_dir():
            raise ConfigError(
                f"--out {out} is a folder; name the predictions CSV file (e.g. {out / 'predictions.csv'})"
            )
        for target, what in ((out, "--out"), (bad_files_path(out), f"the bad-file list of --out {out}")):
            if target.exists() and any(_same_file(target, f) for f in files):
                raise ConfigError(
                    f"{what}: {target} is one of the input files and would be overwritten; "
                    "write the predictions elsewhere"
                )
    if cam_dir is not None:
        cam = Path(os.path.realpath(Path(cam_dir).expanduser()))
        folders = [Path(os.path.realpath(Path(g).expanduser())) for g in inputs if Path(g).expanduser().is_dir()]
        for folder in folders:
            if cam == folder:
                raise ConfigError(
                    f"--cam {cam_dir} is the input folder {folder}: the overlays would overwrite "
                    "its images; choose another folder"
                )
        for file in files:
            real = Path(os.path.realpath(file))
            if cam in real.parents:
                raise ConfigError(
                    f"--cam {cam_dir} holds the input {file}: an overlay could overwrite it; "
                    "choose a folder outside the inputs"
                )


def _path_forms(path: Path) -> list[str]:
    forms = {str(path), os.path.abspath(path), os.path.realpath(path)}
    return sorted((f.rstrip("/") for f in forms if f.rstrip("/") not in ("", ".", "/")), key=len, reverse=True)


def _scrub(text: str, item: InputImage) -> str:
    """A reason with the file's path (any form) replaced by its relative name and its folder by ``<input>``."""
    for form in _path_forms(item.path):
        text = text.replace(form, item.image)
    for form in _path_forms(item.base):
        text = text.replace(form, "<input>")
    return re.sub(r"(?<![\w.<>-])/(?:[^\s/:'\"]+/)+[^\s:'\"]*", "<path>", text)  # any other absolute path


def _sop_instance_hash(path: Path, salt: bytes) -> str:
    """``s_`` + a salted hash of the file's SOPInstanceUID ('' when it has none); no other tag is read."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
        uid = str(getattr(ds, "SOPInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - the pixel read reports the file if it is unusable
        return ""
    return hash_patient(uid, "sop_instance", salt).replace("p_", "s_", 1) if uid else ""


# ------------------------------------------------------------------------------------ prediction
def eval_transform(trained):
    """The run's evaluation transform: its augment preset's resize and center crop at
    ``recipe.input_image_size()``, its ``in_chans`` and the mean/std it trained with (what ``evaluate`` uses)."""
    recipe = trained.recipe
    return build_transforms(
        recipe.data.augment,
        recipe.input_image_size(),
        mean=tuple(trained.data_config["mean"]),
        std=tuple(trained.data_config["std"]),
        in_chans=recipe.model.in_chans,
        train=False,
    )


class _Images(torch.utils.data.Dataset):
    """``XrayDataset`` items that never raise: ``(tensor | None, index, reason)``."""

    def __init__(self, dataset: XrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index][0], index, ""
        except BadImageError as err:
            return None, index, err.problem
        except Exception as err:  # noqa: BLE001 - one unusable file is listed, never fatal
            return None, index, f"cannot read ({type(err).__name__}: {err})"


def _collate(batch):
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, [b[1] for b in good], [(b[1], b[2]) for b in batch if b[0] is None]


def predict_images(
    ref: str,
    inputs: Sequence[str | os.PathLike],
    *,
    threshold: Any = "stored",
    batch_size: int = 32,
    device: str = "auto",
    tracking_uri: Optional[str] = None,
    runs_dir: Optional[str | Path] = None,
    progress: bool = True,
    cam_dir: Optional[str | Path] = None,
    site: Optional[str] = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict every image of ``inputs`` (image files and folders, searched recursively) with a trained run
    (folder, model file or run id) → ``(predictions, bad_files)``.

    ``predictions``: one row per usable image: ``image`` (path relative to its input folder),
    ``sop_instance_hash`` (only when a DICOM is among them; salted hash of its SOPInstanceUID),
    ``prob_<class>`` per class, ``predicted`` (binary: the class at the operating point, positive when
    its probability >= the threshold; multiclass: argmax) and ``threshold`` (``argmax`` for multiclass).
    ``threshold``: see :func:`resolve_prediction_rule` (``stored`` default, ``youden``, ``sens=0.95``, a
    number). ``predictions.attrs["rule"]`` says which threshold was used and where it came from.
    ``bad_files``: ``image``, ``reason`` (relative paths; unreadable, corrupt or not an image).
    ``cam_dir``: also write a Grad-CAM overlay PNG per image there (:mod:`medtricks.audit.saliency`; binary
    models: for the positive class, multiclass: for the predicted class), at the model's input size,
    named like ``image`` with a ``.png`` extension; the ``cam`` column holds that relative name.
    ``site``: decide with the run's site profile of that name (:mod:`medtricks.deploy.profiles`): the
    ``prob_<class>`` columns are then its temperature-scaled (and, for an EM profile, prior-shifted)
    probabilities, and ``threshold`` is the profile's.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_outputs(inputs, cam_dir=cam_dir)  # before the model loads: overlays never overwrite an input
    items, not_images = collect_images(inputs)
    dev = resolve_device(device)
    trained = load_trained(ref, tracking_uri=tracking_uri, device=str(dev), runs_dir=runs_dir)
    rule = resolve_prediction_rule(trained, threshold, tracking_uri, site=site, runs_dir=runs_dir)
    recipe = trained.recipe
    manifest = pd.DataFrame({"path": [str(i.path) for i in items], "target": 0})
    dataset = _Images(XrayDataset(manifest, eval_transform(trained)))
    loader = DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=False,
        collate_fn=_collate,
        num_workers=recipe.data.num_workers if len(items) > batch_size else 0,
    )
    model = trained.model
    model.eval()
    probs = np.full((len(items), len(trained.classes)), np.nan)
    reasons: dict[int, str] = {}
    cams = _CamWriter(trained, cam_dir, rule, dev) if cam_dir is not None else None
    from tqdm.auto import tqdm

    for images, index, bad in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
        reasons.update(dict(bad))
        if images is None:
            continue
        with torch.no_grad():
            logits = model(images.to(dev)).float()
        probs[index] = torch.softmax(logits, dim=1).cpu().numpy()
        if cams is not None:
            cams.write(images, [items[i].image for i in index], probs[index])
    ok = [i for i in range(len(items)) if i not in reasons]
    frame = pd.DataFrame({"image": [items[i].image for i in ok]})
    if any(items[i].dicom for i in ok):
        salt = patient_salt()
        frame["sop_instance_hash"] = [_sop_instance_hash(items[i].path, salt) if items[i].dicom else "" for i in ok]
    p = probs[ok]
    if rule is not None and rule.site is not None and len(ok):
        p = rule.shift(rule.calibrate(p))  # the site's probabilities: temperature, then its prior shift
    for k, name in enumerate(trained.classes):
        frame[f"prob_{name}"] = p[:, k]
    if rule is None:
        frame["predicted"] = [trained.classes[j] for j in p.argmax(1)] if len(ok) else []
        frame["threshold"] = "argmax"
    else:
        pos = rule.positive_index
        positive = p[:, pos] >= rule.threshold
        frame["predicted"] = np.where(positive, trained.classes[pos], trained.classes[1 - pos]) if len(ok) else []
        frame["threshold"] = float(rule.threshold)
    if cams is not None:
        frame["cam"] = [cams.names.get(items[i].image, "") for i in ok]
        frame.attrs["cam"] = cams.describe()
    frame.attrs["rule"] = rule.description if rule is not None else "argmax (multiclass)"
    frame.attrs["threshold_source"] = rule.source if rule is not None else "argmax"
    bad_rows = [
        *not_images,
        *({"image": items[i].image, "reason": _scrub(r, items[i])} for i, r in sorted(reasons.items())),
    ]
    bad_frame = pd.DataFrame(bad_rows, columns=BAD_COLUMNS)
    return frame, bad_frame


class _CamWriter:
    """Grad-CAM overlays of predicted batches under ``cam_dir``, one PNG per image (binary: for the
    positive class; multiclass: for the predicted class). A batch whose maps fail is warned about and
    left without overlays, never fatal."""

    def __init__(self, trained, cam_dir: str | Path, rule, device) -> None:
        recipe = trained.recipe
        self.model, self.classes = trained.model, list(trained.classes)
        self.root = Path(cam_dir).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        chans = recipe.model.in_chans
        side = recipe.model.resizer.output_size if recipe.model.resizer.enabled else recipe.input_image_size()
        self.layer_name, self.layer = cam_target_layer(self.model, (chans, side, side))
        self.positive = (rule.positive_index if rule is not None else 1) if len(self.classes) == 2 else None
        self.mean = torch.tensor(trained.data_config["mean"], dtype=torch.float32).reshape(-1)[:1]
        self.std = torch.tensor(trained.data_config["std"], dtype=torch.float32).reshape(-1)[:1]
        self.device = device
        self.names: dict[str, str] = {}
        self._taken: set[str] = set()
        self.failed: list[str] = []

    def describe(self) -> str:
        target = (
            f"class {self.classes[self.positive]!r} (the positive class)"
            if self.positive is not None
            else "the predicted class"
        )
        return f"Grad-CAM at layer {self.layer_name!r} for {target}, in {self.root}"

    def write(self, images: torch.Tensor, names: list[str], probs: np.ndarray) -> None:
        targets = [self.positive] * len(names) if self.positive is not None else list(probs.argmax(1))
        try:
            maps = grad_cam(self.model, self.layer, images.to(self.device), targets)
        except Exception as err:  # noqa: BLE001 - predictions go on without these overlays
            warnings.warn(
                f"Grad-CAM failed for a batch of {len(names)} image(s) ({type(err).__name__}: "
                f"{str(err)[:200]}); no overlays for them",
                RuntimeWarning,
                stacklevel=3,
            )
            self.failed += names
            return
        gray = (images[:, 0] * self.std + self.mean).clamp(0, 1).numpy()  # the image the model saw, channel 0
        for name, image, heat in zip(names, gray, maps):
            rel = cam_file_name(name, self._taken)
            try:
                save_overlay(self.root / rel, image, heat)
            except OSError as err:
                raise ResourceError(
                    f"cannot write the Grad-CAM overlay {self.root / rel} "
                    f"({err.strerror or err or type(err).__name__}); no predictions CSV was "
                    "written"
                ) from None
            self.names[name] = rel


# ---------------------------------------------------------------------------------------- output
def bad_files_path(out: str | Path) -> Path:
    """Where the bad-file list of ``--out preds.csv`` goes: ``preds.bad_files.csv`` next to it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.bad_files.csv")


class NothingPredictedError(MedtricksError, ValueError):
    """Every input was unusable (or there was none): nothing was predicted."""


def write_predictions(
    predictions: pd.DataFrame, bad: pd.DataFrame, out: Optional[str | Path] = None, stream=None
) -> Optional[Path]:
    """Write the predictions CSV to ``out`` (``None`` or ``-``: to stdout) and, next to a file ``out``,
    the bad-file list (:func:`bad_files_path`, always written, header only when none). Returns its path.

    The two files are written as a pair (:func:`medtricks._atomic.write_csvs`): both are replaced, or
    neither is -- a full disk leaves the previous pair as it was and raises a
    :class:`~medtricks.errors.ResourceError` naming the file. Text cells that a spreadsheet would run as a
    formula (a file named ``=cmd|...png``) get a leading single quote (OWASP CSV injection)."""
    if out is None or str(out) == "-":
        csv_safe(predictions).to_csv(stream or sys.stdout, index=False)
        return None
    out = Path(out).expanduser()
    path = bad_files_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_csvs({out: predictions, path: bad})
    except OSError as err:
        raise ResourceError(
            f"cannot write {out} and {path} ({err.strerror or err or type(err).__name__}); "
            "neither was replaced: any previous ones are unchanged"
        ) from None
    return path


def require_predictions(predictions: pd.DataFrame, bad: pd.DataFrame, bad_path: Optional[Path] = None) -> None:
    """:class:`NothingPredictedError` when no image could be predicted (all inputs bad, or none found)."""
    if len(predictions):
        return
    if not len(bad):
        raise NothingPredictedError("no image found in the inputs: nothing was predicted")
    first = bad.iloc[0]
    where = f"; all listed in {bad_path}" if bad_path is not None else ""
    raise NothingPredictedError(
        f"none of the {len(bad)} input file(s) could be predicted (e.g. {first['image']}: {first['reason']}){where}"
    )


def summary(predictions: pd.DataFrame, bad: pd.DataFrame, bad_path: Optional[Path] = None) -> str:
    """The lines ``medtricks predict`` prints on stderr: the threshold used, counts, and the bad files."""
    lines = [
        f"threshold: {predictions.attrs.get('rule', 'argmax')}",
        f"predicted {len(predictions)} image(s); {len(bad)} bad file(s)",
    ]
    if "cam" in predictions.attrs:
        lines.append(f"overlays: {predictions.attrs['cam']}")
    if len(bad):
        where = f" (all in {bad_path})" if bad_path is not None else ""
        lines.append(f"bad files, not predicted{where}:")
        lines += [f"  {row.image}: {row.reason}" for row in bad.head(_MAX_LISTED).itertuples()]
        if len(bad) > _MAX_LISTED:
            lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
    return "\n".join(lines)
