"""Seeds until the answer is clear (issue 28): the group-sequential repeated-CI rule on synthetic paired
differences (no training), and its wiring into run_ablation with a stand-in trainer."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import medtricks.run
from medtricks.ablation import run_ablation
from medtricks.ablation.runner import ablation_settings
from medtricks.ablation.sequential import critical_values, look_schedule, repeated_ci, run_sequence, sequential_look
from medtricks.errors import ConfigError
from medtricks.recipe import load_recipe
from medtricks.tracking import create_store

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


# ------------------------------------------------------------------------------------- boundaries
def test_boundaries_match_published_constants():
    # Jennison & Turnbull (2000) Table 2.1 / 2.3: K = 5 equally spaced looks, alpha = 0.05 two-sided
    assert critical_values([5, 10, 15, 20, 25], kind="pocock", df=False)[0] == pytest.approx(2.413, abs=2e-3)
    obf = critical_values([5, 10, 15, 20, 25], kind="obrien_fleming", df=False)
    assert obf[-1] == pytest.approx(2.040, abs=2e-3)
    assert obf[0] == pytest.approx(2.040 * math.sqrt(5), abs=5e-3)
    assert critical_values([2, 4], kind="pocock", df=False)[0] == pytest.approx(2.178, abs=2e-3)
    # one look: the ordinary t interval
    assert critical_values([7], df=True)[0] == pytest.approx(2.4469, abs=1e-3)
    assert look_schedule(3, 12) == [3, 6, 9, 12] and look_schedule(4, 10, 3) == [4, 7, 10]
    assert look_schedule(3, 3) == [3]


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        look_schedule(1, 10)
    with pytest.raises(ConfigError, match="max_seeds"):
        look_schedule(5, 3)
    with pytest.raises(ConfigError, match="boundary"):
        critical_values([3, 6], kind="haybittle")
    with pytest.raises(ConfigError, match="until_ci"):
        sequential_look({"a": [0.1, 0.2, 0.3]}, [3, 6], width=0)
    with pytest.raises(ConfigError, match="scheduled looks"):
        repeated_ci([0.1, 0.2, 0.3, 0.4], [3, 6])


# ---------------------------------------------------------------------------------- the stopping rule
LOOKS = look_schedule(3, 15)  # 3, 6, 9, 12, 15


def test_stops_early_when_the_effect_is_large():
    rng = np.random.default_rng(0)
    stops = [run_sequence({"v": rng.normal(0.05, 0.01, 15)}, LOOKS, width=0.002).n_seeds for _ in range(200)]
    assert np.median(stops) <= 6  # excludes 0 after one or two rounds
    decision = run_sequence({"v": rng.normal(0.05, 0.01, 15)}, LOOKS, width=0.002)
    assert decision.stop and decision.rows["v"]["excludes_zero"] and decision.n_seeds < 15


def test_runs_to_max_seeds_when_the_effect_is_zero():
    rng = np.random.default_rng(1)
    stops = [run_sequence({"v": rng.normal(0.0, 0.01, 15)}, LOOKS, width=0.001).n_seeds for _ in range(200)]
    assert np.mean(np.asarray(stops) == 15) >= 0.9  # only a false "excludes 0" (< 5 %) stops it earlier
    decision = run_sequence({"v": np.random.default_rng(2).normal(0.0, 0.01, 15)}, LOOKS, width=0.001)
    assert decision.n_seeds == 15 and "max seeds" in decision.reason


def test_stops_when_the_interval_is_narrow_enough():
    rng = np.random.default_rng(3)
    decision = run_sequence({"v": rng.normal(0.0, 0.0005, 15), "w": rng.normal(0.0, 0.0005, 15)}, LOOKS, width=0.01)
    assert decision.n_seeds == 3 and all(r["narrow"] for r in decision.rows.values())


@pytest.mark.parametrize("kind", ["pocock", "obrien_fleming"])
@pytest.mark.parametrize("effect", [0.0, 0.004, 0.01])
def test_coverage_under_optional_stopping(kind, effect):
    """2000 simulated sequences: the interval reported where the rule stops covers the true Δ >= 94 %;
    a naive t-interval under the same stopping rule does not."""
    rng = np.random.default_rng(int(effect * 1e4) + (7 if kind == "pocock" else 11))
    n_sim, sd, width = 2000, 0.01, 0.006
    covered = naive_covered = 0
    for _ in range(n_sim):
        d = rng.normal(effect, sd, LOOKS[-1])
        decision = run_sequence({"v": d}, LOOKS, width=width, kind=kind)
        row = decision.rows["v"]
        covered += row["low"] <= effect <= row["high"]
    coverage = covered / n_sim
    assert coverage >= 0.94, coverage
    if kind == "pocock" and effect == 0.0:
        # The same rule with fixed-n t-intervals (what a naive loop would report) under-covers.
        from scipy import stats

        rng = np.random.default_rng(99)
        for _ in range(n_sim):
            d = rng.normal(0.0, sd, LOOKS[-1])
            for n in LOOKS:
                m, s = d[:n].mean(), d[:n].std(ddof=1) / math.sqrt(n)
                half = stats.t.ppf(0.975, n - 1) * s
                if half <= width or abs(m) > half or n == LOOKS[-1]:
                    naive_covered += abs(m) <= half
                    break
        assert naive_covered / n_sim < coverage


# ------------------------------------------------------------------------------------------ run_ablation
TINY = [
    "data.synth.n=60",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=0",
    "train.progress=false",
    "eval.plots=false",
    "tracking.log_model=false",
]


class PairedTrainer:
    """Stands in for run_recipe: val/auroc = seed noise (shared by every variant of a seed: common
    random numbers) + the variant's effect + a little per-run noise."""

    def __init__(self, effect):
        self.effect = effect
        self.calls = []

    def __call__(self, recipe, *, resume=None, tracker=None, parent_run_id=None, extra_tags=None, quiet=False):
        seed = recipe.experiment.seed
        self.calls.append((extra_tags["variant"], seed))
        tracker = create_store(recipe.tracking.backend, recipe.tracking.uri)
        run_dir = Path(recipe.experiment.output_dir) / recipe.experiment.name / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = tracker.start(
            experiment=recipe.tracking.experiment or recipe.experiment.name,
            run_name=recipe.tracking.run_name,
            parent_run_id=parent_run_id,
            tags={"run_dir": str(run_dir), **extra_tags},
        )
        shared = np.random.default_rng(seed).normal(0.8, 0.05)
        own = np.random.default_rng([seed, len(extra_tags["variant"])]).normal(0, 0.002)
        value = shared + own + (self.effect if recipe.schedule.warmup_epochs else 0.0)
        tracker.log_metrics({"best/val/auroc": float(value)}, step=1)
        tracker.end("FINISHED")
        return SimpleNamespace(run_id=run_id, run_dir=run_dir, metrics=None, test_metrics=None)


@pytest.fixture
def base(tmp_path):
    return load_recipe(
        RECIPES / "paper_baseline.yaml",
        overrides=[*TINY, f"experiment.output_dir={tmp_path / 'runs'}", "experiment.name=seq"],
    )


def test_until_ci_adds_rounds_and_resumes(mlflow_uri, base, monkeypatch):
    trainer = PairedTrainer(effect=0.0)
    monkeypatch.setattr(medtricks.run, "run_recipe", trainer)
    result = run_ablation(base, ["warmup"], seeds=3, until_ci=1e-6, max_seeds=9, quiet=True)
    # a zero effect never gets that narrow: every round runs, to max_seeds
    assert sorted({s for _, s in trainer.calls}) == list(range(9)) and len(trainer.calls) == 18
    assert result.seeds == list(range(9)) and result.sequential["n_seeds"] == 9
    row = result.table.set_index("variant").loc["+warmup"]
    assert row["n_seeds"] == 9 and row["delta_ci_low"] <= 0 <= row["delta_ci_high"]
    assert row["delta_ci_high"] - row["delta_ci_low"] > row["delta_fixed_ci_high"] - row["delta_fixed_ci_low"]
    assert "repeated" in result.markdown() and "pocock" in result.markdown()
    # resumable: the same command trains nothing and stops at the same look
    trainer.calls.clear()
    again = run_ablation(base, ["warmup"], seeds=3, until_ci=1e-6, max_seeds=9, quiet=True)
    assert trainer.calls == [] and again.seeds == result.seeds


def test_until_ci_stops_early_on_a_clear_effect(mlflow_uri, base, monkeypatch):
    trainer = PairedTrainer(effect=0.05)
    monkeypatch.setattr(medtricks.run, "run_recipe", trainer)
    result = run_ablation(base, ["warmup"], seeds=3, until_ci=0.01, max_seeds=12, quiet=True)
    assert result.seeds == [0, 1, 2] and len(trainer.calls) == 6
    row = result.table.set_index("variant").loc["+warmup"]
    assert row["delta_ci_low"] > 0 and row["verdict"] == "helps"
    assert result.sequential["stopped"] and result.sequential["look"] == 1


def test_until_ci_settings_and_errors(base):
    settings = ablation_settings(base, tricks="warmup", seeds=3, until_ci=0.01, max_seeds=12)
    assert settings["until_ci"] == 0.01 and settings["max_seeds"] == 12 and settings["boundary"] == "pocock"
    with pytest.raises(ConfigError, match="max_seeds"):
        run_ablation(base, ["warmup"], seeds=3, until_ci=0.01, quiet=True)
    with pytest.raises(ConfigError, match="count"):
        run_ablation(base, ["warmup"], seeds=[0, 1, 2], until_ci=0.01, max_seeds=6, quiet=True)
