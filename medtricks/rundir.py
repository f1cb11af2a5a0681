"""The run folder: every path a run writes and every metric key it logs, in one place.

A run folder (``<experiment.output_dir>/<experiment.name>/<stamp>-<id>/``) holds::

    recipe.yaml                  the resolved recipe
    state.json                   status, run id in the run store, error (atomic writes)
    run.lock, run.lock.pid       held by the process training into the folder (one at a time), its pid
    store/                       the local run store (tracking.backend: none): meta.json, params.json,
                                 metrics.jsonl; its logged artifacts stay in the homes below
    checkpoints/last.pt|best.pt  full training state / the best model (resume)
    model/                       model_state.pt, data_config.json, MODEL_CARD.md, operating_point.json
    mlflow_model/                the MLflow pyfunc model (MLflow store only; logged as ``mlflow_model/``)
    artifacts/                   split_manifest.csv, quarantine.csv, predictions_<split>.npz (per-image
                                 probabilities), <trick>_report.csv (what a trick changed, e.g. the BN-γ layers)

Artifacts logged to the run store keep a folder name (``predictions/predictions_val.npz``,
``data/split_manifest.csv``, ``model/model_state.pt``); :meth:`RunDir.artifact_for` maps one to its
local file. Nothing else in medtricks spells these names.

Example::

    from medtricks.rundir import RunDir, best_key
    run = RunDir("runs/quickstart/20261201-101406-d20d09")
    print(run.read_state()["status"], run.predictions("val"), best_key("val", "auroc"))
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from medtricks._atomic import atomic_path
from medtricks.errors import ConfigError, ResourceError

__all__ = [
    "RunDir",
    "best_key",
    "ci_keys",
    "gap_key",
    "eval_key",
    "PREDICTIONS_FILE",
    "PREDICTIONS_ARTIFACT_DIR",
    "PREDICTIONS_EVAL_FILE",
    "OPERATING_POINT_FILE",
    "MODEL_ARTIFACT_DIR",
]

# Per-image predictions (y_true, probs) of the best checkpoint on one split: ablations and `compare`
# pair runs image by image from these.
PREDICTIONS_FILE = "predictions_{split}.npz"
PREDICTIONS_EVAL_FILE = "predictions_eval.npz"  # what `medtricks evaluate` saves (y_true, probs, probs_op)
PREDICTIONS_ARTIFACT_DIR = "predictions"
OPERATING_POINT_FILE = "operating_point.json"
MODEL_ARTIFACT_DIR = "model"
MODEL_FILES = ("model_state.pt", "MODEL_CARD.md", "data_config.json", OPERATING_POINT_FILE)

# store artifact folder -> local folder inside the run folder
_ARTIFACT_HOME = {
    PREDICTIONS_ARTIFACT_DIR: "artifacts",
    "data": "artifacts",
    "tricks": "artifacts",
    MODEL_ARTIFACT_DIR: "model",
    "": "",
}

# The local run store's folder inside a run folder, and the folders a search for stores never enters.
STORE_DIR = "store"
_LEAF_DIRS = frozenset({"checkpoints", "artifacts", "model", "mlflow_model", "plots", STORE_DIR})


# ------------------------------------------------------------------------------------ metric keys
def best_key(split: str, metric: str, *, op: bool = False) -> str:
    """The best checkpoint's metric on a split: ``best/val/auroc``; at the operating point ``best/val/op/accuracy``."""
    return f"best/{split}/{'op/' if op else ''}{metric}"


def ci_keys(key: str) -> tuple[str, str]:
    """The bootstrap CI bounds logged next to a metric key: ``(<key>_ci_low, <key>_ci_high)``."""
    return f"{key}_ci_low", f"{key}_ci_high"


def gap_key(split: str, reference: str, metric: str) -> str:
    """``test-val/auroc``: a split's value minus the reference split's (generalization gap)."""
    return f"{split}-{reference}/{metric}"


def eval_key(metric: str, *, op: bool = False) -> str:
    """A metric of ``medtricks evaluate`` on external data: ``eval/auroc``, ``eval/op/accuracy``."""
    return f"eval/{'op/' if op else ''}{metric}"


# --------------------------------------------------------------------------------------- folder
class RunDir:
    """One run folder. Paths are properties; ``state.json`` is read and updated atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- creation and lookup
    @staticmethod
    def experiment_dir(output_dir: str | Path, experiment: str) -> Path:
        """``<output_dir>/<experiment>``; an experiment name that is not one plain folder name is refused
        (the recipe refuses it first: ``experiment.name``)."""
        if not experiment or experiment.startswith(".") or Path(experiment).name != experiment or "\\" in experiment:
            raise ConfigError(
                f"experiment.name={experiment!r} cannot name a run folder inside {output_dir}: use a "
                "plain name without path separators and not starting with '.'"
            )
        return Path(output_dir) / experiment

    @classmethod
    def create(cls, output_dir: str | Path, experiment: str) -> "RunDir":
        """A new, empty run folder ``<output_dir>/<experiment>/<YYYYmmdd-HHMMSS>-<6 hex>``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = cls.experiment_dir(output_dir, experiment) / f"{stamp}-{secrets.token_hex(3)}"
        path.mkdir(parents=True, exist_ok=False)
        return cls(path)

    @classmethod
    def find_resumable(cls, output_dir: str | Path, experiment: str) -> Optional["RunDir"]:
        """The newest run folder of the experiment that did not finish and has a ``last.pt``, if any."""
        base = cls.experiment_dir(output_dir, experiment)
        if not base.is_dir():
            return None
        for path in sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
            run = cls(path)
            if run.read_state().get("status") != "finished" and run.last_checkpoint.is_file():
                return run
        return None

    @classmethod
    def newest_finished(cls, folder: str | Path) -> Optional["RunDir"]:
        """The newest finished run folder (with its model) directly inside an experiment folder
        (``<output_dir>/<experiment>``), if any; run folders sort by their time stamp."""
        folder = Path(folder)
        if not folder.is_dir() or (folder / "recipe.yaml").is_file():
            return None
        for path in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
            run = cls(path)
            if run.recipe.is_file() and run.model_state.is_file() and run.is_finished():
                return run
        return None

    @classmethod
    def containing(cls, path: str | Path) -> Optional["RunDir"]:
        """The run folder a path points at or into (the folder, its ``model/`` or a file there), if it is one."""
        path = Path(path)
        for candidate in (path, *path.parents[:3]):
            if candidate.is_dir() and (candidate / "recipe.yaml").is_file():
                return cls(candidate)
        return None

    @classmethod
    def find_stores(cls, root: str | Path) -> Iterator["RunDir"]:
        """Every folder below ``root`` (itself included) that holds a local run store (``store/meta.json``)."""
        root = Path(root)
        if not root.is_dir():
            return
        for dirpath, dirnames, _ in os.walk(root):
            here = cls(dirpath)
            if STORE_DIR in dirnames and here.store_meta.is_file():
                yield here
            dirnames[:] = sorted(
                d for d in dirnames if d not in _LEAF_DIRS and not d.startswith((".", f"{STORE_DIR}."))
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Hold the run folder's lock (``run.lock``, an OS file lock through ``filelock``) while the block runs.

        A second process on a locked folder fails at once with a :class:`ResourceError` naming the folder and
        the holder's pid (from ``run.lock.pid``, written once the lock is held). The OS releases the lock
        when its process dies (``kill -9`` included), so a stale ``run.lock`` never blocks; the pid file a
        killed process leaves is overwritten by the next holder."""
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_file), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ResourceError(
                f"run folder {self.path} is in use by another medtricks process "
                f"({self.lock_holder() or 'pid unknown'}); wait for it to end, or stop it"
            ) from None
        mine = f"pid {os.getpid()} on {socket.gethostname()}"
        try:
            try:
                self.lock_pid_file.write_text(mine + "\n")
            except OSError:  # only the message of a second process loses the pid
                pass
            yield self
        finally:
            try:
                if self.lock_holder() == mine:
                    self.lock_pid_file.unlink()
            except OSError:
                pass
            lock.release()

    def lock_holder(self) -> Optional[str]:
        """``"pid 123 on host"`` of the process that holds (or last held) the run folder's lock, if written."""
        try:
            return self.lock_pid_file.read_text().strip() or None
        except OSError:
            return None

    @property
    def output_dir(self) -> Path:
        """The ``experiment.output_dir`` the folder was created under (``<output_dir>/<experiment>/<stamp>-<id>``)."""
        return self.path.parent.parent

    @property
    def short_id(self) -> str:
        """The random suffix of the folder name (``d20d09``)."""
        return self.path.name.split("-")[-1]

    # ---- files
    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def lock_file(self) -> Path:
        """Held (an OS lock) by the process that trains into the folder: :meth:`locked`."""
        return self.path / "run.lock"

    @property
    def lock_pid_file(self) -> Path:
        return self.path / "run.lock.pid"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def model_state(self) -> Path:
        return self.model_dir / "model_state.pt"

    @property
    def data_config(self) -> Path:
        return self.model_dir / "data_config.json"

    @property
    def model_card(self) -> Path:
        return self.model_dir / "MODEL_CARD.md"

    @property
    def operating_point(self) -> Path:
        return self.model_dir / OPERATING_POINT_FILE

    @property
    def mlflow_model(self) -> Path:
        """The MLflow pyfunc model folder (``MLmodel``, TorchScript, info.json) a run tracked in MLflow logs."""
        return self.path / "mlflow_model"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def split_manifest(self) -> Path:
        return self.artifacts / "split_manifest.csv"

    @property
    def quarantine(self) -> Path:
        return self.artifacts / "quarantine.csv"

    def trick_report(self, trick: str) -> Path:
        """The report a trick writes of what it changed (``artifacts/<trick>_report.csv``), logged to ``tricks/``."""
        return self.artifacts / f"{trick}_report.csv"

    def predictions(self, split: str) -> Path:
        return self.artifacts / PREDICTIONS_FILE.format(split=split)

    # ---- the local run store (tracking.backend: none)
    @property
    def store(self) -> Path:
        return self.path / STORE_DIR

    @property
    def store_meta(self) -> Path:
        """Run id, experiment, run name, status, start/end time, tags, parent (atomic writes)."""
        return self.store / "meta.json"

    @property
    def store_params(self) -> Path:
        return self.store / "params.json"

    @property
    def store_metrics(self) -> Path:
        """One JSON line per logged value (key, step, value, time): append-only."""
        return self.store / "metrics.jsonl"

    # ---- store artifact paths <-> local files
    @staticmethod
    def predictions_artifact(split: str) -> str:
        return f"{PREDICTIONS_ARTIFACT_DIR}/{PREDICTIONS_FILE.format(split=split)}"

    @staticmethod
    def manifest_artifact() -> str:
        return "data/split_manifest.csv"

    def artifact_for(self, artifact_path: str) -> Path:
        """The local file of a store artifact path (``predictions/predictions_val.npz`` → ``artifacts/...``)."""
        folder, _, name = artifact_path.replace("\\", "/").rpartition("/")
        home = _ARTIFACT_HOME.get(folder, folder)
        return self.path / home / name if home else self.path / name

    # ---- state
    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def write_state(self, **updates: Any) -> dict[str, Any]:
        """Merge ``updates`` into ``state.json`` (write to a temp file, then rename: a crash keeps the old one;
        a failed write, e.g. a full disk, removes the temp file and raises)."""
        state = self.read_state()
        state.update(updates)
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.state_file) as tmp:
            tmp.write_text(json.dumps(state, indent=2))
        return state

    def is_finished(self) -> bool:
        return self.read_state().get("status") == "finished"
