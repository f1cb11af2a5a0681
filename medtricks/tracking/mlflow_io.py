"""MLflow store plumbing under :mod:`medtricks.tracking.mlflow_store`: local paths of sqlite/file
URIs, the lock that serializes creating a sqlite store, and the retry / spool helpers that keep a
run's writes while its tracking server is away (see the store's docstring)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medtricks.rundir import RunDir
from medtricks.tracking.base import TrackingWarning

_MAX_PARAM_LEN = 6000
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per batch request
_METRIC_BATCH = 1000
_PAGE = 1000
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

UNSENT_FILE = "unsent.jsonl"  # in the run folder's store/ folder
_UNSENT_FILES_DIR = "unsent"  # figures saved while the store was away, next to it
REPLAY_COMMAND = "python -m medtricks.tracking.replay"
# MLflow error codes that mean "this write is wrong", not "not now": retrying or keeping it cannot help.
_PERMANENT = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "ENDPOINT_NOT_FOUND",
    }
)
_CREATE_LOCK_TIMEOUT_S = 300.0  # a schema migration takes seconds; past this, go on without the lock


def _local_path(uri: str) -> Optional[Path]:
    """The file or folder of a sqlite/file store (None for a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme in ("",) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for anything else, and for in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(name) if name and name != ":memory:" else None


def _absolute_uri(uri: str) -> str:
    """``uri`` with a relative sqlite file or folder made absolute (a replay may run from another folder)."""
    db = _sqlite_file(uri)
    if db is not None and not db.is_absolute():
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{db.absolute()}" + (f"?{query}" if query else "")
    if urlparse(uri).scheme == "" and not Path(uri).is_absolute():
        return str(Path(uri).absolute())
    return uri


def creation_lock_path(uri: str) -> Optional[Path]:
    """The lock file that serializes creating the sqlite store at ``uri`` (``<db>.lock``), or None."""
    db = _sqlite_file(uri)
    return None if db is None else db.with_name(db.name + ".lock")


@contextlib.contextmanager
def _creating_store(uri: str) -> Iterator[None]:
    """Hold the creation lock of a sqlite store (other processes that create it wait). No lock for
    servers, or where the lock cannot be taken (a read-only folder), or after a long wait."""
    lock_path = creation_lock_path(uri)
    lock = None
    if lock_path is not None and lock_path.parent.is_dir() and os.access(lock_path.parent, os.W_OK):
        from filelock import FileLock, Timeout

        candidate = FileLock(str(lock_path), timeout=_CREATE_LOCK_TIMEOUT_S)
        try:
            candidate.acquire()
            lock = candidate
        except Timeout:
            warnings.warn(
                f"waited {_CREATE_LOCK_TIMEOUT_S:.0f} s for {lock_path} (another process creating the "
                "MLflow database); going on without it",
                TrackingWarning,
                stacklevel=3,
            )
        except OSError:
            pass
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class _Unsendable(Exception):
    """A kept write that can never be sent (its file is gone, its record is unknown)."""


def _transient(err: BaseException) -> bool:
    """Whether a failed write may succeed later (keep it) rather than being wrong (raise it)."""
    if isinstance(err, MlflowException):
        return err.error_code not in _PERMANENT
    if isinstance(err, _Unsendable):
        return False
    if isinstance(err, OSError):  # connection errors (requests'), timeouts, a full disk
        return True
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover - mlflow depends on sqlalchemy
        return False
    return isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError))


def _retrying(send: Callable[[], None], delays: Sequence[float], deadline: float) -> None:
    """Call ``send``; after a transient failure wait ``delays[i]`` and try again, unless the next try
    would start after ``deadline`` (``time.monotonic()``). The last error is raised."""
    for delay in (*delays, None):
        try:
            send()
            return
        except Exception as err:  # noqa: BLE001 - classified below
            if not _transient(err) or delay is None or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)


def _send(client: MlflowClient, record: dict[str, Any]) -> None:
    """Send one write record (the form kept in the spool file) to the run ``record["run_id"]``."""
    from mlflow.entities import Metric, Param

    run_id, op = record["run_id"], record.get("op")
    if op == "params":  # params are immutable in MLflow: a resumed or replayed run skips those it has
        existing = client.get_run(run_id).data.params
        items = [Param(key, text) for key, text in record["params"].items() if key not in existing]
        for i in range(0, len(items), _BATCH):
            client.log_batch(run_id, params=items[i : i + _BATCH])
    elif op == "metrics":
        items = [Metric(key, value, int(ts), int(step)) for key, value, ts, step in record["metrics"]]
        for i in range(0, len(items), _METRIC_BATCH):
            client.log_batch(run_id, metrics=items[i : i + _METRIC_BATCH])
    elif op == "tags":
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
    elif op == "artifact":
        if not Path(record["path"]).exists():
            raise _Unsendable(f"{record['path']} no longer exists")
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    else:
        raise _Unsendable(f"unknown write record {op!r}")


def _read_spool(path: Path) -> list[dict[str, Any]]:
    """The records of a spool file; a line a crash cut short is skipped with a warning."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warnings.warn(
                f"{path}:{number}: skipping a line cut short (a crash mid-write)", TrackingWarning, stacklevel=2
            )
            continue
        if isinstance(record, dict) and "run_id" in record and "op" in record:
            records.append(record)
    return records


def _write_spool(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace the spool file with ``records`` (atomically); remove it, and its figure folder, when empty."""
    if not records:
        path.unlink(missing_ok=True)
        folder = path.parent / _UNSENT_FILES_DIR
        if folder.is_dir() and not any(f.is_file() for f in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _forget_file(record: dict[str, Any], spool: Optional[Path]) -> None:
    """Delete a figure the store saved for a kept write, once it is sent (never a user's file)."""
    if record.get("op") != "artifact" or spool is None:
        return
    path = Path(record["path"])
    folder = spool.parent / _UNSENT_FILES_DIR
    if folder in path.parents:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def spool_path(run_dir: Optional[str | Path], run_id: str) -> Path:
    """Where a run's unsent writes go: ``<run_dir>/store/unsent.jsonl``; a run without a folder uses
    ``<tmp>/medtricks-unsent/<run_id>.jsonl``."""
    if run_dir:
        return RunDir(run_dir).store / UNSENT_FILE
    return Path(tempfile.gettempdir()) / "medtricks-unsent" / f"{run_id}.jsonl"


def _replay_target(spool: Path) -> str:
    """What to pass to the replay command for a spool file (the run folder when it is one's)."""
    if spool.name == UNSENT_FILE and spool.parent.name == RunDir(spool.parent.parent).store.name:
        return str(spool.parent.parent)
    return str(spool)


def _has_run(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException as err:
        if err.error_code in _NOT_FOUND:
            return False
        raise
