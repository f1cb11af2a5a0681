"""Read runs back from MLflow as plain records (for ablation resume and ``medtricks compare``).

Works against any tracking URI MLflow accepts: a sqlite file or a tracking server. Everything
returned is plain Python data (:class:`RunRecord`), so callers never touch mlflow.

Example::

    from medtricks.tracking.query import get_runs
    for run in get_runs(experiment="quickstart", tags={"variant": "baseline"}):
        print(run.run_id, run.metrics.get("best/val/auroc"))
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medtricks.tracking.mlflow_tracker import TrackingUnavailableError, default_tracking_uri

__all__ = ["RunRecord", "get_runs", "download_artifact", "RunNotFoundError"]

_PAGE = 1000


class RunNotFoundError(LookupError):
    """An experiment or run id that the tracking store does not know."""


@dataclass
class RunRecord:
    """One MLflow run as plain data: latest value of every metric, all params and tags."""

    run_id: str
    run_name: str
    experiment: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    start_time: Optional[int]  # ms since the epoch
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.tags.get("mlflow.parentRunId")


def _client(tracking_uri: Optional[str]) -> tuple[MlflowClient, str]:
    uri = default_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):  # a dead server should fail in seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(uri), uri


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _record(run, experiment_names: dict[str, str]) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(run_id=info.run_id, run_name=info.run_name or data.tags.get("mlflow.runName", ""),
                     experiment=experiment_names.get(info.experiment_id, info.experiment_id),
                     status=info.status, start_time=info.start_time, tags=dict(data.tags),
                     params=dict(data.params), metrics=dict(data.metrics))


def get_runs(*, tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
             run_ids: Optional[list[str]] = None, tags: Optional[dict[str, str]] = None,
             statuses: Optional[list[str]] = None) -> list[RunRecord]:
    """Runs of one experiment (optionally filtered by exact tag values and statuses), or given ids.

    Args:
        tracking_uri: MLflow URI; default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
        experiment: experiment name. Either this or ``run_ids`` (or both: ids within the experiment).
        run_ids: exact run ids, returned in the given order.
        tags: ``{tag: value}`` that must all match exactly.
        statuses: keep only these statuses, e.g. ``["FINISHED"]``.

    Raises:
        RunNotFoundError: unknown experiment or run id (the message lists what exists).
        TrackingUnavailableError: the store cannot be reached.
    """
    if experiment is None and not run_ids:
        raise ValueError("get_runs needs an experiment name or a list of run ids")
    client, uri = _client(tracking_uri)
    try:
        names = {e.experiment_id: e.name for e in client.search_experiments()}
        if experiment is not None and experiment not in names.values():
            known = ", ".join(sorted(names.values())) or "none"
            raise RunNotFoundError(f"MLflow experiment {experiment!r} not found at {uri} (experiments there: {known})")
        if run_ids:
            runs = []
            for run_id in run_ids:
                try:
                    runs.append(client.get_run(run_id))
                except MlflowException as err:
                    raise RunNotFoundError(f"MLflow run id {run_id!r} not found at {uri}: {err.message}") from None
            records = [_record(r, names) for r in runs]
            if experiment is not None:
                outside = [r.run_id for r in records if r.experiment != experiment]
                if outside:
                    raise RunNotFoundError(f"run id(s) {outside} are not in experiment {experiment!r}")
        else:
            exp_id = next(i for i, n in names.items() if n == experiment)
            filters = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
            records, token = [], None
            while True:
                page = client.search_runs([exp_id], filter_string=" and ".join(filters), max_results=_PAGE,
                                          order_by=["attributes.start_time ASC"], page_token=token)
                records.extend(_record(r, names) for r in page)
                token = page.token
                if not token:
                    break
    except (RunNotFoundError, ValueError):
        raise
    except MlflowException as err:
        raise TrackingUnavailableError(f"MLflow at {uri!r} could not be read: {err.message}") from err
    except OSError as err:
        raise TrackingUnavailableError(f"MLflow at {uri!r} could not be read ({type(err).__name__}: {err})") from err
    if run_ids and tags:
        records = [r for r in records if all(r.tags.get(k) == str(v) for k, v in tags.items())]
    if statuses:
        records = [r for r in records if r.status in statuses]
    return records


def download_artifact(run_id: str, artifact_path: str, dst_dir: str | Path,
                      tracking_uri: Optional[str] = None) -> Optional[Path]:
    """Download one artifact of a run into ``dst_dir``; ``None`` when the run has no such artifact."""
    client, uri = _client(tracking_uri)
    parent = str(Path(artifact_path).parent).replace("\\", "/")
    listed = {a.path for a in client.list_artifacts(run_id, None if parent == "." else parent)}
    if artifact_path not in listed:
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(dst_dir)))
