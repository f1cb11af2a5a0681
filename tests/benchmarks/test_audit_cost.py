"""benchmarks/audit_cost.py --quick: runs, writes its JSON, and PGD-k costs about k input-gradient passes."""

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
    result = module.main(["--quick", "--repeats", "5", "--out", str(out)])  # median of 5: robust to a busy core
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    steps = result["pgd_steps"]
    # no hidden overhead: PGD-k is k forward+backward passes plus one scoring forward (+ timing noise)
    assert result["pgd_in_forward_backward_passes"] <= 1.5 * steps
    assert result["ratio_to_clean"][f"pgd_{steps}"] > result["ratio_to_clean"]["fgsm"] > 1.0
