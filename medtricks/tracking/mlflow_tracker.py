"""MLflow implementation of the Tracker: the only module in medtricks that imports mlflow."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import mlflow
from mlflow.tracking import MlflowClient

from medtricks.tracking.base import Tracker

__all__ = ["MlflowTracker", "default_tracking_uri", "TrackingUnavailableError"]

_MAX_PARAM_LEN = 6000
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per batch request


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached: raised at start, before any training."""


def default_tracking_uri(uri: Optional[str] = None) -> str:
    """Recipe value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the cwd."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class MlflowTracker(Tracker):
    """Logs one run to any MLflow tracking URI (sqlite file, folder, or tracking server)."""

    def __init__(self, uri: Optional[str] = None) -> None:
        self.uri = default_tracking_uri(uri)
        self.client: Optional[MlflowClient] = None
        self.run_id = None

    def _check_reachable(self) -> None:
        # A remote server that is down must fail now, not after hours of training.
        if self.uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            self.client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure here means "cannot track"
            raise TrackingUnavailableError(
                f"MLflow tracking URI {self.uri!r} is not reachable ({type(err).__name__}: {err}). "
                "Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run with "
                "--set tracking.backend=none") from err

    def start(self, *, experiment, run_name, tags, resume_run_id=None, parent_run_id=None):
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self._check_reachable()
        if resume_run_id:
            run = self.client.get_run(resume_run_id)
            self.client.update_run(resume_run_id, status="RUNNING")
            self.run_id = run.info.run_id
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            all_tags = dict(tags)
            all_tags["mlflow.runName"] = run_name
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = []
        for key, value in params.items():
            text = "None" if value is None else str(value)
            text = text[:_MAX_PARAM_LEN]
            if key in existing:  # params are immutable in MLflow; a resumed run re-logs the same
                continue
            items.append(Param(key, text))
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, int(step or 0)) for key, value in metrics.items()
                 if value is not None and not (isinstance(value, float) and math.isnan(value))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_path, artifact_path=None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def run_exists(self, run_id: str) -> bool:
        try:
            return (self.client or MlflowClient(self.uri)).get_run(run_id) is not None
        except Exception:  # noqa: BLE001 - unknown id or another store
            return False

    def end(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def download_run_files(run_id: str, dest: str | Path, uri: Optional[str] = None,
                       paths: tuple[str, ...] = ("recipe.yaml", "model")) -> Path:
    """Download a finished run's recipe and model artifacts into ``dest``; return ``dest``."""
    client = MlflowClient(default_tracking_uri(uri))
    try:
        client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        raise FileNotFoundError(f"MLflow run {run_id!r} not found at {default_tracking_uri(uri)!r}: {err}") from err
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in paths:
        client.download_artifacts(run_id, path, str(dest))
    return dest


def run_tag(run_id: str, key: str, uri: Optional[str] = None) -> Optional[str]:
    """One tag of a run (e.g. its local ``run_dir``), or None."""
    try:
        return MlflowClient(default_tracking_uri(uri)).get_run(run_id).data.tags.get(key)
    except Exception:  # noqa: BLE001
        return None
