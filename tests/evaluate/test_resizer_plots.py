"""Resizer comparison figure: renders to PNG, shows what it should, leaves the resizer's modes alone."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from medtricks.evaluate.resizer_plots import resizer_comparison_figure
from medtricks.models.resizer import LearnableResizer


def _png_pixels(fig: Figure, path) -> np.ndarray:
    fig.savefig(path, dpi=50)
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("chans", [1, 3])
def test_figure_renders_to_png(tmp_path, chans):
    torch.manual_seed(0)
    resizer = LearnableResizer(in_chans=chans, out_size=24, n_filters=8, attention="cbam")
    fig = resizer_comparison_figure(resizer, torch.randn(6, chans, 48, 48), n=3)
    assert isinstance(fig, Figure)
    path = tmp_path / "resizer.png"
    pixels = _png_pixels(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 9  # 3 rows x 3 images
    assert [ax.get_ylabel() for ax in fig.axes[:9:3]] == ["bilinear resize", "resizer output", "difference"]


def test_rows_show_resize_output_and_difference():
    torch.manual_seed(0)
    resizer = LearnableResizer(in_chans=1, out_size=16, n_filters=4)
    images = torch.randn(2, 1, 32, 32)
    fig = resizer_comparison_figure(resizer, images, n=4)  # n larger than the batch: show what there is
    axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(axes) == 6
    resizer.eval()
    with torch.no_grad():
        plain, learned = resizer.resize(images)[:, 0], resizer(images)[:, 0]
    shown = {i: np.asarray(ax.images[0].get_array()) for i, ax in enumerate(axes)}
    # axes are row-major: row 0 resize, row 1 output, row 2 difference; 2 columns.
    np.testing.assert_allclose(shown[0], plain[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(shown[3], learned[1].numpy(), atol=1e-6)
    np.testing.assert_allclose(shown[5], (learned[1] - plain[1]).numpy(), atol=1e-6)


def test_train_and_eval_modes_restored():
    resizer = LearnableResizer(in_chans=1, out_size=16, n_filters=4, n_res_blocks=2)
    resizer.train()
    resizer.blocks[1].eval()  # a mixed state, e.g. frozen BN in one block
    before = {name: m.training for name, m in resizer.named_modules()}
    resizer_comparison_figure(resizer, torch.randn(2, 1, 32, 32))
    assert {name: m.training for name, m in resizer.named_modules()} == before
    # eval mode during the figure: BN running stats are not updated by plotting.
    assert torch.equal(resizer.head[-1].running_mean, torch.zeros(4))


def test_bad_inputs_are_clear_errors():
    resizer = LearnableResizer(in_chans=1, out_size=16, n_filters=4)
    with pytest.raises(ValueError, match=r"non-empty \(N, C, H, W\) tensor, got \(1, 32, 32\)"):
        resizer_comparison_figure(resizer, torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        resizer_comparison_figure(resizer, torch.randn(2, 1, 32, 32), n=0)
    with pytest.raises(TypeError, match="must have a resize"):
        resizer_comparison_figure(torch.nn.Identity(), torch.randn(2, 1, 32, 32))
