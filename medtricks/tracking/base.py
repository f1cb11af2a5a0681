"""The Tracker interface every run logs through, and a null implementation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

__all__ = ["Tracker", "NullTracker"]


class Tracker:
    """Receives params, metrics and artifacts of one run. Subclasses talk to a backend."""

    run_id: Optional[str] = None

    def start(self, *, experiment: str, run_name: str, tags: dict[str, str],
              resume_run_id: Optional[str] = None, parent_run_id: Optional[str] = None) -> Optional[str]:
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

    def run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a run in this tracker's store (to link evaluations to it)."""
        return False


class NullTracker(Tracker):
    """``tracking.backend: none``: keeps the last values in memory (handy in tests), logs nothing."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[Optional[int], float]]] = {}
        self.artifacts: list[str] = []
        self.tags: dict[str, str] = {}
        self.status: Optional[str] = None

    def start(self, *, experiment, run_name, tags, resume_run_id=None, parent_run_id=None):
        self.tags.update(tags)
        self.run_id = resume_run_id
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
        self.tags.update(tags)

    def end(self, status="FINISHED"):
        self.status = status
