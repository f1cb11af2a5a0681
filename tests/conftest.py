"""Shared pytest fixtures: real-data location and small-data helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
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


def _mlflow_template_path() -> Path:
    """An empty, migrated MLflow sqlite store, made once per machine and MLflow version (creating
    one runs the schema migrations, ~10 s) and copied wherever a test needs a fresh store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = Path(tempfile.gettempdir()) / f"medtricks-test-mlflow-{mlflow.__version__}.db"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def mlflow_template() -> Path:
    return _mlflow_template_path()


def fresh_sqlite_uri(folder: Path) -> str:
    """A new, empty sqlite MLflow store in ``folder`` (a copy of the migrated template)."""
    db = Path(folder) / "mlflow.db"
    if not db.exists():
        shutil.copy(_mlflow_template_path(), db)
    return f"sqlite:///{db}"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite store, also set as MLFLOW_TRACKING_URI; the test runs inside tmp_path."""
    uri = fresh_sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Never let a test write into the working directory's mlflow.db or the user's cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))
    # Plug-ins are opt-in; a test that opts in (--allow-plugins sets this) must not leak it to the next.
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "0")  # restored (unset) after the test
    yield


def randomize_norms(model, seed: int = 0):
    """Give every BatchNorm2d "pretrained-like" values: γ in [0.5, 1.5], β != 0 (timm zero-inits some γ)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def binary_phantom_card(folder: Path, name: str = "binary-phantoms", classes=("normal", "pneumonia")) -> Path:
    """A binary card for two-class synthetic phantoms (the shipped phantom card with two classes)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    card = yaml.safe_load((root / "data_cards" / "synthetic-phantoms.yaml").read_text())
    card.update(name=name, task="binary", classes=list(classes))
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def fit_killed_after_epoch(real_fit, epoch: int):
    """``medtricks.run.fit`` that logs epoch ``epoch`` and then dies (KeyboardInterrupt), as a kill would after the
    checkpoint: monkeypatch it in, run, then resume with the real ``fit``."""

    def killed(*args, on_epoch=None, **kwargs):
        def on_epoch_then_die(step, metrics):
            on_epoch(step, metrics)
            if metrics["epoch"] == epoch:
                raise KeyboardInterrupt

        return real_fit(*args, on_epoch=on_epoch_then_die, **kwargs)

    return killed
