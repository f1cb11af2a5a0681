"""What a self-training folder remembers between calls: ``self_train_state.json`` (every finished round and
its table row), a round's row from its result or, when the state entry was not written, from the run store,
and a round's finished run folder. This is what lets a re-run skip finished rounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from medtricks._atomic import atomic_path
from medtricks.rundir import RunDir, best_key, ci_keys
from medtricks.self_train_plan import RoundPlan
from medtricks.self_train_result import _METRICS

__all__ = ["STATE_FILE"]

STATE_FILE = "self_train_state.json"


def _read_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / STATE_FILE
    if not path.is_file():
        return {"rounds": {}}
    state = json.loads(path.read_text())
    state.setdefault("rounds", {})
    return state


def _write_state(out_dir: Path, state: dict[str, Any]) -> None:
    with atomic_path(out_dir / STATE_FILE) as tmp:
        tmp.write_text(json.dumps(state, indent=2))


def _row_from_result(result, plan: RoundPlan, model: str) -> dict[str, Any]:
    row: dict[str, Any] = {"round": plan.index, "model": model, "teacher_round": plan.teacher_round}
    for split, metrics in (("val", result.metrics), ("test", result.test_metrics)):
        values = dict(getattr(metrics, "values", {}) or {})
        ci = dict(getattr(metrics, "ci", {}) or {})
        for name in _METRICS:
            low, high = ci.get(name, (math.nan, math.nan))
            row[f"{split}_{name}"] = float(values.get(name, math.nan))
            row[f"{split}_{name}_ci_low"], row[f"{split}_{name}_ci_high"] = float(low), float(high)
    kept = [h.get("train/pseudo_kept") for h in (result.history or []) if h.get("train/pseudo_kept") is not None]
    row["pseudo_kept"] = float(kept[-1]) if kept else math.nan
    row["run_id"], row["run_dir"] = result.run_id, str(Path(result.run_dir).resolve())
    return row


def _row_from_record(record, plan: RoundPlan, model: str, run_dir: Path) -> dict[str, Any]:
    """A round that finished while its state entry was not written: its numbers from the run store."""
    row: dict[str, Any] = {"round": plan.index, "model": model, "teacher_round": plan.teacher_round}
    for split in ("val", "test"):
        for name in _METRICS:
            key = best_key(split, name)
            low, high = ci_keys(key)
            row[f"{split}_{name}"] = record.metrics.get(key, math.nan)
            row[f"{split}_{name}_ci_low"] = record.metrics.get(low, math.nan)
            row[f"{split}_{name}_ci_high"] = record.metrics.get(high, math.nan)
    row["pseudo_kept"] = record.metrics.get("train/pseudo_kept", math.nan)
    row["run_id"], row["run_dir"] = record.run_id, str(run_dir.resolve())
    return row


def _finished_run_of_round(round_out: Path, experiment: str) -> Optional[RunDir]:
    base = RunDir.experiment_dir(round_out, experiment)
    if not base.is_dir():
        return None
    finished = [RunDir(p) for p in sorted(base.iterdir()) if p.is_dir() and RunDir(p).is_finished()]
    return finished[-1] if finished else None


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
