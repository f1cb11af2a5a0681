"""Shared pytest fixtures: real-data location and small-data helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Root of the real chest X-ray data (``../shared/data``), or skip.

    Real-data tests run only when ``MEDTRICKS_REAL_DATA`` points at that folder (``.ci/run`` sets
    it); the default suite must pass on a clean clone without it.
    """
    value = os.environ.get("MEDTRICKS_REAL_DATA")
    if not value:
        pytest.skip("real data not configured: set MEDTRICKS_REAL_DATA=../shared/data to run this test")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} (from MEDTRICKS_REAL_DATA) does not exist")
    return path


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Never let a test write into the working directory's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))
    yield
