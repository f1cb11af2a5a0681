"""benchmarks/audit_cost.py --quick: runs, writes its JSON, and its verdicts agree with its own timings.

The cost targets themselves (PGD-k about k input-gradient passes, within TARGET_RATIO of a clean pass) are
the benchmark's to print and save, not this test's to assert: timings on a shared 2-core machine are not a
test (a busy core failed a timed bound here once)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_audit_cost_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("audit_cost", REPO_ROOT / "benchmarks" / "audit_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "audit_cost.json"
    result = module.main(["--quick", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    steps = result["pgd_steps"]
    assert all(seconds > 0 for seconds in result["seconds"].values())
    ratio = result["ratio_to_clean"][f"pgd_{steps}"]
    assert ratio == pytest.approx(result["seconds"][f"pgd_{steps}"] / result["seconds"]["clean_pass"])
    assert result["within_target"] == (ratio <= result["target_ratio"])
    passes = result["pgd_in_forward_backward_passes"]
    assert result["pgd_passes_bound"] == 1.5 * steps
    assert result["pgd_passes_within_bound"] == (passes <= 1.5 * steps)
