"""The run store every run logs through and every command reads past runs from.

:class:`RunStore` has a write side (one run at a time: ``start`` ... ``end``) and a read side (any
run of the store: ``get_run``, ``search_runs``, ``metric_history``, ``download_artifact``,
``local_run_dir``, ``has_run``). Everything read comes back as plain data (:class:`RunRecord`), so
callers never see a backend. Implementations: :class:`~medtricks.tracking.local.LocalStore` (plain
files in the run folders, ``tracking.backend: none``) and
:class:`~medtricks.tracking.mlflow_store.MlflowStore` (any MLflow URI).
:class:`NullStore` keeps one run in memory and writes nothing (tests).

Example::

    from medtricks.rundir import best_key
    from medtricks.tracking import create_store
    store = create_store("none", "runs")
    for run in store.search_runs("quickstart", statuses=["FINISHED"]):
        print(run.run_id, run.metrics.get(best_key("val", "auroc")))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from medtricks.errors import ConfigError, MedtricksError

__all__ = [
    "RunStore",
    "NullStore",
    "RunRecord",
    "RunNotFoundError",
    "TrackingUnavailableError",
    "TrackingWarning",
    "RUN_STATUSES",
]

RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED", "SCHEDULED")


class TrackingUnavailableError(MedtricksError, RuntimeError):
    """The tracking store cannot be reached or read: raised at start, before any training."""


class TrackingWarning(UserWarning):
    """The run store did not take a write during a run: training went on and the write was kept
    (``store.degraded`` / ``store.unsent_path`` say what is left after ``end()``)."""


class RunNotFoundError(MedtricksError, LookupError):
    """An experiment or run id that the tracking store does not know."""


@dataclass
class RunRecord:
    """One run as plain data: latest value of every metric, all params and tags."""

    run_id: str
    run_name: str
    experiment: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    start_time: Optional[int]  # ms since the epoch
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    parent: Optional[str] = None  # the parent run's id (ablation child, evaluation of a run)
    run_dir: Optional[str] = None  # the run's folder on this machine, when the store knows it

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.parent or self.tags.get("mlflow.parentRunId")


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """What a store keeps of a metrics dict: floats, without None and NaN (as MLflow did always)."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            continue
        value = float(value)
        if not math.isnan(value):
            out[key] = value
    return out


class RunStore:
    """Writes one run at a time and reads every run of the store. Subclasses talk to a backend.

    Write side (the run opened by :meth:`start`): ``log_params``, ``log_metrics``, ``log_figure``,
    ``log_artifact``, ``log_text``, ``set_tags``, ``end``. Read side (any run id): ``get_run``,
    ``search_runs``, ``get_runs``, ``experiments``, ``metric_history``, ``download_artifact``,
    ``local_run_dir``, ``has_run``. ``describe()`` names the store in messages.
    """

    run_id: Optional[str] = None
    #: Whether :meth:`log_model` keeps MLflow models (only the MLflow store does): ``medtricks run``
    #: builds the pyfunc model folder only for such a store.
    logs_models: bool = False
    #: True after ``end()`` when some writes of the run never reached the store (they wait in
    #: ``unsent_path``; ``medtricks.tracking.replay_unsent(run_dir)`` sends them later).
    degraded: bool = False
    unsent_path: Optional[Path] = None

    # ------------------------------------------------------------------------------- write side
    def start(
        self,
        *,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        resume_run_id: Optional[str] = None,
        parent_run_id: Optional[str] = None,
    ) -> Optional[str]:
        """Open (or re-open) the run and return its id."""
        raise NotImplementedError

    def log_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        raise NotImplementedError

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        raise NotImplementedError

    def log_artifact(self, local_path: str | Path, artifact_path: Optional[str] = None) -> None:
        raise NotImplementedError

    def log_text(self, text: str, artifact_file: str) -> None:
        raise NotImplementedError

    def set_tags(self, tags: dict[str, str]) -> None:
        raise NotImplementedError

    def end(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def log_model(self, model_dir: str | Path, artifact_path: str) -> bool:
        """Log an MLflow model folder (``MLmodel`` at its top) under ``artifact_path`` of the open run, so
        ``mlflow models serve -m runs:/<id>/<artifact_path>`` serves it. Returns whether it was logged:
        stores that keep no MLflow models (:attr:`logs_models` False) leave it in place and return False."""
        return False

    # -------------------------------------------------------------------------------- read side
    def describe(self) -> str:
        """Where this store is, for messages (``MLflow at sqlite:///mlflow.db``, ``the local run store under runs``)."""
        return type(self).__name__

    def has_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is a run of this store (never raises for an unknown id)."""
        return False

    def run_exists(self, run_id: str) -> bool:  # the name RunStore had
        return self.has_run(run_id)

    def get_run(self, run_id: str) -> RunRecord:
        """One run; :class:`RunNotFoundError` when the store does not know it."""
        raise RunNotFoundError(f"run id {run_id!r} not found in {self.describe()}")

    def experiments(self) -> list[str]:
        """Names of the experiments that have runs in this store."""
        return []

    def search_runs(
        self, experiment: str, *, tags: Optional[dict[str, str]] = None, statuses: Optional[Sequence[str]] = None
    ) -> list[RunRecord]:
        """Runs of one experiment whose tags equal every ``tags`` value and whose status is in
        ``statuses`` (all when None), oldest first. :class:`RunNotFoundError` for an unknown experiment."""
        raise RunNotFoundError(f"experiment {experiment!r} not found in {self.describe()}")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Every logged ``(step, value)`` of one metric, in logging order."""
        raise RunNotFoundError(f"run id {run_id!r} not found in {self.describe()}")

    def download_artifact(self, run_id: str, artifact_path: str, dst: str | Path) -> Optional[Path]:
        """A local copy of one artifact (file or folder) of a run, under ``dst``; ``None`` when the
        run has no such artifact. A store whose files are on this machine may return them in place
        (treat the result as read-only)."""
        return None

    def local_run_dir(self, run_id: str) -> Optional[Path]:
        """The run's folder on this machine (with its ``recipe.yaml``), when there is one."""
        return None

    def get_runs(
        self,
        *,
        experiment: Optional[str] = None,
        run_ids: Optional[Sequence[str]] = None,
        tags: Optional[dict[str, str]] = None,
        statuses: Optional[Sequence[str]] = None,
    ) -> list[RunRecord]:
        """Runs of one experiment (filtered like :meth:`search_runs`), or given ids in the given order
        (with ``experiment`` too: ids that must all be in it).

        Raises:
            RunNotFoundError: unknown experiment or run id (the message lists what exists).
        """
        if experiment is None and not run_ids:
            raise ConfigError("get_runs needs an experiment name or a list of run ids")
        if not run_ids:
            return self.search_runs(experiment, tags=tags, statuses=statuses)
        if experiment is not None and experiment not in self.experiments():
            raise RunNotFoundError(self._unknown_experiment(experiment))
        records = [self.get_run(run_id) for run_id in run_ids]
        if experiment is not None:
            outside = [r.run_id for r in records if r.experiment != experiment]
            if outside:
                raise RunNotFoundError(f"run id(s) {outside} are not in experiment {experiment!r}")
        if tags:
            records = [r for r in records if all(r.tags.get(k) == str(v) for k, v in tags.items())]
        if statuses:
            records = [r for r in records if r.status in statuses]
        return records

    def _unknown_experiment(self, experiment: str) -> str:
        known = ", ".join(sorted(self.experiments())) or "none"
        return f"experiment {experiment!r} not found in {self.describe()} (experiments there: {known})"


class NullStore(RunStore):
    """Keeps the current run in memory (``.params``, ``.metrics``, ``.tags``, ``.artifacts``,
    ``.status``: handy in tests) and writes nothing anywhere. Its read side knows no runs."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[Optional[int], float]]] = {}
        self.artifacts: list[str] = []
        self.tags: dict[str, str] = {}
        self.status: Optional[str] = None
        self.run_id = None

    def describe(self) -> str:
        return "no run store (tracking in memory only)"

    def start(self, *, experiment, run_name, tags, resume_run_id=None, parent_run_id=None):
        self.tags.update({k: str(v) for k, v in tags.items()})
        self.run_id = resume_run_id
        self.status = "RUNNING"
        return self.run_id

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_figure(self, figure, artifact_file):
        self.artifacts.append(artifact_file)

    def log_artifact(self, local_path, artifact_path=None):
        name = Path(local_path).name
        self.artifacts.append(f"{artifact_path}/{name}" if artifact_path else name)

    def log_text(self, text, artifact_file):
        self.artifacts.append(artifact_file)

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def end(self, status="FINISHED"):
        self.status = status
