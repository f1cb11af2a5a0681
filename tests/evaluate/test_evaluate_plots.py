"""Evaluation figures: each returns a Figure that saves to a real PNG and shows the right numbers."""

from __future__ import annotations

import math
import warnings
import re

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, roc_auc_score

import medtricks.evaluate as ev
from medtricks.evaluate import (
    compute_metrics,
    plot_confusion_matrix,
    plot_forest,
    plot_lr_schedule,
    plot_reliability_diagram,
    plot_roc_curves,
)

CLASSES = ["normal", "pneumonia", "covid"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    logits = rng.normal(size=(120, 3))
    logits[np.arange(120), y] += 1.5
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _saved_png(fig, tmp_path, name):
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=80)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(raw) > 8_000, f"{name}.png is only {len(raw)} bytes"  # a blank canvas is ~2 kB
    return path


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_confusion_matrix_shows_sklearn_counts(data, tmp_path):
    y, p = data
    fig = plot_confusion_matrix(y, p.argmax(1), CLASSES)
    _saved_png(fig, tmp_path, "cm")
    cm = confusion_matrix(y, p.argmax(1))
    shown = sorted(int(t) for t in _texts(fig) if t.strip().isdigit())
    assert shown == sorted(cm.ravel().tolist())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert "n=120" in ax.get_title()
    with pytest.raises(ValueError, match=r"y_pred\[0\] = 3 is not a class index"):
        plot_confusion_matrix(y, np.full_like(y, 3), CLASSES)


def test_roc_curves_one_per_class_with_auc_in_legend(data, tmp_path):
    y, p = data
    fig = plot_roc_curves(y, p, CLASSES)
    _saved_png(fig, tmp_path, "roc")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for c, name in enumerate(CLASSES):
        auc = roc_auc_score(y == c, p[:, c])
        assert f"{name} (AUC = {auc:.2f})" in legend
    macro = compute_metrics(y, p, CLASSES, n_bootstrap=0).values["auroc"]
    assert f"macro AUROC {macro:.4f}" in fig.axes[0].get_title()


def test_roc_binary_has_one_curve_for_positive_class(data, tmp_path):
    y, p = data
    yb = (y > 0).astype(int)
    pb = np.stack([p[:, 0], 1 - p[:, 0]], axis=1)
    fig = plot_roc_curves(yb, pb, ["normal", "abnormal"])
    _saved_png(fig, tmp_path, "roc_binary")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"abnormal (AUC = {roc_auc_score(yb, pb[:, 1]):.2f})", "chance"]


def test_roc_class_without_images_is_reported_not_dropped(data):
    y, p = data
    y = np.where(y == 2, 0, y)
    with pytest.warns(RuntimeWarning, match=r"no curve for \['covid'\]"):
        fig = plot_roc_curves(y, p, CLASSES)
    assert "no curve (single class in y_true): covid" in fig.axes[0].get_title()
    assert "macro AUROC undefined" in fig.axes[0].get_title()


@pytest.mark.parametrize("n_bins", [10, 15])
def test_reliability_diagram_title_has_the_ece(data, tmp_path, n_bins):
    y, p = data
    fig = plot_reliability_diagram(y, p, n_bins=n_bins)
    _saved_png(fig, tmp_path, f"reliability{n_bins}")
    title = fig.axes[0].get_title()
    ece = compute_metrics(y, p, CLASSES, n_bootstrap=0, ece_bins=n_bins).values["ece"]
    assert f"ECE = {ece:.4f}" in title and f"{n_bins} bins" in title
    counts = [patch.get_height() for patch in fig.axes[1].patches]
    assert len(counts) == n_bins and sum(counts) == len(y)


def test_lr_schedule_with_epochs(tmp_path):
    warmup, total = 20, 100
    lrs = [
        0.1 * min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * max(0, i - warmup) / (total - warmup)))
        for i in range(total)
    ]
    fig = plot_lr_schedule(lrs, steps_per_epoch=10)
    _saved_png(fig, tmp_path, "lr")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), lrs)
    assert len([ln for ln in ax.lines[1:] if ln.get_xdata()[0] % 10 == 0]) == 9  # epoch boundaries
    assert any(getattr(child, "get_xlabel", lambda: "")() == "epoch" for child in ax.child_axes)
    groups = plot_lr_schedule(np.stack([lrs, np.array(lrs) * 0.1], axis=1))
    assert len(groups.axes[0].lines) == 2
    with pytest.raises(ValueError, match=r"lrs\[3\] is not finite"):
        plot_lr_schedule([0.1, 0.1, 0.1, float("nan")])
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        plot_lr_schedule(lrs, steps_per_epoch=0)


def test_forest_plot(tmp_path):
    labels = ["baseline", "+warmup", "+bn_gamma=zero_late (1 seed)"]
    fig = plot_forest(
        labels, [0.86, 0.87, 0.88], [0.85, 0.862, math.nan], [0.87, 0.878, math.nan], reference=0.86, xlabel="val/auroc"
    )
    _saved_png(fig, tmp_path, "forest")
    ax = fig.axes[0]
    top_to_bottom = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_to_bottom] == labels  # first label at the top
    texts = _texts(fig)
    assert "0.8600 [0.8500, 0.8700]" in texts and "0.8800 (no CI)" in texts
    assert ax.get_xlabel() == "val/auroc"
    assert any(re.fullmatch(r"reference 0\.86", t.get_text()) for t in ax.get_legend().get_texts())
    with pytest.raises(ValueError, match="equally long"):
        plot_forest(labels, [0.86], [0.85], [0.87])
    with pytest.raises(ValueError, match=r"row 'baseline': expected low <= mean <= high"):
        plot_forest(["baseline"], [0.9], [0.91], [0.95])


def test_forest_plot_wraps_a_long_variant_instead_of_collapsing_the_axes(tmp_path):
    long = "+tricks.bn_gamma.strategy=rules+tricks.bn_gamma.rules=[{value: 0, stages: [-2, -1]}] (n=36)"
    fig = plot_forest(["baseline (n=36)", long], [0.94, 0.95], [0.93, 0.94], [0.95, 0.96], reference=0.94)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "forest_long.png", dpi=120, bbox_inches="tight")  # as the ablation saves it
    collapsed = [str(w.message) for w in caught if "collapsed" in str(w.message)]
    assert not collapsed, collapsed  # matplotlib gives up on the layout when a label leaves no room
    ax = fig.axes[0]
    label = sorted(ax.get_yticklabels(), key=lambda t: t.get_position()[1])[0].get_text()
    assert "".join(label.split()) == "".join(long.split()) and "\n" in label  # the same text, wrapped
    assert max(len(line) for line in label.splitlines()) <= 36


def test_plots_do_not_use_pyplot_figures(data):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    y, p = data
    plot_roc_curves(y, p, CLASSES)
    plot_confusion_matrix(y, p.argmax(1), CLASSES)
    plot_reliability_diagram(y, p)
    assert plt.get_fignums() == before  # nothing left open in pyplot's registry


def test_package_exports_are_lazy_and_complete():
    for name in ev.__all__:
        assert getattr(ev, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ev.nope  # noqa: B018
