"""The image scan: decode every image of a manifest once, before training, and sort out the bad ones.

:func:`scan_images` finds unreadable files (and fills the decode cache on the way);
:class:`_ImageCheck` carries one decode setting through the scan and the datasets built after it;
:func:`_checked_images` raises on bad images or moves them to the quarantine, as ``on_bad_image`` says.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from medtricks.errors import ConfigError
from medtricks.data.errors import BadImageError
from medtricks.data.readers import BitDepthWarning
from medtricks.data.splits import file_digest
from medtricks.data.xray_dataset import _CACHE_VERSION, XrayDataset, _bad_image_in, _load_transform, _monai_dataset

__all__ = ["scan_images", "ON_BAD_IMAGE"]

ON_BAD_IMAGE = ("error", "skip")


@dataclass(frozen=True)
class _ImageCheck:
    """How :func:`build_datasets` / :func:`build_eval_dataset` decode and check every image, handed unchanged to
    the image scan and the datasets: one pre-resize side, VOI mode and decode cache serve them all."""

    side: Optional[int]  # the transforms' pre-resize side
    voi: str
    cache_dir: Optional[Path]
    on_bad_image: str
    progress: bool

    def dataset(self, manifest: pd.DataFrame, transform: Callable) -> XrayDataset:
        return XrayDataset(manifest, transform, cache_dir=self.cache_dir, voi=self.voi)


def scan_images(
    manifest: pd.DataFrame,
    *,
    side: Optional[int] = None,
    voi: str = "auto",
    cache_dir=None,
    progress: bool = True,
    desc: str = "checking images",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every image once: returns (good rows + ``content_hash``/``height``/``width``/``bit_depth_note``,
    bad rows + ``reason``).

    With ``cache_dir`` the decoded, resized arrays go into the same MONAI cache that
    :class:`XrayDataset` reads, so training does not decode them again. 16-bit files read with fewer
    bits (12-bit data, see :func:`medtricks.data.readers.read_image`) give one ``BitDepthWarning``
    for the whole set, naming the first file; ``bit_depth_note`` says which files.
    """
    from tqdm.auto import tqdm

    manifest = manifest.reset_index(drop=True)
    bad: dict[int, str] = {}
    hashes: list[Optional[str]] = []
    for i, path in enumerate(manifest["path"]):  # cheap pass first: existence + content hash
        digest = None
        try:
            digest = file_digest(path)
        except FileNotFoundError:
            bad[i] = "file not found"
        except OSError as err:
            bad[i] = f"cannot read file ({err.strerror or err})"
        hashes.append(digest)
    items = [
        {
            "path": str(p),
            "target": 0,
            "key": f"{d}-{Path(p).stat().st_size}-{side}-{voi}-{_CACHE_VERSION}" if d else str(p),
        }
        for p, d in zip(manifest["path"], hashes)
    ]
    decoder = _monai_dataset(items, [_load_transform(side, voi)], cache_dir)
    sizes: list[tuple] = [(None, None)] * len(items)
    bit_notes = [""] * len(items)
    for i in tqdm(range(len(items)), desc=desc, unit="img", disable=not progress, leave=False):
        if i in bad:
            continue
        try:
            decoded = decoder[i]
            sizes[i] = tuple(decoded["image"].shape[:2])
            bit_notes[i] = str(decoded.get("bit_depth_note") or "")
        except Exception as err:
            found = _bad_image_in(err)
            if found is None:
                raise
            bad[i] = found.problem
    reduced = [note for i, note in enumerate(bit_notes) if note and i not in bad]
    if reduced:
        warnings.warn(
            BitDepthWarning(
                f"{len(reduced)} of {len(items)} images are 16-bit files holding fewer bits, read with the bits "
                f"they use (docs/data-and-models.md), e.g. {reduced[0]}"
            ),
            stacklevel=2,
        )
    good = manifest.assign(
        content_hash=hashes, height=[s[0] for s in sizes], width=[s[1] for s in sizes], bit_depth_note=bit_notes
    )
    mask = np.array([i in bad for i in range(len(manifest))], dtype=bool)
    quarantine = pd.DataFrame(
        {
            "path": manifest.loc[mask, "path"].tolist(),
            "label": manifest.loc[mask, "label"].tolist() if "label" in manifest else None,
            "reason": [bad[i] for i in np.flatnonzero(mask)],
        }
    )
    return good.loc[~mask].reset_index(drop=True), quarantine


def _checked_images(manifest, card, root, check: _ImageCheck, skip_hint: Optional[str] = "set data.on_bad_image=skip"):
    """Decode every image once; bad ones raise (``error``, listing each) or go to the quarantine (``skip``).
    ``skip_hint``: how the caller's user asks for ``skip`` (None: they cannot), said in the error."""
    if check.on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image={check.on_bad_image!r}: expected one of {ON_BAD_IMAGE}")
    good, quarantine = scan_images(
        manifest, side=check.side, voi=check.voi, cache_dir=check.cache_dir, progress=check.progress
    )
    if len(quarantine) and check.on_bad_image == "error":
        listed = "\n".join(f"  {p}: {r}" for p, r in zip(quarantine["path"][:20], quarantine["reason"][:20]))
        more = f"\n  ... and {len(quarantine) - 20} more" if len(quarantine) > 20 else ""
        raise BadImageError(
            quarantine["path"].iloc[0],
            f"{len(quarantine)} unusable image(s) in {root} (card {card.name!r}); fix or remove them"
            f"{f', or {skip_hint} to leave them out' if skip_hint else ''}:\n{listed}{more}",
        )
    good = good.drop(columns=["height", "width", "bit_depth_note"])
    good.attrs = dict(manifest.attrs)
    return good, quarantine
