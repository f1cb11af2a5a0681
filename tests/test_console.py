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


# ------------------------------------------------------------------ 4: the bootstrap said once
def _metrics(seed=0, n_bootstrap=50):
    import numpy as np

    from medtricks.evaluate import compute_metrics

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p1 = np.clip(y * 0.6 + rng.random(40) * 0.4, 0, 1)
    return compute_metrics(y, np.stack([1 - p1, p1], 1), ["normal", "pneumonia"], n_bootstrap=n_bootstrap, seed=seed)


def test_metrics_table_header_says_the_bootstrap_once():
    head = _metrics(seed=7).table(title="evaluation of r on card (all)").splitlines()[0]
    assert head == "evaluation of r on card (all)  (n=40 images, percentile bootstrap, 50 resamples, seed 7)"
    assert _metrics(n_bootstrap=0).table().splitlines()[0] == "(n=40 images, no bootstrap)"


def test_final_report_says_the_bootstrap_once():
    from types import SimpleNamespace

    from medtricks.evaluate.split_table import split_table
    from medtricks.run import _final_report

    val, test = _metrics(), _metrics(seed=1)
    assert "percentile-bootstrap" not in split_table({"val": val, "test": test}, ci_note=False)
    assert split_table({"val": val}).splitlines()[-1] == \
        "[95% percentile-bootstrap CIs over images, 50 resamples, seed 0]"
    recipe = load_recipe("quickstart")
    op = SimpleNamespace(describe=lambda: "threshold 0.4 (youden on val)")
    text = _final_report(recipe, 3, ["normal", "pneumonia"], {"val": val, "test": test},
                         {"val": val, "test": test}, op)
    assert text.count("bootstrap") == 1 and text.count("resamples") == 1
    assert text.rstrip().endswith("50 resamples, seed 0]")
