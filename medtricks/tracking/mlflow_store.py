"""The MLflow run store (any tracking URI): the only module in medtricks that imports mlflow.

Write side: one run at a time, as every medtricks run logs. Read side: runs back as plain
:class:`~medtricks.tracking.base.RunRecord`. Reading never creates a store: a sqlite file or folder
that does not exist holds no runs.

**A tracker that goes away does not stop training.** ``start()`` still fails fast when the store
cannot be reached (:class:`TrackingUnavailableError`, before any training). After that, every write
(``log_params``, ``log_metrics``, ``set_tags``, ``log_artifact``, ``log_figure``, ``log_text``) is
retried with a short backoff (``retry_delays``, at most ``retry_budget_s`` per call); when it still
fails with an error that says "not now" (connection refused, HTTP 5xx, sqlite "database is
locked", a full disk under a local artifact store) it is *kept*: in memory and appended to
``<run_dir>/store/unsent.jsonl`` (figures saved next to it under ``store/unsent/``, artifacts as
their local paths), so a crash loses nothing. For ``cooldown_s`` after a failure the server is left
alone; then the next write first sends everything kept, in order. An error that says the write
itself is wrong (an invalid parameter, a deleted run) is raised as before.

``end()`` sends what is kept (retrying for up to ``final_budget_s``) and then the final status. If
the server never answers, the store is :attr:`~MlflowStore.degraded`: a warning names the spool file
and the command that sends it later, ``python -m medtricks.tracking.replay RUN_DIR``
(:func:`replay_unsent`). A resumed run (same run folder) picks up a spool a crash left and sends it.

Creating a new sqlite store runs MLflow's schema migrations; two processes doing it at once fail
(alembic). The first client of a sqlite URI is therefore created under a file lock next to the
database (``mlflow.db.lock``).

Keeping and resending writes is :class:`~medtricks.tracking.mlflow_outbox.WriteOutbox`; URIs, the
lock and the spool file are :mod:`medtricks.tracking.mlflow_io`.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medtricks.errors import MissingFileError
from medtricks.rundir import RunDir
from medtricks.tracking.mlflow_io import (
    REPLAY_COMMAND,
    UNSENT_FILE,
    creation_lock_path,
    _MAX_PARAM_LEN,
    _NOT_FOUND,
    _PAGE,
    _creating_store,
    _forget_file,
    _has_run,
    _local_path,
    _read_spool,
    _replay_target,
    _retrying,
    _send,
    _transient,
    _write_spool,
    spool_path,
)
from medtricks.tracking.mlflow_outbox import WriteOutbox
from medtricks.tracking.base import (
    RunNotFoundError,
    RunRecord,
    RunStore,
    TrackingUnavailableError,
    TrackingWarning,
    _finite_metrics,
)
from medtricks.tracking.uri import check_scheme, check_tracking_uri, default_tracking_uri

__all__ = [
    "MlflowStore",
    "default_tracking_uri",
    "replay_unsent",
    "TrackingUnavailableError",
    "RunNotFoundError",
    "UNSENT_FILE",
    "REPLAY_COMMAND",
    "creation_lock_path",
]


def _http_defaults(uri: str) -> None:
    """A tracking server that is down must fail in seconds, not after minutes of retries (the one place
    these defaults are set; the user's own environment values win)."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# ------------------------------------------------------------------------- writes that can wait
def replay_unsent(
    path: str | Path,
    *,
    uri: Optional[str] = None,
    retry_delays: Sequence[float] = (0.5, 1.0, 2.0),
    budget_s: float = 10.0,
) -> int:
    """Send the writes a run kept while its MLflow store was away, in order, and return how many went.

    ``path``: the run folder (its ``store/unsent.jsonl``) or a spool file. ``uri``: send there instead
    of the URI each record names (the server moved). Sent records leave the spool (it is removed when
    empty, and a ``state.json`` that says ``"tracking": "degraded"`` then says ``"replayed"``); when
    the store still does not answer, :class:`TrackingUnavailableError` says how many remain. A store
    that does not know the run (the wrong ``uri``) gets nothing: :class:`RunNotFoundError`, the spool
    untouched. Running it twice is harmless: an empty or missing spool sends nothing.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such run folder or spool file")
    spool = RunDir(path).store / UNSENT_FILE if path.is_dir() else path
    if not spool.is_file():
        return 0
    records = _read_spool(spool)
    clients: dict[str, MlflowClient] = {}
    known: set[tuple[str, str]] = set()
    failure: Optional[BaseException] = None
    done = sent = 0  # records dealt with (sent, or dropped as refused) / sent
    try:
        for record in records:
            target = uri or record.get("uri")
            try:
                if target not in clients:
                    clients[target] = MlflowStore(target)._client()
                if (target, record["run_id"]) not in known:  # the wrong store: keep everything, say so
                    if not _has_run(clients[target], record["run_id"]):
                        raise RunNotFoundError(
                            f"run {record['run_id']} is not in MLflow at {target!r}; nothing was sent from {spool}. "
                            f"Pass the URI the run was logged to: {REPLAY_COMMAND} {_replay_target(spool)} --uri URI"
                        )
                    known.add((target, record["run_id"]))
                _retrying(lambda: _send(clients[target], record), retry_delays, time.monotonic() + budget_s)
                sent += 1
            except Exception as err:  # noqa: BLE001 - classified here
                if isinstance(err, RunNotFoundError):
                    raise
                if _transient(err):
                    failure = err
                    break
                warnings.warn(
                    f"{spool}: dropping a {record.get('op')} write of run {record['run_id']} that "
                    f"MLflow refuses ({type(err).__name__}: {err})",
                    TrackingWarning,
                    stacklevel=2,
                )
            done += 1
            _forget_file(record, spool)
    finally:
        if done:
            _write_spool(spool, records[done:])
    remaining = records[done:]
    if failure is not None:
        raise TrackingUnavailableError(
            f"MLflow at {uri or remaining[0].get('uri')!r} still does not answer "
            f"({type(failure).__name__}: {str(failure)[:300]}); sent {sent}, {len(remaining)} writes remain in "
            f"{spool}. Run `{REPLAY_COMMAND} {_replay_target(spool)}` again when it is back."
        ) from failure
    run = RunDir(spool.parent.parent) if spool.name == UNSENT_FILE else None
    if run is not None and run.state_file.is_file() and run.read_state().get("tracking") == "degraded":
        run.write_state(tracking="replayed")
    return sent


#: The MLflow UI (3.x) opens an experiment of this kind on its runs table instead of the GenAI overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment ``name``, created with :data:`EXPERIMENT_KIND`; an existing one without a kind
    gets it (one a user gave another kind keeps it). Tagging never stops a run."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException as err:  # e.g. no permission on a shared server: the UI just opens elsewhere
            warnings.warn(
                f"could not tag MLflow experiment {name!r} with {EXPERIMENT_KIND_TAG}: {err}",
                RuntimeWarning,
                stacklevel=3,
            )
    return exp.experiment_id


class MlflowStore(WriteOutbox, RunStore):
    """Runs in any MLflow tracking URI (sqlite file, folder, or tracking server).

    Class attributes tune how writes wait for a store that is away (set them on an instance too):
    ``retry_delays`` / ``retry_budget_s`` per write during the run, ``final_retry_delays`` /
    ``final_budget_s`` at ``end()``, ``cooldown_s`` = (first, longest) pause after a failure before
    the store is tried again.
    """

    logs_models = True
    retry_delays: Sequence[float] = (0.25, 0.5, 1.0, 2.0)
    retry_budget_s: float = 5.0
    final_retry_delays: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0)
    final_budget_s: float = 20.0
    cooldown_s: tuple[float, float] = (5.0, 60.0)

    def __init__(self, uri: Optional[str] = None) -> None:
        self.uri = default_tracking_uri(uri)
        check_scheme(self.uri)  # an unknown scheme: one line listing the supported ones, not MLflow's KeyError
        self.client: Optional[MlflowClient] = None
        self.run_id = None
        self.degraded = False
        self._reset_outbox(None)

    def __repr__(self) -> str:
        return f"MlflowStore({self.uri!r})"

    def describe(self) -> str:
        return f"MLflow at {self.uri}"

    def _client(self) -> MlflowClient:
        if self.client is None:
            _http_defaults(self.uri)
            with _creating_store(self.uri):  # a new sqlite store: one process migrates it, the others wait
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
        # A remote server that is down must fail now, not after hours of training: first the quick check
        # (seconds, one line), then MLflow itself (making the client connects to a database).
        check_tracking_uri(self.uri)
        try:
            self._client().search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure here means "cannot track"
            raise TrackingUnavailableError(
                f"MLflow tracking URI {self.uri!r} is not reachable ({type(err).__name__}: {err}). "
                "Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run with "
                "--set tracking.backend=none"
            ) from err

    def start(self, *, experiment, run_name, tags, resume_run_id=None, parent_run_id=None):
        mlflow.set_tracking_uri(self.uri)
        self._check_reachable()
        client = self._client()
        if resume_run_id:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id = run.info.run_id
        else:
            exp_id = _experiment_id(client, experiment)
            all_tags = dict(tags)
            all_tags["mlflow.runName"] = run_name
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
        self.degraded = False
        self._reset_outbox(spool_path(tags.get("run_dir"), self.run_id).absolute())
        self._pick_up_spool()
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        texts = {key: ("None" if value is None else str(value))[:_MAX_PARAM_LEN] for key, value in params.items()}
        self._write({"op": "params", "params": texts})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        now = int(time.time() * 1000)
        items = [[key, value, now, int(step or 0)] for key, value in _finite_metrics(metrics).items()]
        if items:
            self._write({"op": "metrics", "metrics": items})

    def log_figure(self, figure, artifact_file: str) -> None:
        def keep() -> dict[str, Any]:  # the figure as a file, for when the store is back
            folder = self._spool_files / f"{time.time_ns()}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / Path(artifact_file).name
            figure.savefig(path)
            parent = str(Path(artifact_file).parent).replace("\\", "/")
            return {"op": "artifact", "path": str(path), "artifact_path": None if parent == "." else parent}

        self._write(
            {"op": "figure", "artifact_file": artifact_file},
            send=lambda: self.client.log_figure(self.run_id, figure, artifact_file),
            keep=keep,
        )

    def log_artifact(self, local_path, artifact_path=None) -> None:
        self._write({"op": "artifact", "path": str(Path(local_path).absolute()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write({"op": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"op": "tags", "tags": {key: str(value) for key, value in tags.items()}})

    def log_model(self, model_dir, artifact_path: str) -> bool:
        """Log every file of an MLflow model folder under ``artifact_path`` (one artifact write per file,
        so a store that is away keeps them like any other artifact: the folder must stay in place)."""
        model_dir = Path(model_dir)
        if not (model_dir / "MLmodel").is_file():
            raise MissingFileError(f"{model_dir} holds no MLmodel file: not an MLflow model folder")
        for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            parent = file.relative_to(model_dir).parent.as_posix()
            self.log_artifact(file, artifact_path if parent == "." else f"{artifact_path}/{parent}")
        return True

    def end(self, status: str = "FINISHED") -> None:
        """Send what is kept, then the final status. When the store still does not answer the run is
        :attr:`degraded` (a warning names the spool file and the replay command) and nothing is raised."""
        if self.client is None or self.run_id is None:
            return
        self._write({"op": "end", "status": status, "end_time": int(time.time() * 1000)}, final=True)
        if self._pending:
            self.degraded = True
            where = (
                f"kept in {self._spool}"
                if self._spool_ok
                else f"kept in memory only ({self._spool} could not be written) and lost when this process ends"
            )
            warnings.warn(
                f"MLflow at {self.uri} did not answer at the end of run {self.run_id} ({self._outage}): "
                f"{len(self._pending)} writes, the final status {status} included, are {where}. The run is "
                f"marked degraded; send them when the server is back: `{REPLAY_COMMAND} "
                f"{_replay_target(self._spool)}` (or medtricks.tracking.replay_unsent(...)).",
                TrackingWarning,
                stacklevel=2,
            )

    # -------------------------------------------------------------------------------- read side
    def _experiment_names(self) -> dict[str, str]:
        try:
            return {e.experiment_id: e.name for e in self._client().search_experiments()}
        except (MlflowException, OSError) as err:
            raise self._unreadable(err) from err

    def _record(self, run, names: dict[str, str]) -> RunRecord:
        info, data = run.info, run.data
        return RunRecord(
            run_id=info.run_id,
            run_name=info.run_name or data.tags.get("mlflow.runName", ""),
            experiment=names.get(info.experiment_id, info.experiment_id),
            status=info.status,
            start_time=info.start_time,
            tags=dict(data.tags),
            params=dict(data.params),
            metrics=dict(data.metrics),
            parent=data.tags.get("mlflow.parentRunId"),
            run_dir=data.tags.get("run_dir"),
        )

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

    def search_runs(
        self, experiment: str, *, tags: Optional[dict[str, str]] = None, statuses: Optional[Sequence[str]] = None
    ) -> list[RunRecord]:
        names = {} if self._missing() else self._experiment_names()
        if experiment not in names.values():
            raise RunNotFoundError(self._unknown_experiment(experiment))
        exp_id = next(i for i, n in names.items() if n == experiment)
        filters = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
        records, token = [], None
        try:
            while True:
                page = self._client().search_runs(
                    [exp_id],
                    filter_string=" and ".join(filters),
                    max_results=_PAGE,
                    order_by=["attributes.start_time ASC"],
                    page_token=token,
                )
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
