"""Checkpoints that survive a crash: atomic writes and full training state."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtricks._atomic import atomic_path
from medtricks.errors import MissingFileError, ResourceError

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write never corrupts the last good file, and a
    failed write (a full disk) leaves no partial ``.tmp`` file behind (the error is raised)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            # Through a Python file: a full disk is an OSError (ENOSPC) here; torch's own writer would raise
            # an opaque RuntimeError ("unexpected pos") instead.
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        kept = "the previous checkpoint there is kept" if path.is_file() else "nothing was written there"
        raise ResourceError(
            f"checkpoint {path} could not be written ({err.strerror or err}); {kept}: free space "
            "(or set experiment.output_dir to another disk) and resume with --resume auto"
        ) from err
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medtricks checkpoint with ``weights_only=True``: tensors and plain Python values only,
    so a planted file cannot run code on resume (everything medtricks saves is of those types)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ResourceError(
            f"checkpoint {path} cannot be read safely ({type(err).__name__}: {str(err)[:300]}); "
            "it may be truncated, or not a medtricks checkpoint (objects other than tensors and "
            "plain values are refused)"
        ) from err


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (what ``weights_only`` loading accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
