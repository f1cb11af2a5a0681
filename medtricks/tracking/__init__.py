"""Run stores: one protocol (:class:`RunStore`) that writes a run and reads runs back, with a local
folder implementation (``tracking.backend: none``) and an MLflow one.

``create_store("mlflow", uri)`` imports mlflow only when asked for, so nothing else in medtricks
depends on it.

Example::

    from medtricks.tracking import create_store
    store = create_store("none", "runs")          # the local run store under runs/
    print([r.run_name for r in store.search_runs("quickstart")])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

# Hospital data: MLflow (>= 3.7) usage telemetry is off unless the user opts in explicitly with
# MLFLOW_DISABLE_TELEMETRY=false. Set before any mlflow import (this package is their only importer).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow draws a "Downloading artifacts" progress bar for every artifact read back (operating point,
# manifests): noise in the middle of a run, and the files are local or tiny. Opt back in with =true.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from medtricks.errors import ConfigError  # noqa: E402
from medtricks.tracking.base import (
    NullStore,
    RunNotFoundError,
    RunRecord,
    RunStore,  # noqa: E402
    TrackingUnavailableError,
    TrackingWarning,
)
from medtricks.tracking.local import LocalStore  # noqa: E402
from medtricks.tracking.uri import CHECK_TIMEOUT_S, check_tracking_uri  # noqa: E402

__all__ = [
    "RunStore",
    "NullStore",
    "LocalStore",
    "RunRecord",
    "RunNotFoundError",
    "TrackingUnavailableError",
    "TrackingWarning",
    "create_store",
    "check_store",
    "find_run",
    "replay_unsent",
    "save_mlflow_model",
    "BACKENDS",
    "DEFAULT_RUNS_DIR",
    "MLFLOW_MODEL_ARTIFACT_DIR",
]

BACKENDS = ("mlflow", "none")
DEFAULT_RUNS_DIR = "runs"  # experiment.output_dir's default: where the local store is looked for
#: Where an MLflow run keeps its pyfunc model (``runs:/<id>/mlflow_model``); ``model/`` holds the state dict.
MLFLOW_MODEL_ARTIFACT_DIR = "mlflow_model"


def create_store(backend: str = "mlflow", uri: Optional[str] = None, *, root: Optional[str | Path] = None) -> RunStore:
    """The run store of a ``tracking.backend``.

    ``"mlflow"``: :class:`~medtricks.tracking.mlflow_store.MlflowStore` at ``uri`` (default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). ``"none"``: :class:`LocalStore` rooted at
    ``root`` (pass the recipe's ``experiment.output_dir``), else at ``uri`` taken as a folder; with
    neither, a run still lands in the ``run_dir`` tag it starts with.
    """
    if backend == "none":
        return LocalStore(root if root is not None else uri)
    if backend == "mlflow":
        from medtricks.tracking.mlflow_store import MlflowStore

        return MlflowStore(uri)
    raise ConfigError(f"tracking.backend must be 'mlflow' or 'none', got {backend!r}")


def check_store(backend: str = "mlflow", uri: Optional[str] = None, *, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, in one line, when a run could not be tracked: an unknown ``tracking.backend`` or
    tracking-URI scheme (:class:`~medtricks.errors.ConfigError`), or a tracking server / database that does not
    answer within ``timeout`` (:class:`TrackingUnavailableError`). ``run.py`` calls it before the run folder
    exists. The local store (``none``) and local MLflow stores (sqlite, folders) pass without a check."""
    if backend == "none":
        return
    if backend != "mlflow":
        raise ConfigError(f"tracking.backend must be 'mlflow' or 'none', got {backend!r}")
    check_tracking_uri(uri, timeout=timeout)


def replay_unsent(run_dir: str | Path, *, uri: Optional[str] = None, **options) -> int:
    """Send the MLflow writes a run kept while its server was away (``<run_dir>/store/unsent.jsonl``),
    in order; returns how many were sent. Same as ``python -m medtricks.tracking.replay RUN_DIR``.
    See :func:`medtricks.tracking.mlflow_store.replay_unsent` (``options``: ``retry_delays``, ``budget_s``)."""
    from medtricks.tracking.mlflow_store import replay_unsent as replay

    return replay(run_dir, uri=uri, **options)


def save_mlflow_model(path: str | Path, torchscript_file: str | Path, info: dict) -> Path:
    """Write an MLflow pyfunc model folder (``mlflow models serve -m PATH``) around a TorchScript export;
    see :func:`medtricks.tracking.mlflow_model.save_pyfunc_model` (imports mlflow only when called)."""
    from medtricks.tracking.mlflow_model import save_pyfunc_model

    return save_pyfunc_model(path, torchscript_file, info)


def find_run(
    run_id: str, *, tracking_uri: Optional[str] = None, runs_dirs: Sequence[str | Path] = (DEFAULT_RUNS_DIR,)
) -> Optional[RunStore]:
    """The store that knows ``run_id``: the local store under each of ``runs_dirs`` first, then MLflow at
    ``tracking_uri`` (an MLflow sqlite file or folder that does not exist is not created). ``None`` if none does."""
    for folder in runs_dirs:
        store = LocalStore(folder)
        if store.has_run(run_id):
            return store
    store = create_store("mlflow", tracking_uri)
    return store if store.has_run(run_id) else None
