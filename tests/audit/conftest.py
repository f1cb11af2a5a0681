"""The audit tests' toy task: a bright central blob means "pneumonia" (24 px grey images) and a tiny CNN
trained on it for a few steps; attacks at 8-16 grey levels flip it, smaller budgets do not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

MEAN, STD = (0.5,), (0.25,)
CLASSES = ["normal", "pneumonia"]
SIZE = 24


def _pixels(n: int, seed: int, n_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = 0.35 + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    blob = torch.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / (2 * (SIZE / 6) ** 2))
    return (x + 0.3 * y.view(-1, 1, 1, 1).float() / (n_classes - 1) * blob).clamp(0, 1), y


def _normalized(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - MEAN[0]) / STD[0]


def _cnn(n_classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, n_classes),
    )


def _train(seed: int = 0, n_classes: int = 2) -> nn.Module:
    model = _cnn(n_classes, seed)
    x01, y = _pixels(256, seed=100 + seed, n_classes=n_classes)
    x = _normalized(x01)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        i = torch.randint(0, len(y), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def blob_task():
    """The toy task: ``mean``, ``std``, ``classes``, ``size``; ``pixels(n, seed, n_classes=2)`` -> (x in [0, 1],
    y); ``normalized(x01)``; ``cnn(n_classes=2, seed=0)``; ``train(seed=0, n_classes=2)`` -> a trained CNN."""
    return SimpleNamespace(
        mean=MEAN, std=STD, classes=CLASSES, size=SIZE, pixels=_pixels, normalized=_normalized, cnn=_cnn, train=_train
    )
