"""Image corruptions: identity at severity 0, every corruption changes the image and stays in [0, 1]."""

from __future__ import annotations

import pytest
import torch

from medtricks.audit import CORRUPTION_PARAMS, corrupt, list_corruptions

EXPECTED = ["gaussian_noise", "poisson_noise", "gaussian_blur", "contrast", "brightness", "gamma", "jpeg", "downsample"]


def _phantom(n: int = 3, channels: int = 1, size: int = 48) -> torch.Tensor:
    """Smooth chest-like phantom with edges, in [0.1, 0.9]; batch items differ."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    lungs = ((((xx.abs() - 0.45) / 0.3) ** 2 + (yy / 0.7) ** 2) < 1).float()
    base = 0.75 - 0.5 * lungs + 0.1 * torch.cos(6 * yy)
    images = torch.stack([base * (1 - 0.1 * i) for i in range(n)]).unsqueeze(1)
    return images.clamp(0.1, 0.9).repeat(1, channels, 1, 1)


def test_list_matches_params():
    assert list_corruptions() == EXPECTED
    assert all(len(CORRUPTION_PARAMS[c]) == 5 for c in EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_severity_zero_is_identity(name):
    x = _phantom()
    out = corrupt(x, name, 0)
    assert torch.equal(out, x) and out is not x


@pytest.mark.parametrize("channels, size", [(1, 48), (3, 32), (2, 20)])
@pytest.mark.parametrize("name", EXPECTED)
def test_each_severity_changes_image_within_range(name, channels, size):
    x = _phantom(channels=channels, size=size)
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seed=1)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert (out - x).abs().mean() > 1e-3, (name, severity)


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "poisson_noise", "gaussian_blur", "contrast", "brightness", "gamma", "downsample"]
)
def test_harm_grows_with_severity(name):
    x = _phantom(size=64)
    change = [float((corrupt(x, name, s, seed=0) - x).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(change, change[1:])), change


def test_single_image_and_seeds():
    x = _phantom(n=1)[0]
    assert corrupt(x, "jpeg", 4).shape == x.shape
    a, b = corrupt(x, "poisson_noise", 3, seed=5), corrupt(x, "poisson_noise", 3, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt(x, "poisson_noise", 3, seed=6))


def test_bad_input_is_named():
    x = _phantom()
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="0..5"):
        corrupt(x, "jpeg", 6)
    with pytest.raises(ValueError, match=r"in \[0, 1\].*de-normalize"):
        corrupt((x - 0.5) / 0.25, "jpeg", 1)
    with pytest.raises(ValueError, match="float tensor"):
        corrupt((x * 255).to(torch.uint8), "jpeg", 1)
