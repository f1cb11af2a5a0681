"""Read runs back from MLflow as plain records: thin wrappers over :class:`~medtricks.tracking.mlflow_store.MlflowStore`.

New code asks a store (``create_store(...).get_runs(...)``), which works for the local store too.

Example::

    from medtricks.rundir import best_key
    from medtricks.tracking.query import get_runs
    for run in get_runs(experiment="quickstart", tags={"variant": "baseline"}):
        print(run.run_id, run.metrics.get(best_key("val", "auroc")))
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from medtricks.tracking.base import RunNotFoundError, RunRecord, TrackingUnavailableError
from medtricks.tracking.mlflow_store import MlflowStore

__all__ = ["RunRecord", "get_runs", "download_artifact", "RunNotFoundError", "TrackingUnavailableError"]


def get_runs(
    *,
    tracking_uri: Optional[str] = None,
    experiment: Optional[str] = None,
    run_ids: Optional[list[str]] = None,
    tags: Optional[dict[str, str]] = None,
    statuses: Optional[list[str]] = None,
) -> list[RunRecord]:
    """Runs of one MLflow experiment (optionally filtered by exact tag values and statuses), or given ids.

    See :meth:`medtricks.tracking.base.RunStore.get_runs`; ``tracking_uri`` defaults to
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
    """
    return MlflowStore(tracking_uri).get_runs(experiment=experiment, run_ids=run_ids, tags=tags, statuses=statuses)


def download_artifact(
    run_id: str, artifact_path: str, dst_dir: str | Path, tracking_uri: Optional[str] = None
) -> Optional[Path]:
    """Download one artifact of an MLflow run into ``dst_dir``; ``None`` when the run has no such artifact."""
    return MlflowStore(tracking_uri).download_artifact(run_id, artifact_path, dst_dir)
