"""What a run prints while it trains: one line per epoch that stays on screen, written through
``tqdm.write`` so a progress bar on the terminal is not broken. The engine knows nothing of this:
``run.py`` passes :func:`epoch_reporter`'s callback as the engine's ``on_epoch``.

Example::

    >>> epoch_line({"epoch": 3.0, "train/epoch_loss": 0.75463, "val/loss": 0.52, "val/auroc": 0.99,
    ...             "val/accuracy": 0.93, "train/img_per_s": 27.14}, epochs=8, lr=0.0281, seconds=12.34)
    'epoch 3/8  train_loss 0.7546  val_loss 0.5200  val_auroc 0.990  val_accuracy 0.930  lr 2.81e-02  27.1 img/s  12.3 s'
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from medtricks._defaults import DEFAULT_METRIC

__all__ = ["say", "epoch_line", "epoch_reporter", "where_to_look"]

# metric key -> (label, format), in the order printed; the best metric is added when it is another one
_SHOWN = (
    ("train/epoch_loss", "train_loss", ".4f"),
    ("val/loss", "val_loss", ".4f"),
    (DEFAULT_METRIC, DEFAULT_METRIC.replace("/", "_"), ".3f"),
    ("val/accuracy", "val_accuracy", ".3f"),
)


def say(*parts) -> None:
    """``print`` that leaves a tqdm bar intact (the bar is redrawn below the line)."""
    from tqdm.auto import tqdm

    tqdm.write(" ".join(str(p) for p in parts))


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "nan"


def epoch_line(
    metrics: dict,
    *,
    epochs: int,
    lr: Optional[float] = None,
    seconds: Optional[float] = None,
    best_metric: Optional[str] = None,
) -> str:
    """``epoch 3/8  train_loss 0.7546  val_loss 0.5200  val_auroc 0.990  ...  lr 2.81e-02  27.1 img/s  12.3 s``
    from the engine's epoch metrics (keys that are missing are left out)."""
    parts = [f"epoch {int(metrics.get('epoch', 0))}/{epochs}"]
    shown = list(_SHOWN)
    if best_metric and best_metric not in {k for k, _, _ in shown}:
        shown.append((best_metric, best_metric.replace("/", "_"), ".3f"))
    parts += [f"{label} {_num(metrics[key], fmt)}" for key, label, fmt in shown if key in metrics]
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if "train/img_per_s" in metrics:
        parts.append(f"{_num(metrics['train/img_per_s'], '.1f')} img/s")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def epoch_reporter(
    log: Callable[[int, dict], None],
    say: Callable[..., None],
    *,
    epochs: int,
    lr: Optional[Callable[[], float]] = None,
    best_metric: Optional[str] = None,
) -> Callable[[int, dict], None]:
    """The engine's ``on_epoch``: ``log(step, metrics)`` (the tracker) first, then one epoch line
    through ``say`` (a no-op when the run is quiet). The seconds are wall time since the previous
    epoch ended (training and validation), the first from when this callback was made."""
    last = [time.perf_counter()]

    def on_epoch(step: int, metrics: dict) -> None:
        log(step, metrics)
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        say(epoch_line(metrics, epochs=epochs, lr=lr() if lr else None, seconds=seconds, best_metric=best_metric))

    return on_epoch


def where_to_look(
    run_id: Optional[str], run_dir, *, experiment: str, mlflow_uri: Optional[str] = None, runs_dir=None
) -> str:
    """The end of a run: its id, its folder and the command that shows it (``mlflow ui`` for an MLflow
    store, ``medtricks compare --runs-dir`` for the local run store of ``tracking.backend: none``)."""
    lines = [f"run {run_id or '(not tracked)'} finished: {run_dir}"]
    if mlflow_uri and str(mlflow_uri).startswith(("http://", "https://", "databricks")):
        lines.append(f"look at it: open {mlflow_uri} (experiment {experiment})")
    elif mlflow_uri:
        lines.append(
            f"look at it: MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri {mlflow_uri}   "
            f"# then http://127.0.0.1:5000, experiment {experiment}"
        )
    elif runs_dir is not None:
        lines.append(f"look at it: medtricks compare --runs-dir {runs_dir} --experiment {experiment}")
    return "\n".join(lines)
