"""benchmarks/time_to_quality.py (issue 29): its summary arithmetic (fast) and its --quick run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO_ROOT))


def _run(arm: str, seed: int, curve: list[float], final: float | None = None, wall: float = 10.0) -> dict:
    points = [{"epoch": i + 1, "wall_s": wall * (i + 1), "test_auroc": a} for i, a in enumerate(curve)]
    return {
        "arm": arm,
        "seed": seed,
        "curve": points,
        "final_test_auroc": curve[-1] if final is None else final,
        "total_wall_s": wall * len(curve) + 1,
        "peak_rss_mb": 1000.0,
        "test_split": "x",
    }


def test_time_to_quality_speedup_is_reference_time_to_its_own_final_over_fast_time_to_the_reference_mean():
    from benchmarks.time_to_quality import first_time, summarize

    assert first_time([{"wall_s": 1.0, "test_auroc": 0.5}, {"wall_s": 2.0, "test_auroc": 0.9}], 0.9) == 2.0
    assert first_time([{"wall_s": 1.0, "test_auroc": None}], 0.1) is None
    runs = [
        _run("plain", 0, [0.90, 0.95, 0.97], wall=100),
        _run("plain", 1, [0.92, 0.96, 0.95], wall=100),
        # fast: seed 0 reaches plain's mean final (0.96) at epoch 1, seed 1 at epoch 2
        _run("fast", 0, [0.965, 0.97], wall=10),
        _run("fast", 1, [0.95, 0.961], wall=10),
        _run("shipped", 0, [0.96, 0.975, 0.97], final=0.975, wall=50),
        _run("shipped", 1, [0.97, 0.96, 0.97], final=0.97, wall=50),
    ]
    result = summarize(runs, ["plain", "shipped", "fast"])
    vs_plain = result["speedup_vs_plain"]
    assert vs_plain["target_auroc"] == pytest.approx(0.96)
    # plain: seed 0 reaches its final 0.97 at 300 s; seed 1 its final 0.95 already at epoch 2 (0.96 >= 0.95): 200 s
    assert vs_plain["plain_time_to_own_final_s"] == pytest.approx(250.0)
    assert vs_plain["fast_per_seed_s"] == [10.0, 20.0]
    assert vs_plain["value"] == pytest.approx(250.0 / 15.0)
    # shipped's mean final 0.9725 is reached by neither fast seed: no speed-up, and the reason says so
    assert result["speedup_vs_shipped"]["value"] is None and "2 of 2" in result["speedup_vs_shipped"]["why"]
    plain = result["summary"]["plain"]
    assert plain["time_to_0.990_s"] == {
        "target": 0.99,
        "mean_s": None,
        "per_seed_s": [None, None],
        "reached": 0,
        "n": 2,
        "never": 2,
    }
    assert (
        plain["final_test_auroc"]["ci_low"] < plain["final_test_auroc"]["mean"] < plain["final_test_auroc"]["ci_high"]
    )
    met = result["targets_met"]
    assert met["speedup_vs_plain"] is True and met["fast_total_wall_s"] is True and met["peak_rss_gib"] is True
    assert met["fast_auroc_within_shipped"] is False  # 0.9655 vs 0.9725 - 0.005
    assert result["fast_minus_shipped_auroc"]["seeds"] == [0, 1] and result["same_test_split"] is True
    assert "fast_minus_shipped_site_auroc" not in result and "site_auroc" not in result["summary"]["fast"]


def _with_site(run: dict, site: list[float], final: float | None = None) -> dict:
    curve = [{**point, "site_auroc": value} for point, value in zip(run["curve"], site)]
    return {**run, "curve": curve, "site_auroc": site[-1] if final is None else final}


def test_time_to_quality_site_speedups_and_pairs_use_the_site_curve_by_seed():
    from benchmarks.time_to_quality import summarize

    runs = [
        _with_site(_run("plain", 0, [0.95, 0.97, 0.98], wall=100), [0.90, 0.92, 0.93]),
        _with_site(_run("plain", 1, [0.95, 0.97, 0.98], wall=100), [0.90, 0.93, 0.91]),
        _with_site(_run("shipped", 0, [0.95]), [0.90]),
        _with_site(_run("shipped", 1, [0.96]), [0.92]),
        _with_site(_run("shipped", 2, [0.97]), [0.91]),
        # fast: both seeds pass plain's mean site final (0.92) at epoch 2 (20 s), neither its test final (0.98)
        _with_site(_run("fast", 0, [0.95, 0.96]), [0.91, 0.925]),
        _with_site(_run("fast", 1, [0.96, 0.97]), [0.89, 0.92]),
        _with_site(_run("fast", 2, [0.97, 0.97]), [0.88, 0.88], final=0.88),
    ]
    result = summarize(runs, ["plain", "shipped", "fast"])
    assert result["speedup_vs_plain"]["value"] is None  # on the test split: never reached
    on_site = result["speedup_vs_plain_on_site"]
    assert on_site["target_auroc"] == pytest.approx(0.92)
    # plain reaches its own site final at 300 s (seed 0: 0.93) and at 200 s (seed 1: 0.93 >= 0.91): mean 250 s
    assert on_site["plain_time_to_own_final_s"] == pytest.approx(250.0)
    assert on_site["fast_per_seed_s"] == [20.0, 20.0, None] and on_site["value"] is None  # seed 2 never
    assert "site AUROC" in on_site["why"] and "1 of 3" in on_site["why"]
    site = result["fast_minus_shipped_site_auroc"]
    assert site["seeds"] == [0, 1, 2] and site["mean"] == pytest.approx((0.025 + 0.0 - 0.03) / 3)
    assert site["ci_low"] < site["mean"] < site["ci_high"] and site["interval_decides"] is False
    assert result["summary"]["fast"]["site_auroc"]["mean"] == pytest.approx((0.925 + 0.92 + 0.88) / 3)
    assert result["summary"]["fast"]["time_to_plain_site_final_s"]["reached"] == 2
    assert result["speedup_vs_shipped_on_site"]["target_auroc"] == pytest.approx(0.91)
    # shipped runs without site scores: no site comparison with shipped, the one with plain stays
    no_site = [_run("shipped", k, [0.95]) for k in range(3)]
    result = summarize([r for r in runs if r["arm"] != "shipped"] + no_site, ["plain", "shipped", "fast"])
    assert "fast_minus_shipped_site_auroc" not in result and "speedup_vs_shipped_on_site" not in result
    assert result["speedup_vs_plain_on_site"]["fast_per_seed_s"] == [20.0, 20.0, None]
    runs[-1] = _run("fast", 2, [0.97, 0.97])  # a fast run without site scores: no site summary at all
    result = summarize(runs, ["plain", "shipped", "fast"])
    assert "fast_minus_shipped_site_auroc" not in result and "site_auroc" not in result["summary"]["fast"]
    assert "speedup_vs_plain_on_site" not in result and "speedup_vs_shipped_on_site" not in result


@pytest.mark.slow
def test_time_to_quality_quick(tmp_path):
    fast = REPO_ROOT / "recipes" / "kermany_pneumonia_fast.yaml"
    # Until the fast recipe exists, its arm runs the shipped recipe (the smoke test checks the plumbing only).
    extra = [] if fast.is_file() else ["--recipe-fast", str(REPO_ROOT / "recipes" / "kermany_pneumonia.yaml")]
    from medtricks.data.synthetic import synthesize_phantoms

    site = tmp_path / "site"  # a second test set: other phantoms, the quick arms' two classes
    synthesize_phantoms(site, n=24, classes=("normal", "pneumonia"), size=64, seed=7)
    extra += ["--site", str(site)]
    cmd = [sys.executable, "-m", "benchmarks.time_to_quality", "--quick", "--out", str(tmp_path), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "time_to_quality.json").read_text())
    assert payload["quick"] is True and {"machine", "config", "method"} <= set(payload)
    assert len(payload["machine"]["loadavg_start"]) == 3 and len(payload["machine"]["loadavg_end"]) == 3
    assert [(r["arm"], r["seed"]) for r in payload["runs"]] == [("plain", 0), ("shipped", 0), ("fast", 0)]
    for row in payload["runs"]:
        walls = [p["wall_s"] for p in row["curve"]]
        assert [p["epoch"] for p in row["curve"]] == [1, 2] and walls == sorted(walls) and walls[0] > 0
        assert row["total_wall_s"] >= walls[-1] and row["peak_rss_mb"] > 0
        assert all(p["test_auroc"] is None or 0.0 <= p["test_auroc"] <= 1.0 for p in row["curve"])
    for row in payload["runs"][1:]:  # the curve's best-epoch value is the run's own test AUROC of that checkpoint
        assert row["final_test_auroc"] == pytest.approx(row["run_test_auroc"], abs=1e-6)
    assert payload["same_test_split"] is True
    for row in payload["runs"]:  # the site is scored every epoch; the row's value is the chosen epoch's
        assert all(0.0 <= p["site_auroc"] <= 1.0 for p in row["curve"])
        assert row["site_auroc"] == row["curve"][row["best_epoch"] - 1]["site_auroc"]
    for row in payload["runs"][1:]:  # ... and it is what `medtricks evaluate` gives for the saved checkpoint
        assert row["site_auroc"] == pytest.approx(row["run_site_auroc"], abs=1e-6)
    assert payload["config"]["site"] and payload["fast_minus_shipped_site_auroc"]["seeds"] == [0]
    assert set(payload["summary"]) == {"plain", "shipped", "fast"}
    assert (
        set(payload["targets"])
        == set(payload["targets_met"])
        == {"speedup_vs_plain", "fast_total_wall_s", "fast_auroc_within_shipped", "peak_rss_gib"}
    )
    assert "| arm" in proc.stdout
    # Resumable: the same command reads the finished runs back instead of training again.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier") == 3
    assert json.loads((tmp_path / "time_to_quality.json").read_text())["runs"] == payload["runs"]


def test_time_to_quality_refuses_a_missing_site_folder_before_any_run(tmp_path, capsys):
    from benchmarks.time_to_quality import main

    (tmp_path / "train").mkdir()  # a root that passes its own check
    with pytest.raises(SystemExit) as stop:
        main(["--root", str(tmp_path), "--site", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--arms", "plain"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--site" in err and "nowhere" in err and "is not a folder" in err
    assert not list(tmp_path.glob("**/*.json"))  # nothing ran, nothing written
