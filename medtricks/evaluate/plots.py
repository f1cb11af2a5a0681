"""Evaluation figures: confusion matrix, ROC curves, reliability diagram, LR schedule, forest plot.

Every function returns a ``matplotlib.figure.Figure`` built on the Agg canvas *without pyplot*: no
display is needed, the global backend (e.g. a notebook's) is never switched, and figures are not
kept alive by pyplot's registry, so long ablations do not leak memory. Save with
``fig.savefig("roc.png", dpi=120)`` (the tracker logs them as PNG artifacts).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtricks._defaults import DEFAULT_METRIC
from medtricks.errors import ConfigError
from medtricks.evaluate.metric_inputs import _check_classes, _check_labels, _check_probs
from medtricks.evaluate.metrics import _auroc, _calibration_bins

__all__ = [
    "plot_confusion_matrix",
    "plot_roc_curves",
    "plot_reliability_diagram",
    "plot_lr_schedule",
    "plot_forest",
    "plot_cka",
]


def _new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)  # attach a non-interactive canvas explicitly
    return fig


def plot_confusion_matrix(y_true: Any, y_pred: Any, classes: Sequence[str]) -> Figure:
    """Confusion matrix of counts (rows: true class, columns: predicted), via sklearn's
    ``ConfusionMatrixDisplay``.

    Example: ``plot_confusion_matrix(y, probs.argmax(1), ["normal", "pneumonia"]).savefig("cm.png")``
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    names = _check_classes(classes, len(classes))
    y = _check_labels(y_true, len(names))
    pred = _check_labels(y_pred, len(names), name="y_pred")
    if len(pred) != len(y):
        raise ConfigError(f"y_pred has {len(pred)} labels but y_true has {len(y)}; expected one prediction per image")
    size = 2.5 + 0.6 * len(names)
    # "tight": constrained layout clips the y label next to an equal-aspect image with a colour bar
    fig = _new_figure(size + 1.0, size, layout="tight")
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        y,
        pred,
        labels=list(range(len(names))),
        display_labels=names,
        ax=ax,
        cmap="Blues",
        xticks_rotation=45 if len(names) > 4 else "horizontal",
    )
    ax.set_title(f"Confusion matrix (n={len(y)})")
    return fig


def plot_roc_curves(y_true: Any, probs: Any, classes: Sequence[str]) -> Figure:
    """ROC curves with the AUC in the legend: binary — one curve for the positive class
    ``classes[1]``; multiclass — one one-vs-rest curve per class. A class with no images (or no
    negatives) cannot have a curve: it is listed in the title and a warning is issued.
    """
    from sklearn.metrics import RocCurveDisplay

    y = _check_labels(y_true)
    p = _check_probs(probs, len(y))
    names = _check_classes(classes, p.shape[1])
    y = _check_labels(y, len(names))
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    which = [1] if len(names) == 2 else list(range(len(names)))
    omitted = []
    for c in which:
        positives = y == c
        if positives.all() or not positives.any():
            omitted.append(names[c])
            continue
        RocCurveDisplay.from_predictions(positives, p[:, c], name=names[c], ax=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    auroc = _auroc(y, p)
    auroc_text = f"{auroc:.4f}" if math.isfinite(auroc) else "undefined"
    title = f"ROC — AUROC {auroc_text}" if len(names) == 2 else f"ROC (one-vs-rest) — macro AUROC {auroc_text}"
    if omitted:
        warnings.warn(
            f"plot_roc_curves: no curve for {omitted}: need both positives and negatives", RuntimeWarning, stacklevel=2
        )
        title += f"\nno curve (single class in y_true): {', '.join(omitted)}"
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_aspect("equal")
    return fig


def plot_reliability_diagram(y_true: Any, probs: Any, n_bins: int = 15) -> Figure:
    """Top-label reliability diagram: accuracy vs confidence per bin, the gap to the diagonal
    shaded, image counts per bin below, and the ECE (same bins as ``compute_metrics``) in the title.
    """
    y = _check_labels(y_true)
    p = _check_probs(probs, len(y))
    y = _check_labels(y, p.shape[1])
    mean_conf, acc, counts = _calibration_bins(y, p, n_bins)
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(mean_conf[filled] - acc[filled])) / counts.sum())

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    fig = _new_figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    # Gap between what the model claims (mean confidence) and what it achieves (accuracy).
    top.bar(
        centers[filled],
        mean_conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram — ECE = {ece:.4f} ({n_bins} bins, n={len(y)})")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(centers, counts, width=width, edgecolor="black", color="grey")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("images")
    return fig


def plot_lr_schedule(lrs: Sequence[float] | Any, steps_per_epoch: int | None = None) -> Figure:
    """Learning rate per iteration (one line per parameter group if ``lrs`` is ``(steps, groups)``);
    with ``steps_per_epoch`` a second axis on top shows epochs and epoch boundaries are marked.
    """
    lr = np.asarray(lrs, dtype=np.float64)
    if lr.ndim == 1:
        lr = lr[:, None]
    if lr.ndim != 2 or lr.shape[0] == 0:
        raise ConfigError(
            f"lrs must be a non-empty sequence of learning rates (or a (steps, groups) array), got shape {np.shape(lrs)}"
        )
    if not np.all(np.isfinite(lr)):
        i = int(np.argwhere(~np.isfinite(lr))[0][0])
        raise ConfigError(f"lrs[{i}] is not finite: {lr[i].tolist()}")
    is_count = isinstance(steps_per_epoch, (int, np.integer)) and not isinstance(steps_per_epoch, bool)
    if steps_per_epoch is not None and not (is_count and steps_per_epoch >= 1):
        raise ConfigError(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")

    fig = _new_figure(6.5, 3.5)
    ax = fig.add_subplot()
    steps = np.arange(lr.shape[0])
    for g in range(lr.shape[1]):
        ax.plot(steps, lr[:, g], label=f"group {g}" if lr.shape[1] > 1 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, max(len(steps) - 1, 1))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"LR schedule (max {lr.max():.3g}, final {lr[-1].max():.3g})")
    if steps_per_epoch:
        spe = int(steps_per_epoch)
        for boundary in range(spe, len(steps), spe):
            ax.axvline(boundary, color="grey", linewidth=0.5, alpha=0.5)
        epochs = ax.secondary_xaxis("top", functions=(lambda it: it / spe, lambda ep: ep * spe))
        epochs.set_xlabel("epoch")
    if lr.shape[1] > 1:
        ax.legend(fontsize="small")
    return fig


_LABEL_WIDTH = 36  # characters per line of a forest plot's row label


def plot_forest(
    labels: Sequence[str],
    means: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    *,
    reference: float | None = None,
    xlabel: str = DEFAULT_METRIC,
) -> Figure:
    """Forest plot: one row per variant (top to bottom in the given order), the mean as a dot and
    its CI as a bar, the numbers at the right; ``reference`` (e.g. the baseline mean) as a dashed
    line. A row with a ``nan`` interval (one seed) shows its dot only, marked "no CI".

    >>> fig = plot_forest(["baseline", "+warmup"], [0.90, 0.92], [0.88, 0.91], [0.92, 0.93], reference=0.90)
    """
    names = [str(x) for x in labels]
    m, lo, hi = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (means, lows, highs))
    if not (len(names) == m.size == lo.size == hi.size) or not names:
        raise ConfigError(
            "labels, means, lows, highs must be non-empty and equally long, "
            f"got {len(names)}, {m.size}, {lo.size}, {hi.size}"
        )
    for i in range(len(names)):
        if not math.isfinite(m[i]):
            raise ConfigError(f"means[{i}] for {names[i]!r} is not finite: {m[i]}")
        if math.isfinite(lo[i]) and math.isfinite(hi[i]) and not lo[i] <= m[i] <= hi[i]:
            raise ConfigError(f"row {names[i]!r}: expected low <= mean <= high, got {lo[i]} <= {m[i]} <= {hi[i]}")

    # A long variant (a whole rules list) as one tick label squeezes the axes to nothing: wrap it.
    names = [textwrap.fill(n, width=_LABEL_WIDTH, break_long_words=True) for n in names]
    lines = sum(n.count("\n") + 1 for n in names)
    fig = _new_figure(7.0, 1.2 + 0.45 * len(names) + 0.2 * (lines - len(names)))
    ax = fig.add_subplot()
    rows = np.arange(len(names))[::-1]  # first label at the top
    has_ci = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(
        m[has_ci],
        rows[has_ci],
        xerr=[m[has_ci] - lo[has_ci], hi[has_ci] - m[has_ci]],
        fmt="o",
        color="black",
        ecolor="tab:blue",
        elinewidth=2,
        capsize=4,
    )
    ax.plot(m[~has_ci], rows[~has_ci], "o", color="black", markerfacecolor="white")
    if reference is not None:
        ax.axvline(
            float(reference), color="tab:red", linestyle="--", linewidth=1, label=f"reference {float(reference):.4g}"
        )
        ax.legend(loc="lower right", fontsize="small")
    ax.set_yticks(rows, names)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel(xlabel)
    for i, row in enumerate(rows):
        text = f"{m[i]:.4f} [{lo[i]:.4f}, {hi[i]:.4f}]" if has_ci[i] else f"{m[i]:.4f} (no CI)"
        ax.annotate(text, xy=(1.02, row), xycoords=("axes fraction", "data"), va="center", fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_cka(
    matrix: Any, rows: Sequence[str], cols: Sequence[str], *, title: str = "CKA", xlabel: str = "B", ylabel: str = "A"
) -> Figure:
    """Heat map of a CKA matrix (rows: layers of ``A``, columns: layers of ``B``), 0..1 colour scale,
    values printed in the cells when there are few enough (``<= 16`` per side).

    Example: ``plot_cka(np.eye(3), ["b0", "b1", "b2"], ["b0", "b1", "b2"]).savefig("cka.png")``
    """
    m = np.asarray(matrix, dtype=float)
    if m.shape != (len(rows), len(cols)):
        raise ConfigError(f"plot_cka: matrix of shape {m.shape} for {len(rows)} row and {len(cols)} column names")
    # each side sized by its own layer count: 12 ViT blocks against 4 CNN stages stay readable
    longest = max((len(str(c)) for c in cols), default=1)
    width = max(4.5, 2.4 + 0.42 * len(cols) + 0.06 * max((len(str(r)) for r in rows), default=1))
    height = max(3.5, 1.6 + 0.32 * len(rows) + 0.06 * longest)
    fig = _new_figure(width, height, layout="tight")
    ax = fig.add_subplot()
    image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if max(len(rows), len(cols)) <= 16:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6 if len(cols) > 8 else 7,
                        color="black" if m[i, j] > 0.6 else "white",
                    )
    fig.colorbar(image, ax=ax, label="linear CKA")
    return fig
