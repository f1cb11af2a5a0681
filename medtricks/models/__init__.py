"""Backbones, pretrained weights, freezing and model tweaks.

Importing this package is cheap and never downloads: the public names below are loaded lazily
from their modules on first use (``torch``/``timm`` are imported then).

Example::

    >>> from medtricks.models import create_model, get_data_config
    >>> model = create_model("resnet18", weights="none", num_classes=2, in_chans=1)
    >>> get_data_config(model)["mean"]
    (0.449,)
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    # backbones.py: the factory and model-level configs
    "create_model": "backbones",
    "get_data_config": "backbones",
    "channel_stats": "backbones",
    # model_names.py: aliases and timm:/monai: prefixes
    "resolve_model_name": "model_names",
    # layout.py: backbone, stages of a built model
    "stage_of_parameter": "layout",
    "find_backbone": "layout",
    # weights.py: the zoo (sources: weights_catalog.py; files: weights_cache.py; checkpoints: state_dict.py)
    "list_weights": "weights",
    "fetch_weights": "weights",
    "format_weights_table": "weights",
    "cache_dir": "weights_cache",
    "WeightsUnavailableError": "weights_cache",
    # freeze.py
    "freeze_model": "freeze",
    # tweaks.py: zero-gated SE/CBAM insertion
    "add_attention": "tweaks",
    # learnable resizer (Talebi & Milanfar 2021)
    "LearnableResizer": "resizer",
    "ResizerModel": "resizer",
    "resizer_param_count": "resizer",
    # ViTs on little data: Shifted Patch Tokenization, Locality Self-Attention (Lee et al. 2021)
    "ShiftedPatchEmbed": "vit_locality",
    "LocalitySelfAttention": "vit_locality",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
