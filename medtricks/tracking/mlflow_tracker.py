"""The MLflow run store (any tracking URI): the only module in medtricks that imports mlflow.

Write side: one run at a time, as every medtricks run logs. Read side: runs back as plain
:class:`~medtricks.tracking.base.RunRecord`. Reading never creates a store: a sqlite file or folder
that does not exist holds no runs.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medtricks.tracking.base import (RunNotFoundError, RunRecord, RunStore, TrackingUnavailableError,
                                     _finite_metrics)

__all__ = ["MlflowStore", "MlflowTracker", "default_tracking_uri", "TrackingUnavailableError", "RunNotFoundError"]

_MAX_PARAM_LEN = 6000
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per batch request
_PAGE = 1000
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def default_tracking_uri(uri: Optional[str] = None) -> str:
    """Recipe value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the cwd."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _http_defaults(uri: str) -> None:
    """A tracking server that is down must fail in seconds, not after minutes of retries (the one place
    these defaults are set; the user's own environment values win)."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _local_path(uri: str) -> Optional[Path]:
    """The file or folder of a sqlite/file store (None for a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class MlflowStore(RunStore):
    """Runs in any MLflow tracking URI (sqlite file, folder, or tracking server)."""

    def __init__(self, uri: Optional[str] = None) -> None:
        self.uri = default_tracking_uri(uri)
        self.client: Optional[MlflowClient] = None
        self.run_id = None

    def __repr__(self) -> str:
        return f"MlflowStore({self.uri!r})"

    def describe(self) -> str:
        return f"MLflow at {self.uri}"

    def _client(self) -> MlflowClient:
        if self.client is None:
            _http_defaults(self.uri)
            self.client = MlflowClient(self.uri)
        return self.client

    def _missing(self) -> bool:
        """True when the store is a local file/folder that does not exist (reading must not create it)."""
        path = _local_path(self.uri)
        return path is not None and not path.exists()

    def _unreadable(self, err: Exception) -> TrackingUnavailableError:
        detail = err.message if isinstance(err, MlflowException) else f"{type(err).__name__}: {err}"
        return TrackingUnavailableError(f"MLflow at {self.uri!r} could not be read: {detail}")

    # ------------------------------------------------------------------------------- write side
    def _check_reachable(self) -> None:
        # A remote server that is down must fail now, not after hours of training.
        try:
            self._client().search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure here means "cannot track"
            raise TrackingUnavailableError(
                f"MLflow tracking URI {self.uri!r} is not reachable ({type(err).__name__}: {err}). "
                "Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run with "
                "--set tracking.backend=none") from err

    def start(self, *, experiment, run_name, tags, resume_run_id=None, parent_run_id=None):
        mlflow.set_tracking_uri(self.uri)
        client = self._client()
        self._check_reachable()
        if resume_run_id:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id = run.info.run_id
        else:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            all_tags = dict(tags)
            all_tags["mlflow.runName"] = run_name
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
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

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, int(step or 0)) for key, value in _finite_metrics(metrics).items()]
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

    def end(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    # -------------------------------------------------------------------------------- read side
    def _experiment_names(self) -> dict[str, str]:
        try:
            return {e.experiment_id: e.name for e in self._client().search_experiments()}
        except (MlflowException, OSError) as err:
            raise self._unreadable(err) from err

    def _record(self, run, names: dict[str, str]) -> RunRecord:
        info, data = run.info, run.data
        return RunRecord(run_id=info.run_id, run_name=info.run_name or data.tags.get("mlflow.runName", ""),
                         experiment=names.get(info.experiment_id, info.experiment_id),
                         status=info.status, start_time=info.start_time, tags=dict(data.tags),
                         params=dict(data.params), metrics=dict(data.metrics),
                         parent=data.tags.get("mlflow.parentRunId"), run_dir=data.tags.get("run_dir"))

    def _get(self, run_id: str):
        """The mlflow run, or None when the store does not know the id; TrackingUnavailableError otherwise."""
        if self._missing():
            return None
        try:
            return self._client().get_run(str(run_id))
        except MlflowException as err:
            if err.error_code in _NOT_FOUND:
                return None
            raise self._unreadable(err) from err
        except OSError as err:
            raise self._unreadable(err) from err

    def has_run(self, run_id: str) -> bool:
        try:
            return self._get(run_id) is not None
        except TrackingUnavailableError:
            return False

    def get_run(self, run_id: str) -> RunRecord:
        run = self._get(run_id)
        if run is None:
            raise RunNotFoundError(f"MLflow run id {run_id!r} not found at {self.uri}")
        return self._record(run, self._experiment_names())

    def experiments(self) -> list[str]:
        return [] if self._missing() else sorted(self._experiment_names().values())

    def search_runs(self, experiment: str, *, tags: Optional[dict[str, str]] = None,
                    statuses: Optional[Sequence[str]] = None) -> list[RunRecord]:
        names = {} if self._missing() else self._experiment_names()
        if experiment not in names.values():
            raise RunNotFoundError(self._unknown_experiment(experiment))
        exp_id = next(i for i, n in names.items() if n == experiment)
        filters = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
        records, token = [], None
        try:
            while True:
                page = self._client().search_runs([exp_id], filter_string=" and ".join(filters), max_results=_PAGE,
                                                  order_by=["attributes.start_time ASC"], page_token=token)
                records.extend(self._record(r, names) for r in page)
                token = page.token
                if not token:
                    break
        except (MlflowException, OSError) as err:
            raise self._unreadable(err) from err
        if statuses:
            records = [r for r in records if r.status in statuses]
        return records

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        if self._get(run_id) is None:
            raise RunNotFoundError(f"MLflow run id {run_id!r} not found at {self.uri}")
        history = self._client().get_metric_history(str(run_id), key)
        return [(int(m.step), float(m.value)) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    def download_artifact(self, run_id: str, artifact_path: str, dst: str | Path) -> Optional[Path]:
        client = self._client()
        parent = str(Path(artifact_path).parent).replace("\\", "/")
        try:
            listed = {a.path for a in client.list_artifacts(run_id, None if parent == "." else parent)}
        except (MlflowException, OSError) as err:
            raise self._unreadable(err) from err
        if artifact_path.rstrip("/") not in listed:
            return None
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(client.download_artifacts(run_id, artifact_path, str(dst)))

    def local_run_dir(self, run_id: str) -> Optional[Path]:
        """The run folder the run was trained in (its ``run_dir`` tag), when it is on this machine."""
        run = self._get(run_id)
        folder = run.data.tags.get("run_dir") if run is not None else None
        return Path(folder) if folder and Path(folder).is_dir() else None


MlflowTracker = MlflowStore  # the wave-1 name
