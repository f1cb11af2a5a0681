"""Experiment tracking: a small Tracker interface, an MLflow backend and a null backend.

``create_tracker("mlflow", uri)`` imports mlflow only when asked for, so nothing else in medtricks
depends on it.
"""
from __future__ import annotations

import os
from typing import Optional

# Hospital data: MLflow (>= 3.7) usage telemetry is off unless the user opts in explicitly with
# MLFLOW_DISABLE_TELEMETRY=false. Set before any mlflow import (this package is their only importer).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from medtricks.tracking.base import NullTracker, Tracker

__all__ = ["Tracker", "NullTracker", "create_tracker"]


def create_tracker(backend: str = "mlflow", uri: Optional[str] = None) -> Tracker:
    """``backend``: ``"mlflow"`` (any tracking URI) or ``"none"``."""
    if backend == "none":
        return NullTracker()
    if backend == "mlflow":
        from medtricks.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker(uri)
    raise ValueError(f"tracking.backend must be 'mlflow' or 'none', got {backend!r}")
