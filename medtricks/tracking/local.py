"""The local run store: what ``tracking.backend: none`` keeps, as plain files in each run folder.

A run's store lives in ``<run folder>/store/`` (see :class:`~medtricks.rundir.RunDir`)::

    meta.json       run id, experiment, run name, status, start/end time, tags, parent (temp + rename)
    params.json     params as strings (temp + rename; like MLflow, a param keeps its first value)
    metrics.jsonl   one line per value: {"key", "step", "value", "time"} (append-only)

Logged artifacts and figures (PNG) go to the run folder's own homes (``RunDir.artifact_for``:
``predictions/predictions_val.npz`` is ``artifacts/predictions_val.npz``), copied only when they are
not there already. A run killed at any moment leaves a readable store: the JSON files are replaced
whole, and a half-written last metrics line is skipped with a warning.

Runs are found by walking the store's root (``experiment.output_dir``, ``runs`` by default) for
``store/meta.json``; a run id is whatever ``meta.json`` says (a random 32-hex id), nothing is
inferred from how an id looks.

Example::

    from medtricks.rundir import best_key
    from medtricks.tracking.local import LocalStore
    store = LocalStore("runs")
    for run in store.search_runs("quickstart", statuses=["FINISHED"]):
        print(run.run_id, run.run_dir, run.metrics.get(best_key("val", "auroc")))
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from medtricks.rundir import RunDir
from medtricks.tracking.base import NullStore, RunNotFoundError, RunRecord, _finite_metrics

__all__ = ["LocalStore"]


def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write a whole file so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunNotFoundError(f"{path} cannot be read as a run store file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise RunNotFoundError(f"{path} is not a run store file (expected a JSON object)")
    return data


def _read_metrics(path: Path) -> Iterator[dict]:
    """The metric lines of a store; a line that is not JSON (a run killed mid-write) is skipped, with a warning."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            yield {"key": str(row["key"]), "step": int(row["step"]), "value": float(row["value"])}
        except (ValueError, KeyError, TypeError):
            where = (
                "its last line is cut off (the run was killed while logging)"
                if number == len(lines)
                else f"line {number} is not a metric record"
            )
            warnings.warn(f"{path}: {where}; that line is skipped", RuntimeWarning, stacklevel=2)


def _latest(rows: Iterator[dict]) -> dict[str, float]:
    """The latest value of every metric: highest step, then the last logged (as MLflow shows them)."""
    latest: dict[str, tuple[int, float]] = {}
    for row in rows:
        seen = latest.get(row["key"])
        if seen is None or row["step"] >= seen[0]:
            latest[row["key"]] = (row["step"], row["value"])
    return {key: value for key, (_, value) in latest.items()}


class LocalStore(NullStore):
    """Runs as files in their own run folders, below ``root`` (``experiment.output_dir``).

    Write side: :meth:`start` opens the run in ``tags["run_dir"]`` when given (``run.py`` sets it), else
    in a new folder ``<root>/<experiment>/<stamp>-<id>``; without either it keeps the run in memory
    only (like :class:`~medtricks.tracking.base.NullStore`). The in-memory view (``.params``,
    ``.metrics``, ``.tags``, ``.artifacts``, ``.status``) holds what this object logged.

    Read side: every run whose folder is below ``root`` (and the run this object writes).
    """

    def __init__(self, root: Optional[str | Path] = None) -> None:
        super().__init__()
        self.root = Path(root) if root is not None else None
        self.run: Optional[RunDir] = None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root) if self.root else None!r})"

    def describe(self) -> str:
        return f"the local run store under {self.root}" if self.root else "the local run store (no root folder)"

    # ------------------------------------------------------------------------------- write side
    def start(self, *, experiment, run_name, tags, resume_run_id=None, parent_run_id=None):
        super().start(experiment=experiment, run_name=run_name, tags=tags)
        tags = {k: str(v) for k, v in tags.items()}
        folder = tags.get("run_dir")
        now = time.time_ns()
        meta: Optional[dict] = None
        if resume_run_id:
            run = self._find(resume_run_id, hint=folder)
            if run is not None:
                meta = _read_json(run.store_meta)
                meta["tags"] = {**meta.get("tags", {}), **tags}
                meta["status"] = "RUNNING"
                meta.pop("end_time", None)
            elif folder is None:
                raise RunNotFoundError(f"cannot resume run id {resume_run_id!r}: not found in {self.describe()}")
            else:  # the run folder lost its store (or was made without one): open it again under that id
                run = RunDir(folder)
        elif folder is not None:
            run = RunDir(folder)
        elif self.root is not None:
            run = RunDir.create(self.root, experiment)
        else:  # nowhere to write: in memory only
            self.run, self.run_id = None, None
            return None
        if meta is None:
            if run.store_meta.is_file():  # another run's store in this folder: keep it aside, out of searches
                old = _read_json(run.store_meta).get("run_id", "unknown")
                run.store.rename(run.store.with_name(f"{run.store.name}.replaced-{old}-{now}"))
            meta = {
                "run_id": resume_run_id or uuid.uuid4().hex,
                "experiment": experiment,
                "run_name": run_name,
                "status": "RUNNING",
                "start_time_ns": now,
                "tags": tags,
                "parent": parent_run_id,
            }
        run.store.mkdir(parents=True, exist_ok=True)
        _write_json(run.store_meta, meta)
        self._end_partial_line(run.store_metrics)
        self.run, self.run_id = run, meta["run_id"]
        return self.run_id

    @staticmethod
    def _end_partial_line(path: Path) -> None:
        # A run killed mid-line left no newline: start the next line on its own (the cut one stays skipped).
        if path.is_file() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def _update_meta(self, **changes: Any) -> None:
        meta = _read_json(self.run.store_meta)
        for key, value in changes.items():
            if key == "tags":
                meta["tags"] = {**meta.get("tags", {}), **value}
            else:
                meta[key] = value
        _write_json(self.run.store_meta, meta)

    def log_params(self, params):
        super().log_params({k: v for k, v in params.items() if k not in self.params})  # first value wins
        if self.run is None:
            return
        existing = _read_json(self.run.store_params) if self.run.store_params.is_file() else {}
        new = {k: "None" if v is None else str(v) for k, v in params.items() if k not in existing}
        if new:
            _write_json(self.run.store_params, {**existing, **new})

    def log_metrics(self, metrics, step=None):
        values = _finite_metrics(metrics)
        super().log_metrics(values, step)
        if self.run is None or not values:
            return
        now = int(time.time() * 1000)
        lines = "".join(
            json.dumps({"key": k, "step": int(step or 0), "value": v, "time": now}) + "\n" for k, v in values.items()
        )
        with open(self.run.store_metrics, "a") as f:  # one write per call: a kill cuts at most the last line
            f.write(lines)
            f.flush()

    def _destination(self, artifact_path: str) -> Path:
        dest = self.run.artifact_for(artifact_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def log_figure(self, figure, artifact_file):
        super().log_figure(figure, artifact_file)
        if self.run is None:
            return
        import io

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        _atomic_write(self._destination(artifact_file), buffer.getvalue())

    def log_artifact(self, local_path, artifact_path=None):
        super().log_artifact(local_path, artifact_path)
        if self.run is None:
            return
        src = Path(local_path)
        dest = self._destination(f"{artifact_path}/{src.name}" if artifact_path else src.name)
        if dest.resolve() == src.resolve():
            return  # already in its home in the run folder
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            _atomic_write(dest, src.read_bytes())

    def log_text(self, text, artifact_file):
        super().log_text(text, artifact_file)
        if self.run is not None:
            _atomic_write(self._destination(artifact_file), text)

    def set_tags(self, tags):
        super().set_tags(tags)
        if self.run is not None:
            self._update_meta(tags={k: str(v) for k, v in tags.items()})

    def end(self, status="FINISHED"):
        super().end(status)
        if self.run is not None:
            self._update_meta(status=status, end_time_ns=time.time_ns())

    # -------------------------------------------------------------------------------- read side
    def _stores(self) -> Iterator[RunDir]:
        seen = set()
        if self.run is not None and self.run.store_meta.is_file():
            seen.add(self.run.path.resolve())
            yield self.run
        if self.root is not None:
            for run in RunDir.find_stores(self.root):
                if run.path.resolve() not in seen:
                    yield run

    def _metas(self) -> Iterator[tuple[RunDir, dict]]:
        for run in self._stores():
            try:
                yield run, _read_json(run.store_meta)
            except RunNotFoundError as err:
                warnings.warn(f"skipped: {err}", RuntimeWarning, stacklevel=3)

    def _find(self, run_id: str, hint: Optional[str | Path] = None) -> Optional[RunDir]:
        if hint is not None:
            run = RunDir(hint)
            if run.store_meta.is_file() and _read_json(run.store_meta).get("run_id") == run_id:
                return run
        for run, meta in self._metas():
            if meta.get("run_id") == run_id:
                return run
        return None

    def _require(self, run_id: str) -> RunDir:
        run = self._find(str(run_id))
        if run is None:
            raise RunNotFoundError(f"run id {run_id!r} not found in {self.describe()}")
        return run

    @staticmethod
    def _record(run: RunDir, meta: dict) -> RunRecord:
        params = _read_json(run.store_params) if run.store_params.is_file() else {}
        start = meta.get("start_time_ns")
        return RunRecord(
            run_id=meta["run_id"],
            run_name=meta.get("run_name") or "",
            experiment=meta.get("experiment", ""),
            status=meta.get("status", "RUNNING"),
            start_time=None if start is None else start // 1_000_000,
            tags=dict(meta.get("tags", {})),
            params={k: str(v) for k, v in params.items()},
            metrics=_latest(_read_metrics(run.store_metrics)),
            parent=meta.get("parent"),
            run_dir=str(run.path),
        )

    def has_run(self, run_id: str) -> bool:
        return self._find(str(run_id)) is not None

    def get_run(self, run_id: str) -> RunRecord:
        run = self._require(run_id)
        return self._record(run, _read_json(run.store_meta))

    def experiments(self) -> list[str]:
        return sorted({str(meta.get("experiment", "")) for _, meta in self._metas()})

    def search_runs(
        self, experiment: str, *, tags: Optional[dict[str, str]] = None, statuses: Optional[Sequence[str]] = None
    ) -> list[RunRecord]:
        matches, known = [], set()
        for run, meta in self._metas():
            known.add(meta.get("experiment"))
            if meta.get("experiment") != experiment:
                continue
            if statuses and meta.get("status") not in statuses:
                continue
            if tags and any(meta.get("tags", {}).get(k) != str(v) for k, v in tags.items()):
                continue
            matches.append((meta.get("start_time_ns") or 0, str(run.path), run, meta))
        if experiment not in known:
            raise RunNotFoundError(self._unknown_experiment(experiment))
        return [self._record(run, meta) for *_, run, meta in sorted(matches, key=lambda m: m[:2])]

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        run = self._require(run_id)
        return [(row["step"], row["value"]) for row in _read_metrics(run.store_metrics) if row["key"] == key]

    def download_artifact(self, run_id: str, artifact_path: str, dst: str | Path) -> Optional[Path]:
        """The artifact's file in the run folder itself (no copy: read-only); ``None`` if it is not there."""
        path = self._require(run_id).artifact_for(artifact_path)
        return path if path.exists() else None

    def local_run_dir(self, run_id: str) -> Optional[Path]:
        run = self._find(str(run_id))
        return run.path if run is not None else None
