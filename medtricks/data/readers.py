"""Read one chest X-ray (PNG / JPEG / TIFF / DICOM) as float32 (H, W) in [0, 1], bright = dense.

Display convention, as a radiologist sees it: bone and mediastinum bright, aerated lung dark. DICOM
goes through pydicom: files without a meta header, compressed transfer syntaxes (JPEG baseline,
JPEG 2000 via pylibjpeg), rescale slope/intercept, VOI LUT or window, MONOCHROME1 inversion.

Only whitelisted, non-identifying fields ever leave this module (:data:`SAFE_META_FIELDS`); DICOM
header values such as PatientName, PatientID or dates are never copied into returned metadata.

Example::

    from medtricks.data import read_image
    img = read_image("chest.dcm")          # float32, shape (H, W), values in [0, 1]
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medtricks.errors import ConfigError
from medtricks.data.errors import BadImageError

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
VOI_MODES = ("auto", "window", "none")
# Fields that may appear in returned metadata: technical, never identifying.
SAFE_META_FIELDS = (
    "format",
    "height",
    "width",
    "bits",
    "photometric",
    "modality",
    "view",
    "transfer_syntax",
    "voi",
    "inverted",
    "color_collapsed",
)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, for truly colour images


def read_image(path: "str | Path", *, voi: str = "auto") -> np.ndarray:
    """Decode one image to float32 ``(H, W)`` in ``[0, 1]`` (bright = dense).

    ``voi`` (DICOM only): ``auto`` applies the file's VOI LUT or WindowCenter/WindowWidth when present,
    else scales min..max; ``window`` requires WindowCenter/WindowWidth; ``none`` scales min..max.
    Raises :class:`BadImageError` naming the file and the problem (missing, empty, truncated,
    undecodable, no pixel data, constant, NaN, more pixels than Pillow's limit -- raise it with
    ``$MEDTRICKS_MAX_IMAGE_PIXELS``). A 16-bit PNG/TIFF is scaled by the bits it uses (PNG sBIT
    chunk, else 12 bits when its brightest value is <= 4095), with a :class:`BitDepthWarning`.
    """
    return read_image_with_meta(path, voi=voi)[0]


def read_image_with_meta(path: "str | Path", *, voi: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Like :func:`read_image`, plus a metadata dict limited to :data:`SAFE_META_FIELDS`."""
    if voi not in VOI_MODES:
        raise ConfigError(f"voi={voi!r} is not one of {VOI_MODES}")
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    if not path.is_file():
        raise BadImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    if _is_dicom(path):
        image, meta = _read_dicom(path, voi)
    else:
        image, meta = _read_raster(path)
    _validate_pixels(path, image)
    meta.update(height=int(image.shape[0]), width=int(image.shape[1]))
    return image, {k: meta[k] for k in SAFE_META_FIELDS if k in meta}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def _validate_pixels(path: Path, image: np.ndarray) -> None:
    if image.ndim != 2 or min(image.shape) < 1:
        raise BadImageError(path, f"expected a 2-D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise BadImageError(path, f"{int((~np.isfinite(image)).sum())} pixels are NaN or infinite")
    if float(image.max()) - float(image.min()) <= 1e-6:
        raise BadImageError(path, "constant image (every pixel has the same value: no contrast to learn from)")


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0 or finite.max() <= finite.min():
        return arr - (finite.min() if finite.size else 0)  # constant / all-NaN: validation reports it
    lo, hi = float(finite.min()), float(finite.max())
    return (arr - lo) / (hi - lo)


def _collapse_color(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """(H, W, C) -> (H, W). RGB-encoded gray keeps its exact values; real colour becomes luma."""
    if arr.shape[-1] in (2, 4):  # gray+alpha / RGBA: alpha carries no density
        arr = arr[..., :-1]
    if arr.shape[-1] == 1:
        return arr[..., 0], "single"
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        return arr[..., 0], "gray_rgb"
    return (arr[..., :3].astype(np.float32) @ _LUMA).astype(np.float32), "luma"


class BitDepthWarning(UserWarning):
    """A 16-bit PNG/TIFF whose values use fewer bits (12-bit detector data): read with that depth."""


#: A 16-bit raster without an sBIT chunk whose brightest value is at most this is read as 12-bit data.
TWELVE_BIT_MAX = 4095


def _png_sbit(path: Path) -> Optional[int]:
    """Significant bits from a PNG's sBIT chunk (the largest channel value), or None when absent."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        for _ in range(64):  # sBIT must come before IDAT; header chunks are few
            head = fh.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"sBIT":
                data = fh.read(min(length, 4))
                return max(data) if data else None
            fh.seek(length + 4, 1)  # chunk data + CRC
    return None


def _significant_bits(path: Path, arr: np.ndarray) -> tuple[int, str]:
    """Bits a 16-bit raster really uses and why, by this rule (docs/data-and-models.md):

    1. a PNG sBIT chunk of ``b`` < 16 bits, with every value below ``2**b``: raw ``b``-bit data
       (values above it mean the encoder scaled the data up, as the PNG spec asks: go on to 2.);
    2. the brightest value is at most 4095: raw 12-bit data (a 16-bit image that used its range
       would have values far above; 12-bit detector data written as-is does not);
    3. otherwise 16.
    """
    top = int(arr.max()) if arr.size else 0
    sbit = _png_sbit(path)  # None for other formats
    if sbit is not None and 1 <= sbit < 16 and top < (1 << sbit):
        return sbit, f"PNG sBIT chunk says {sbit} bits"
    if top <= TWELVE_BIT_MAX:
        return 12, f"brightest value {top} <= {TWELVE_BIT_MAX}"
    return 16, ""


def _pixel_limit() -> Optional[int]:
    """``$MEDTRICKS_MAX_IMAGE_PIXELS`` (an integer, or ``none`` for no limit), else Pillow's own limit."""
    from PIL import Image

    env = os.environ.get("MEDTRICKS_MAX_IMAGE_PIXELS", "").strip()
    if not env:
        return Image.MAX_IMAGE_PIXELS
    if env.lower() == "none":
        return None
    try:
        return int(float(env))
    except ValueError:
        raise ConfigError(
            f"MEDTRICKS_MAX_IMAGE_PIXELS={env!r}: expected a number of pixels (e.g. 400000000) or 'none'"
        ) from None


def _read_raster(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = _pixel_limit()
    try:
        with _pillow_pixel_limit(limit), Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            im = ImageOps.exif_transpose(im)
            fmt = (im.format or path.suffix.lstrip(".")).lower()
            mode = im.mode
            if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB" if mode != "1" else "L")
            arr = np.asarray(im)
    except Image.DecompressionBombError as err:  # the header claims more pixels than Pillow will decode
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(claimed.group(1)):,} pixels, " if claimed else ""
        raise BadImageError(
            path,
            f"image is larger than the pixel limit ({size}more than {2 * (limit or 0):,}: "
            "twice PIL.Image.MAX_IMAGE_PIXELS), a possible decompression bomb; if the image "
            "is genuine, raise the limit with the environment variable "
            "MEDTRICKS_MAX_IMAGE_PIXELS=<pixels> (or 'none'), or downscale the file",
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(
            path, "not a readable PNG/JPEG/TIFF (unidentified image format) and not a DICOM file"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt streams
        raise BadImageError(path, f"cannot decode image ({type(err).__name__}: {err})") from None

    bits = 8
    if arr.dtype == np.uint8:
        scaled = arr.astype(np.float32) / 255.0
    elif arr.dtype in (np.uint16, np.dtype(">u2"), np.dtype("<u2")):
        scaled, bits = _scale_16bit(path, arr)
    elif arr.dtype == bool:
        scaled, bits = arr.astype(np.float32), 1
    elif np.issubdtype(arr.dtype, np.integer):
        # PIL mode 'I' (16-bit PNG on some Pillow versions): 16-bit scale when it fits.
        if arr.min() >= 0 and arr.max() <= 65535:
            scaled, bits = _scale_16bit(path, arr)
        else:
            scaled, bits = _minmax(arr), 32
    else:  # float TIFF: keep [0, 1] data as is, else scale min..max
        arr = arr.astype(np.float32)
        finite = arr[np.isfinite(arr)]
        in_unit = finite.size and finite.min() >= 0.0 and finite.max() <= 1.0
        scaled, bits = (arr if in_unit else _minmax(arr)), 32
    collapsed = "single"
    if scaled.ndim == 3:
        scaled, collapsed = _collapse_color(scaled)
    return np.ascontiguousarray(scaled, dtype=np.float32), {
        "format": fmt,
        "bits": bits,
        "photometric": "MONOCHROME2",
        "color_collapsed": collapsed,
    }


def _scale_16bit(path: Path, arr: np.ndarray) -> tuple[np.ndarray, int]:
    """A 16-bit raster to [0, 1] by the bits it really uses (:func:`_significant_bits`), warning when < 16."""
    bits, why = _significant_bits(path, arr)
    if bits < 16:
        warnings.warn(
            BitDepthWarning(
                f"{path}: 16-bit image holding {bits}-bit data ({why}): scaled by {(1 << bits) - 1} instead of 65535"
            ),
            stacklevel=4,
        )
    return arr.astype(np.float32) / float((1 << bits) - 1), bits


@contextlib.contextmanager
def _pillow_pixel_limit(limit: Optional[int]):
    """Pillow's decompression-bomb limit set to ``limit`` for one open (restored afterwards); a no-op
    unless ``$MEDTRICKS_MAX_IMAGE_PIXELS`` asked for another limit."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    if limit == before:
        yield
        return
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _ensure_transfer_syntax(ds) -> None:
    """Files without a meta header: assume the encoding pydicom read them with (implicit VR LE by default)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _voi_output_range(ds) -> tuple[float, float]:
    """Output range of pydicom's VOI step, so the result maps onto [0, 1] exactly."""
    from pydicom.pixels import apply_windowing

    if "VOILUTSequence" in ds:
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        return float(lut.min()), float(lut.max())
    # Windowing clips to [y_min, y_max]; probing far outside the window returns exactly those bounds.
    probe = apply_windowing(np.array([-1e30, 1e30]), ds)
    return float(probe[0]), float(probe[1])


def _read_dicom(path: Path, voi: str) -> tuple[np.ndarray, dict[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    try:
        ds = pydicom.dcmread(path, force=True)
    except struct.error:  # a tag or length cut off by the end of the file
        raise BadImageError(
            path,
            f"truncated or corrupt DICOM: the file ({_size(path)}) ends inside an element "
            "header; copy it again from its source",
        ) from None
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise BadImageError(path, f"cannot parse DICOM ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        if _ends_early(path, ds):
            raise BadImageError(
                path,
                f"truncated or corrupt DICOM: the file ({_size(path)}) ends before its pixel "
                "data (an element is cut off; no PixelData element); copy it again from its "
                "source",
            )
        raise BadImageError(path, "DICOM has no pixel data (no PixelData element): not an image file")
    _ensure_transfer_syntax(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImageError(path, f"multi-frame DICOM ({frames} frames); a radiograph has one frame")
    short = _short_native_pixels(ds)
    if short:
        raise BadImageError(path, f"truncated or corrupt DICOM: {short}; copy it again from its source")
    try:
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types (missing decoder, bad length, corrupt stream)
        raise BadImageError(
            path, f"cannot decode DICOM pixel data (transfer syntax {syntax.name}): {type(err).__name__}: {err}"
        ) from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    meta: dict[str, Any] = {
        "format": "dicom",
        "bits": int(ds.get("BitsStored", 0) or 0),
        "photometric": photometric,
        "modality": str(ds.get("Modality", "")) or None,
        "view": str(ds.get("ViewPosition", "")) or None,
        "transfer_syntax": syntax.name,
        "inverted": False,
        "color_collapsed": "single",
    }
    if arr.ndim == 3:  # colour DICOM (pydicom returns RGB): no VOI for colour, collapse to gray
        image, meta["color_collapsed"] = _collapse_color(arr.astype(np.float32))
        meta["voi"] = "minmax"
        return _minmax(image), meta

    try:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        has_window = "WindowCenter" in ds and "WindowWidth" in ds
        if voi == "window" and not has_window:
            raise BadImageError(
                path, "voi='window' but the file has no WindowCenter/WindowWidth; use voi='auto' or 'none'"
            )
        if voi == "window":
            lo, hi = _voi_output_range(_without_lut(ds))
            image = (apply_windowing(values, ds) - lo) / max(hi - lo, 1e-12)
            meta["voi"] = "window"
        elif voi == "auto" and ("VOILUTSequence" in ds or has_window):
            lo, hi = _voi_output_range(ds)
            image = (apply_voi_lut(values, ds, prefer_lut=True) - lo) / max(hi - lo, 1e-12)
            meta["voi"] = "lut" if "VOILUTSequence" in ds else "window"
        else:
            image = _minmax(values)
            meta["voi"] = "minmax"
    except BadImageError:
        raise
    except Exception as err:  # e.g. WindowWidth 0, unknown VOILUTFunction
        raise BadImageError(path, f"cannot apply rescale/VOI ({type(err).__name__}: {err})") from None
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":  # MONOCHROME1: low values are bright; flip to display convention
        image = 1.0 - image
        meta["inverted"] = True
    return image, meta


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "size unknown"


def _ends_early(path: Path, ds) -> bool:
    """True when the data set of ``path`` stops inside an element (a file cut short): pydicom (``force``)
    reads up to the cut without a word. A file that ends exactly between two elements reads as complete."""
    from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    implicit = getattr(syntax, "is_implicit_VR", True) if syntax is not None else True
    little = getattr(syntax, "is_little_endian", True) if syntax is not None else True
    if len(ds) == 0:  # a file meta (or less) and no data set at all
        return True
    try:
        if getattr(ds, "preamble", None) is None and path.stat().st_size < 132 + 4:  # cut inside the preamble
            return True
    except OSError:
        return True
    try:
        size = path.stat().st_size
        group_length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
        if group_length is not None and 132 + 12 + int(group_length) > size:  # cut inside the file meta
            return True
        with open(path, "rb") as fp:
            read_preamble(fp, True)
            _read_file_meta_info(fp)
            for elem in data_element_generator(fp, implicit, little, defer_size=None):
                length = getattr(elem, "length", 0)
                value = getattr(elem, "value", None)
                if length != 0xFFFFFFFF and isinstance(value, (bytes, bytearray)) and len(value) < length:
                    return True
            return fp.tell() < size
    except Exception:  # noqa: BLE001 - anything that stops the walk is a file that does not end where it should
        return True


def _short_native_pixels(ds) -> str:
    """Uncompressed pixel data shorter than Rows x Columns x samples x BitsAllocated need: what is missing
    ('' when it is complete, or compressed: the decoder judges that)."""
    syntax = ds.file_meta.TransferSyntaxUID
    if getattr(syntax, "is_compressed", True):
        return ""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        have = len(ds.PixelData)
    except Exception:  # noqa: BLE001 - a missing attribute: pydicom's decoder says what
        return ""
    need = (rows * cols * samples * frames * bits + 7) // 8
    if have >= need:
        return ""
    return (
        f"its pixel data holds {have} of the {need} bytes {rows} x {cols} x {bits}-bit pixels need (the file is "
        "cut short)"
    )


def _without_lut(ds):
    """A shallow copy of ``ds`` without a VOI LUT sequence, so only the window defines the range."""
    if "VOILUTSequence" not in ds:
        return ds
    copy = ds.copy()
    del copy.VOILUTSequence
    return copy
