"""Benchmark scripts: helpers (fast) and each script's --quick run (slow), so the scripts do not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import format_table, interleaved_order, ratio, results_dir, summarize  # noqa: E402


def test_interleaved_order_rotates_so_each_contender_takes_each_place():
    orders = interleaved_order(["a", "b", "c"], 6)
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all(sorted(order) == ["a", "b", "c"] for order in orders)
    for position in range(3):  # over 6 repeats each name is at each position twice
        assert sorted(order[position] for order in orders) == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(ValueError, match="repeats"):
        interleaved_order(["a"], 0)


def test_summarize_and_ratio():
    s = summarize([3.0, 1.0, 10.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) is None


def test_format_table_is_markdown_with_readable_numbers():
    text = format_table(
        [{"name": "resnet18", "img/s": 1234.567, "x": 0.98765, "ok": True, "none": None}],
        ["name", "img/s", "x", "ok", "none"],
    )
    header, rule, row = text.splitlines()
    assert header.split("|")[1].strip() == "name" and set(rule) <= {"|", "-"}
    assert [c.strip() for c in row.strip("|").split("|")] == ["resnet18", "1,234.6", "0.988", "yes", "-"]


def test_results_dir_uses_out_when_given(tmp_path):
    assert results_dir(str(tmp_path / "x"), quick=True) == tmp_path / "x"
    assert (tmp_path / "x").is_dir()


def test_parse_importtime_keeps_top_level_modules_by_cumulative_time():
    from benchmarks.cli_startup import parse_importtime

    stderr = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   _io\n"
        "import time:       500 |       2500 | argparse\n"
        "import time:      1500 |       4000 | medtricks\n"
    )
    rows = parse_importtime(stderr, top=5)
    assert [r["module"] for r in rows] == ["medtricks", "argparse"]
    assert rows[0]["cumulative_ms"] == 4.0 and rows[1]["self_ms"] == 0.5


def test_all_three_training_loops_do_the_same_arithmetic():
    """The throughput comparison is fair only if the loops compute the same thing: same model, data,
    loss, optimizer groups and LR schedule give the same loss after the same updates."""
    from benchmarks.train_throughput import CONTENDERS, Config, make_batches, measure

    cfg = Config(model="linear", in_chans=1, batch_size=4, image_size=8, warmup=1, steps=5, progress=False)
    batches = make_batches(cfg)
    results = {c: measure(c, cfg, batches) for c in CONTENDERS}
    losses = [results[c]["final_loss"] for c in CONTENDERS]
    assert max(losses) - min(losses) < 1e-5, losses
    assert all(results[c]["img_per_s"] > 0 and results[c]["peak_rss_mb"] > 0 for c in CONTENDERS)
    # a different learning rate changes the loss: the check above could fail
    other = measure(
        "bare", Config(model="linear", in_chans=1, batch_size=4, image_size=8, warmup=1, steps=5, lr=0.5), batches
    )
    assert abs(other["final_loss"] - losses[0]) > 1e-4


def test_config_rejects_zero_warmup():
    from benchmarks.train_throughput import Config

    with pytest.raises(ValueError, match="warmup and steps"):
        Config(model="resnet18", in_chans=1, warmup=0)


def _run_quick(script: str, out: Path, *extra: str, env_extra: dict | None = None) -> dict:
    import os

    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / script.replace(".py", ".json")
    assert path.is_file(), proc.stdout[-2000:]
    payload = json.loads(path.read_text())
    assert payload["quick"] is True
    assert {"machine", "config", "method"} <= set(payload)
    assert len(payload["machine"]["loadavg_start"]) == 3 and len(payload["machine"]["loadavg_end"]) == 3
    return payload


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    payload = _run_quick("train_throughput.py", tmp_path)
    entry = payload["results"]["resnet18/1x64"]
    assert set(entry["img_per_s"]) == {"medtricks", "bare", "timm"}
    assert all(v > 0 for v in entry["img_per_s"].values())
    assert entry["ratio_vs_bare"] == pytest.approx(entry["img_per_s"]["medtricks"] / entry["img_per_s"]["bare"])
    assert entry["ratio_vs_timm"] == pytest.approx(entry["img_per_s"]["medtricks"] / entry["img_per_s"]["timm"])
    assert set(entry["peak_rss_mb"]) == {"medtricks", "bare", "timm"}
    assert entry["max_final_loss_diff"] < 1e-3  # same arithmetic in all three loops
    assert isinstance(entry["meets_targets"], bool)
    assert set(entry["verdict"].values()) <= {"met", "within noise", "missed"}
    assert payload["overhead"]["us_per_update"]["medtricks"] > 0


@pytest.mark.slow
def test_data_pipeline_quick(tmp_path):
    payload = _run_quick("data_pipeline.py", tmp_path, env_extra={"MEDTRICKS_REAL_DATA": ""})
    assert payload["train_img_per_s"] > 0
    for fmt in ("jpeg", "png16", "dicom"):
        for workers in (0, 2):
            entry = payload["results"][f"{fmt}/workers{workers}"]
            assert set(entry["img_per_s"]) == {"no_cache", "cache_fill", "cache_warm"}
            assert all(v > 0 for v in entry["img_per_s"].values())
            assert entry["cache_mb"] > 0
            assert isinstance(entry["meets_target"], bool)
    assert isinstance(payload["target_met"], bool)


@pytest.mark.slow
def test_cli_startup_quick(tmp_path):
    payload = _run_quick("cli_startup.py", tmp_path)
    assert payload["help_seconds"] > 0 and isinstance(payload["target_met"], bool)
    assert "python -c pass" in payload["seconds"]
    assert payload["slowest_imports"], "python -X importtime output was not parsed"


@pytest.mark.slow
def test_robust_tradeoff_quick(tmp_path):
    payload = _run_quick("robust_tradeoff.py", tmp_path, "--seeds", "0", "--variants", "standard", "fgsm_rs@1/255")
    assert [r["variant"] for r in payload["runs"]] == ["standard", "fgsm_rs@1/255"]
    for row in payload["runs"]:
        assert 0 <= row["pgd20_acc@4"] <= row["pgd_clean_accuracy"] + 0.1  # an attack does not help (16 images)
        assert row["train_s"] > 0 and isinstance(row["masking_failed"], list)
    assert [t["variant"] for t in payload["table"]] == ["standard", "fgsm_rs@1/255"]
    assert payload["table"][0]["train cost x"] == "1.00"


@pytest.mark.slow
def test_label_efficiency_quick(tmp_path):
    payload = _run_quick("label_efficiency.py", tmp_path, "--seeds", "0", "1")
    table = {(t["labels"], t["variant"]) for t in payload["table"]}
    assert table == {(f, v) for f in ("30%", "100%") for v in ("baseline", "tricks")} | {
        ("30%", "noisy_student"),
        ("30%", "distill"),
    }
    ns = [r for r in payload["runs"] if r["variant"] == "noisy_student"]
    assert len(ns) == 2 and all(len(r["pseudo_kept"]) == 2 for r in ns)  # two student rounds per seed
    for row in payload["runs"]:
        assert 0.0 <= row["auroc"] <= 1.0 and row["train_s"] > 0
    # The distill rows learn from the 100 % tricks run of their own seed.
    teachers = {r["seed"]: r["run_dir"] for r in payload["runs"] if r["fraction"] == 1.0 and r["variant"] == "tricks"}
    for row in (r for r in payload["runs"] if r["variant"] == "distill"):
        recipe = (Path(row["run_dir"]) / "recipe.yaml").read_text()
        assert teachers[row["seed"]] in recipe


def test_label_efficiency_baseline_drops_the_schedule_tricks_only():
    from benchmarks.label_efficiency import baseline_overrides

    assert baseline_overrides(20) == [
        "schedule.name=step",
        "schedule.warmup_epochs=0",
        "tricks.no_bias_decay=false",
        "schedule.milestones=[10,15]",
    ]


@pytest.mark.slow
def test_site_deployment_quick_on_the_real_data(tmp_path, real_data_dir):
    payload = _run_quick(
        "site_deployment.py",
        tmp_path,
        "--data-root",
        str(real_data_dir / "kermany224"),
        "--site-root",
        str(real_data_dir / "kermany224_site"),
    )
    from benchmarks.site_deployment import RULES

    assert [line["decision rule on the site"] for line in payload["table"]] == list(RULES)
    assert [r["rule"] for r in payload["rows"]] == list(RULES)  # one seed in --quick
    for row in payload["rows"]:
        assert all(0.0 <= row[m] <= 1.0 for m in ("auroc", "accuracy", "sensitivity", "specificity"))
    seed = payload["seeds"][0]
    assert seed["train_s"] > 0 and seed["finetune_s"] > 0 and 0 < seed["site_threshold"] < 1


def test_label_efficiency_goals_and_the_delta_against_the_tricks_row():
    from benchmarks.label_efficiency import goal, summarize

    aurocs = {  # (fraction, variant) -> AUROC of seeds 0, 1, 2
        (1.0, "baseline"): [0.970, 0.972, 0.974],
        (1.0, "tricks"): [0.975, 0.973, 0.977],
        (0.1, "baseline"): [0.930, 0.940, 0.935],
        (0.1, "tricks"): [0.940, 0.950, 0.945],
        (0.1, "mpl"): [0.971, 0.972, 0.973],  # 0.975 - 0.972 = 0.003: within 0.005
        (0.02, "baseline"): [0.90, 0.91, 0.92],
        (0.02, "tricks"): [0.92, 0.93, 0.94],
        (0.02, "mpl"): [0.95, 0.96, 0.95],  # 0.953: below 0.96
    }
    metrics = {"accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.9, "train_s": 60.0}
    rows = [
        {"fraction": f, "variant": v, "seed": seed, "auroc": a, **metrics}
        for (f, v), values in aurocs.items()
        for seed, a in enumerate(values)
    ]
    table = {
        (t["labels"], t["variant"]): t
        for t in summarize(rows, {0.02: 12, 0.1: 4, 1.0: 1}, ["baseline", "tricks", "mpl"])
    }
    assert table[("10%", "mpl")]["Δ AUROC vs tricks"].startswith("+0.027")
    assert table[("10%", "tricks")]["Δ AUROC vs tricks"] == "(reference)"
    assert table[("10%", "baseline")]["Δ AUROC vs tricks"] == "n/a"
    verdict = goal(rows)
    assert "2 % labels, a semi-supervised method >= 0.960 test AUROC): not reached -- best mpl 0.953" in verdict
    assert "within 0.005 of the best fully supervised mean 0.975): reached -- best mpl 0.972, gap +0.003" in verdict


def test_verdict_tells_a_real_miss_from_noise():
    from benchmarks.train_throughput import verdict

    assert verdict(1.02, 1.0, {"max": 1.05}) == "met"
    assert verdict(0.98, 1.0, {"max": 1.03}) == "within noise"
    assert verdict(0.90, 1.0, {"max": 0.95}) == "missed"
    assert verdict(None, 1.0, {"max": 0.5}) == "missed"


@pytest.mark.slow
def test_executors_quick(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'medtricks[ray]')")
    payload = _run_quick("executors.py", tmp_path, "--repeats", "1")
    assert [r["executor"] for r in payload["table"]] == ["local", "local --jobs 2", "ray --cpus-per-run 1"]
    assert all(r["wall_s"] > 0 for r in payload["table"]) and payload["ray_startup_seconds"]["median"] > 0


@pytest.mark.slow
def test_gamma_study_quick(tmp_path):
    payload = _run_quick(
        "gamma_study.py",
        tmp_path,
        "--seeds",
        "2",
        "--until-ci",
        "0.5",
        "--max-seeds",
        "2",
        "--variants",
        "zero_late",
        "reinit_late",
    )
    rows = payload["rows"]
    assert [r["variant"] for r in rows] == ["none", "zero_late", "reinit_late"]
    for row in rows:
        assert {
            "dataset",
            "backbone",
            "label_fraction",
            "variant",
            "n_seeds",
            "auroc_mean",
            "delta_auroc",
            "delta_ci_low",
            "delta_ci_high",
        } <= set(row)
        assert row["n_seeds"] == 2 and 0.0 <= row["auroc_mean"] <= 1.0
    for row in rows[1:]:
        assert row["delta_ci_low"] <= row["delta_auroc"] <= row["delta_ci_high"]
        assert row["interval"].startswith("repeated CI")


@pytest.mark.slow
def test_gamma_study_fast_quick_runs_late_placements_on_cached_features(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "gamma_study.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--seeds",
            "2",
            "--fast",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "gamma_study_fast.json").read_text())
    assert payload["name"] == "gamma_study_fast" and payload["config"]["fast"]
    assert [r["variant"] for r in payload["rows"]] == ["none", "zero_late", "zero_late2", "one_late", "reinit_late"]
    assert not (tmp_path / "gamma_study.json").exists()  # never merged with the full fine-tuning rows


def test_gamma_study_fast_refuses_placements_in_the_frozen_stages(capsys):
    from benchmarks.gamma_study import main

    with pytest.raises(SystemExit):
        main(["--fast", "--variants", "zero_all", "--quick"])
    assert "zero_all" in capsys.readouterr().err


def test_gamma_study_site_rows_pair_seeds_against_none():
    from benchmarks.gamma_study import site_rows

    rows = [{"variant": "none"}, {"variant": "zero_late"}, {"variant": "reinit_late"}]
    scores = {
        ("baseline", 0): 0.80,
        ("baseline", 1): 0.90,
        ("baseline", 2): 0.85,
        ("+bn_gamma=zero_late", 0): 0.82,
        ("+bn_gamma=zero_late", 1): 0.92,
        ("+bn_gamma=zero_late", 2): 0.87,
        ("+reinit_late", 0): 0.70,
    }
    site_rows(rows, scores)
    none, zero, reinit = rows
    assert none["site_auroc_mean"] == pytest.approx(0.85) and none["site_delta_auroc"] == 0.0
    # the same +0.02 on every seed: the paired interval is that point, however far apart the seeds are
    assert zero["site_delta_auroc"] == pytest.approx(0.02)
    assert zero["site_delta_ci_low"] == pytest.approx(0.02) and zero["site_delta_ci_high"] == pytest.approx(0.02)
    assert reinit["site_delta_auroc"] is None  # one seed: no paired interval
    assert zero["site_auroc_by_seed"] == {"0": 0.82, "1": 0.92, "2": 0.87} and zero["site_interval"] == "paired t"


def test_gamma_study_site_rows_of_a_sequential_cell_use_its_repeated_ci():
    """Seeds that went on because of the test split: the site Δ gets the same Pocock repeated CI, wider than
    the paired t-interval of the same differences."""
    from benchmarks.gamma_study import site_rows
    from medtricks.ablation.sequential import repeated_ci
    from medtricks.evaluate.stats import paired_comparison

    base = [0.80, 0.90, 0.85, 0.83]
    diffs = [0.01, 0.03, -0.01, 0.02]
    scores = {("baseline", i): b for i, b in enumerate(base)}
    scores.update({("+reinit_late", i): b + d for i, (b, d) in enumerate(zip(base, diffs))})
    sequential = {"looks": [2, 4], "boundary": "pocock"}
    t_rows = [{"variant": "none"}, {"variant": "reinit_late"}]
    site_rows(t_rows, scores)
    rows = [{"variant": "none"}, {"variant": "reinit_late"}]
    site_rows(rows, scores, sequential)
    row = rows[1]
    mean, low, high = repeated_ci(diffs, [2, 4], kind="pocock")
    assert row["site_interval"] == "repeated CI, pocock"
    assert (row["site_delta_auroc"], row["site_delta_ci_low"], row["site_delta_ci_high"]) == pytest.approx(
        (mean, low, high)
    )
    paired = paired_comparison([b + d for b, d in zip(base, diffs)], base)
    assert t_rows[1]["site_delta_ci_low"] == pytest.approx(paired["ci_low"])
    assert (
        row["site_delta_ci_high"] - row["site_delta_ci_low"]
        > t_rows[1]["site_delta_ci_high"] - t_rows[1]["site_delta_ci_low"]
    )


def test_gamma_study_contrasts_pair_two_variants_by_seed_on_both_test_sets():
    """reinit_late + zero_late_one_rest against reinit_late alone: paired over the seeds both have, on the test
    split and the site sample; a cell without both variants has no contrast row."""
    from benchmarks.gamma_study import contrast_rows, contrasts_table
    from medtricks.evaluate.stats import paired_comparison

    key = {"dataset": "kermany", "backbone": "efficientnet_lite0", "label_fraction": 0.1}
    reinit = {"0": 0.90, "1": 0.94, "2": 0.91, "3": 0.93}
    combo = {"0": 0.92, "1": 0.95, "2": 0.90, "3": 0.96}
    rows = [
        {**key, "variant": "none", "test_auroc_by_seed": {"0": 0.8, "1": 0.8}},
        {**key, "variant": "reinit_late", "test_auroc_by_seed": reinit, "site_auroc_by_seed": {"0": 0.7, "1": 0.8}},
        {
            **key,
            "variant": "reinit_late_zero_late_one_rest",
            "test_auroc_by_seed": {**combo, "9": 0.5},  # a seed reinit_late lacks: not paired, not counted
            "site_auroc_by_seed": {"0": 0.72, "1": 0.83},
        },
    ]
    (row,) = contrast_rows(rows)
    expected = paired_comparison([combo[s] for s in "0123"], [reinit[s] for s in "0123"])
    assert row["contrast"] == "reinit_late_zero_late_one_rest - reinit_late" and row["label_fraction"] == 0.1
    assert row["n_seeds"] == 4 and row["interval"] == "paired t"
    assert (row["delta_auroc"], row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx(
        (expected["delta_mean"], expected["ci_low"], expected["ci_high"])
    )
    assert row["site_n_seeds"] == 2 and row["site_delta_auroc"] == pytest.approx(0.025)
    assert contrast_rows(rows[:2]) == []
    assert contrasts_table([row]).splitlines()[2] == (
        "| 10% | `reinit_late_zero_late_one_rest - reinit_late` | 4 | "
        f"{row['delta_auroc']:+.3f} [{row['delta_ci_low']:+.3f}, {row['delta_ci_high']:+.3f}] | "
        "+0.025 [−0.039, +0.089] |"
    ).replace("-0", "−0")


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--name", "../elsewhere"], "--name '../elsewhere'"), (["--first-seed", "-1"], "--first-seed -1")],
)
def test_gamma_study_refuses_a_name_with_folders_and_a_negative_first_seed(argv, named, capsys):
    from benchmarks.gamma_study import main

    with pytest.raises(SystemExit):
        main(["--quick", *argv])
    assert named in capsys.readouterr().err


@pytest.mark.slow
def test_gamma_study_first_seed_starts_every_variant_at_a_fresh_seed(tmp_path):
    """A confirmatory run: seeds first_seed, first_seed + 1 for every variant, in its own named JSON."""
    from benchmarks.gamma_study import main

    main(
        [
            "--quick",
            "--seeds",
            "2",
            "--first-seed",
            "1000",
            "--variants",
            "zero_late",
            "--name",
            "gamma_study_confirm",
            "--out",
            str(tmp_path),
        ]
    )
    payload = json.loads((tmp_path / "gamma_study_confirm.json").read_text())
    assert payload["config"]["first_seed"] == 1000 and payload["contrasts"] == []
    for row in payload["rows"]:
        assert sorted(row["test_auroc_by_seed"]) == ["1000", "1001"], row["variant"]
    assert (tmp_path / "gamma_study_confirm.png").is_file() and not (tmp_path / "gamma_study.json").exists()


def test_gamma_study_backbones_set_model_name_and_key_the_rows(monkeypatch, tmp_path):
    """--backbones efficientnet_lite1 efficientnet_lite2: each cell's base recipe builds that backbone with its
    offline ImageNet weights; the rows (and the figure's panel rows) are keyed by backbone."""
    import types

    import pandas as pd

    import medtricks.ablation
    from benchmarks import gamma_study

    seen = []

    def fake_ablation(base, tricks, **kwargs):
        seen.append((base.model.name, base.model.weights, tricks))
        table = pd.DataFrame(
            [
                {"variant": "baseline", "n_seeds": 2, "mean": 0.9, "delta": 0.0},
                {
                    "variant": "+bn_gamma=zero_late",
                    "n_seeds": 2,
                    "mean": 0.91,
                    "delta": 0.01,
                    "delta_ci_low": -0.01,
                    "delta_ci_high": 0.03,
                    "verdict": "no evidence",
                },
            ]
        )
        children = pd.DataFrame(
            [{"variant": v, "seed": s, "value": 0.9 + 0.01 * i} for i, v in enumerate(table["variant"]) for s in (0, 1)]
        )
        return types.SimpleNamespace(
            table=table, children=children, failed=[], ablation_id=base.model.name, sequential=None
        )

    monkeypatch.setattr(medtricks.ablation, "run_ablation", fake_ablation)
    assert (
        gamma_study.main(
            [
                "--backbones",
                "efficientnet_lite1",
                "efficientnet_lite2",
                "--fractions",
                "0.1",
                "--variants",
                "zero_late",
                "--seeds",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert seen == [
        ("efficientnet_lite1", "imagenet", ["bn_gamma=zero_late"]),
        ("efficientnet_lite2", "imagenet", ["bn_gamma=zero_late"]),
    ]
    payload = json.loads((tmp_path / "gamma_study.json").read_text())
    assert [(r["backbone"], r["variant"]) for r in payload["rows"]] == [
        ("efficientnet_lite1", "none"),
        ("efficientnet_lite1", "zero_late"),
        ("efficientnet_lite2", "none"),
        ("efficientnet_lite2", "zero_late"),
    ]
    assert payload["config"]["backbones"] == ["efficientnet_lite1", "efficientnet_lite2"]
    assert payload["rows"][1]["test_auroc_by_seed"] == {"0": 0.91, "1": 0.91}  # every seed kept, keyed by seed
    assert (tmp_path / "gamma_study.png").is_file()
    seen.clear()  # without --backbones: Lite0 only, as before Lite1/Lite2 were added
    gamma_study.main(["--fractions", "0.1", "--variants", "zero_late", "--out", str(tmp_path / "default")])
    assert [name for name, *_ in seen] == ["efficientnet_lite0"]


def test_the_gamma_study_figure_labels_every_panel_and_leaves_cells_it_did_not_run_blank(tmp_path, monkeypatch):
    import matplotlib.figure

    from benchmarks.gamma_study import plot_rows

    def row(backbone, fraction, variant, delta):
        return {
            "dataset": "kermany",
            "backbone": backbone,
            "label_fraction": fraction,
            "variant": variant,
            "n_seeds": 5,
            "delta_auroc": delta,
            "delta_ci_low": delta - 0.01,
            "delta_ci_high": delta + 0.01,
        }

    rows = [
        row("lite0", f, v, d) for f in (0.1, 1.0) for v, d in (("none", 0.0), ("zero_late", 0.0), ("reinit_late", 0.02))
    ]
    rows += [row("lite1", 0.1, v, d) for v, d in (("none", 0.0), ("reinit_late", 0.02))]
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k))[1]
    )
    assert plot_rows(rows, tmp_path / "g.png").stat().st_size > 0
    axes = figures[0].axes
    labels = [[t.get_text() for t in ax.get_yticklabels()] for ax in axes if ax.axison]
    assert labels == [["zero_late", "reinit_late"]] * 2 + [["reinit_late"]]
    assert sum(not ax.axison for ax in axes) == 1  # lite1 at 100 %: not run
