"""Console and MLflow UI (issue 21): epoch lines, the bar, the end-of-run hint, table headers, tags, CLI help."""
from __future__ import annotations

import pytest
import torch

from medtricks.recipe import load_recipe
from medtricks.tricks.settings import MixedPrecision


# ------------------------------------------------------------------------------- 5: amp tag
@pytest.mark.parametrize("cuda, amp, device, expected", [
    (False, "auto", "auto", []),
    (True, "auto", "auto", ["amp=auto"]),
    (True, "auto", "cpu", []),
    (False, "bf16", "auto", ["amp=bf16"]),
    (False, "none", "auto", []),
])
def test_amp_tag_reports_what_resolves(monkeypatch, cuda, amp, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    recipe = load_recipe("quickstart", overrides=[f"train.amp={amp}", f"train.device={device}"])
    assert MixedPrecision.tags(recipe) == expected
    assert ("amp=auto" in recipe.tricks_on()) == (expected == ["amp=auto"])
