"""run_ablation: one parent, one child per (variant, seed), a table equal to the children's metrics,
resume, failures. The fast tests stand in a deterministic trainer for run_recipe (orchestration
only); the slow test trains real tiny models."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import medtricks.run
from medtricks.ablation import run_ablation
from medtricks.evaluate.metrics import compute_metrics
from medtricks.recipe import load_recipe
from medtricks.rundir import RunDir
from medtricks.tracking import create_store

TINY = [
    "data.synth.n=60",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=50",
    "train.progress=false",
    "eval.plots=false",
    "tracking.log_model=false",
]
CLASSES = ["normal", "bacterial", "covid"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def base(tmp_path):
    return load_recipe(
        RECIPES / "paper_baseline.yaml",
        overrides=[*TINY, f"experiment.output_dir={tmp_path / 'runs'}", "experiment.name=abl"],
    )


class FakeTrainer:
    """Stands in for run_recipe: logs a child run like run.py does, with a metric that depends on the
    recipe (warmup helps) and the seed, and saves per-image predictions."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, recipe, *, resume=None, tracker=None, parent_run_id=None, extra_tags=None, quiet=False):
        seed = recipe.experiment.seed
        self.calls.append((extra_tags["variant"], seed, resume))
        tracker = create_store(recipe.tracking.backend, recipe.tracking.uri)
        run_dir = Path(recipe.experiment.output_dir) / recipe.experiment.name / "run"
        (run_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        run_id = tracker.start(
            experiment=recipe.tracking.experiment or recipe.experiment.name,
            run_name=recipe.tracking.run_name,
            parent_run_id=parent_run_id,
            tags={"run_dir": str(run_dir), **extra_tags},
        )
        if self.fail_on == (extra_tags["variant"], seed):
            tracker.end("FAILED")
            raise RuntimeError("simulated out of memory")
        y = np.random.default_rng(0).integers(0, 3, 90)
        logits = np.random.default_rng(100 + seed).normal(size=(90, 3))
        logits[np.arange(90), y] += 0.8 + 1.5 * recipe.schedule.warmup_epochs
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        metrics = compute_metrics(y, probs, CLASSES, n_bootstrap=recipe.eval.n_bootstrap, seed=seed)
        tracker.log_metrics({f"best/val/{k}": float(v) for k, v in metrics.to_dict().items()}, step=1)
        np.savez(run_dir / "artifacts" / "predictions_val.npz", y_true=y, probs=probs)
        tracker.end("FINISHED")
        return SimpleNamespace(run_id=run_id, run_dir=run_dir, metrics=metrics, test_metrics=None)


def _children(uri, experiment="abl"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("medtricks.role") == "ablation_parent"]
    kids = [r for r in runs if r.data.tags.get("medtricks.role") == "ablation_child"]
    return parents, kids


def test_ablation_parent_children_table_and_resume(mlflow_uri, base, monkeypatch, capsys):
    fake = FakeTrainer()
    monkeypatch.setattr(medtricks.run, "run_recipe", fake)
    result = run_ablation(base, ["warmup"], seeds=2, metric="val/auroc")
    parents, kids = _children(mlflow_uri)
    assert len(parents) == 1 and len(kids) == 4 and len(fake.calls) == 4
    parent = parents[0]
    assert result.parent_run_id == parent.info.run_id and parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parent.info.run_id}
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in kids) == [
        ("+warmup", "0"),
        ("+warmup", "1"),
        ("baseline", "0"),
        ("baseline", "1"),
    ]
    assert {r.data.tags["medtricks.ablation_id"] for r in kids} == {result.ablation_id}
    # every child resumes its own folder only; the seed is the only thing that differs within a variant
    assert all(resume == "auto" for _, _, resume in fake.calls)

    # the table's numbers are the children's logged metrics
    logged = {(r.data.tags["variant"], int(r.data.tags["seed"])): r.data.metrics["best/val/auroc"] for r in kids}
    table = result.table.set_index("variant")
    for variant in ("baseline", "+warmup"):
        assert table.loc[variant, "mean"] == pytest.approx(np.mean([logged[(variant, s)] for s in (0, 1)]))
        assert table.loc[variant, "n_seeds"] == 2
    assert table.loc["+warmup", "delta"] == pytest.approx(
        np.mean([logged[("+warmup", s)] - logged[("baseline", s)] for s in (0, 1)])
    )
    child_rows = result.children.set_index(["variant", "seed"])
    for (variant, seed), value in logged.items():
        assert child_rows.loc[(variant, seed), "value"] == pytest.approx(value)
    assert math.isfinite(table.loc["+warmup", "boot_delta"]) and table.loc["+warmup", "boot_delta"] > 0
    assert (
        table.loc["+warmup", "boot_ci_low"]
        <= table.loc["+warmup", "boot_delta"]
        <= table.loc["+warmup", "boot_ci_high"]
    )

    # printed and logged: markdown, CSV, forest plot
    printed = capsys.readouterr().out
    assert "| + warmup " in printed and "val/auroc mean [95% CI]" in printed
    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent.info.run_id, "ablation")}
    assert artifacts == {
        "ablation/ablation_table.md",
        "ablation/ablation_table.csv",
        "ablation/children.csv",
        "ablation/forest.png",
    }
    assert "+warmup" in result.to_csv() and result.markdown().count("| + warmup ") == 1
    assert parent.data.metrics["ablation/v01_warmup/mean"] == pytest.approx(table.loc["+warmup", "mean"])

    # re-running the same ablation trains nothing and reuses the parent
    fake.calls.clear()
    again = run_ablation(base, ["warmup"], seeds=2, quiet=True)
    assert fake.calls == [] and again.parent_run_id == result.parent_run_id
    assert again.table["mean"].tolist() == pytest.approx(result.table["mean"].tolist())
    assert len(_children(mlflow_uri)[1]) == 4
    # one more seed trains only that seed's two children
    more = run_ablation(base, ["warmup"], seeds=3, quiet=True)
    assert sorted((v, s) for v, s, _ in fake.calls) == [("+warmup", 2), ("baseline", 2)]
    assert more.table["n_seeds"].tolist() == [3, 3]
    # cumulative rows are labelled by the trick they add; the CSV keeps the full variant names
    cumulative = run_ablation(base, ["warmup", "cosine"], seeds=1, quiet=True)
    assert "| + cosine " in cumulative.markdown() and "+warmup +cosine" in cumulative.to_csv()


def test_failed_child_is_reported_and_retried(mlflow_uri, base, monkeypatch):
    monkeypatch.setattr(medtricks.run, "run_recipe", FakeTrainer(fail_on=("+warmup", 1)))
    result = run_ablation(base, ["warmup"], seeds=2, quiet=True)
    assert result.failed == [{"variant": "+warmup", "seed": 1, "error": "RuntimeError: simulated out of memory"}]
    assert result.table.set_index("variant").loc["+warmup", "n_seeds"] == 1
    assert any("FAILED: +warmup seed 1" in n for n in result.notes)
    assert "FAILED: +warmup seed 1" in result.markdown()
    parents, _ = _children(mlflow_uri)
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["ablation.status"] == "incomplete"
    retry = FakeTrainer()
    monkeypatch.setattr(medtricks.run, "run_recipe", retry)
    fixed = run_ablation(base, ["warmup"], seeds=2, quiet=True)
    assert [(v, s) for v, s, _ in retry.calls] == [("+warmup", 1)]
    assert fixed.failed == [] and fixed.table["n_seeds"].tolist() == [2, 2]
    assert _children(mlflow_uri)[0][0].data.tags["ablation.status"] == "complete"


def test_interrupt_closes_the_parent_as_killed(mlflow_uri, base, monkeypatch):
    def interrupted(recipe, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medtricks.run, "run_recipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(base, ["warmup"], seeds=1, quiet=True)
    parents, kids = _children(mlflow_uri)
    assert parents[0].info.status == "KILLED" and parents[0].data.tags["ablation.status"] == "interrupted"


def test_no_tracking_backend_still_builds_the_table(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(medtricks.run, "run_recipe", FakeTrainer())
    recipe = base.model_copy(deep=True)
    recipe.tracking.backend = "none"
    result = run_ablation(recipe, ["warmup"], seeds=2, quiet=True)
    assert result.parent_run_id is not None and len(result.children) == 4  # the local run store's parent
    assert RunDir(result.output_dir).store_meta.is_file()  # its resume: tests/tracking/test_run_store.py
    assert (result.output_dir / "ablation_table.md").is_file() and (result.output_dir / "forest.png").is_file()
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_arguments_fail_before_training(base, monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr(medtricks.run, "run_recipe", fake)
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        run_ablation(base, ["warmup"], seeds=0)
    with pytest.raises(ValueError, match="val/<name>"):
        run_ablation(base, ["warmup"], metric="auroc/val")
    with pytest.raises(ValueError, match="jobs"):
        run_ablation(base, ["warmup"], jobs=0)
    with pytest.raises(ValueError, match="unknown trick"):
        run_ablation(base, ["wramup"])
    assert fake.calls == []


@pytest.mark.slow
def test_real_two_by_two_ablation(mlflow_uri, base):
    """2 variants x 2 seeds of real tiny training on synthetic phantoms (two worker processes),
    then a resume that adds a third seed."""
    root = Path(mlflow_uri[len("sqlite:///") :]).parent
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        overrides=[
            *TINY,
            "train.epochs=2",
            "experiment.name=abl",
            f"experiment.output_dir={root / 'runs'}",
            f"data.root={root / 'phantoms'}",
            "tricks.bn_gamma.strategy=none",
        ],
    )
    result = run_ablation(recipe, ["mixup=0.2"], seeds=2, jobs=2, quiet=True)
    parents, kids = _children(mlflow_uri)
    assert len(parents) == 1 and len(kids) == 4 and not result.failed
    assert all(r.info.status == "FINISHED" for r in kids)
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parents[0].info.run_id}
    assert {r.data.params["experiment.seed"] for r in kids} == {"0", "1"}
    assert {r.data.params["data.split_seed"] for r in kids} == {str(recipe.data.split_seed)}
    logged = {(r.data.tags["variant"], int(r.data.tags["seed"])): r.data.metrics["best/val/auroc"] for r in kids}
    table = result.table.set_index("variant")
    for variant in ("baseline", "+mixup=0.2"):
        assert table.loc[variant, "mean"] == pytest.approx(np.mean([logged[(variant, s)] for s in (0, 1)]))
    assert table.loc["+mixup=0.2", "delta"] == pytest.approx(
        np.mean([logged[("+mixup=0.2", s)] - logged[("baseline", s)] for s in (0, 1)])
    )
    saved = all((Path(d) / "artifacts" / "predictions_val.npz").is_file() for d in result.children["run_dir"])
    if saved:  # run.py keeps per-image predictions: the image bootstrap is in the table
        assert math.isfinite(table.loc["+mixup=0.2", "boot_delta"])
    else:
        assert any("no saved val predictions for 4 child run(s)" in n for n in result.notes)
    more = run_ablation(recipe, ["mixup=0.2"], seeds=3, quiet=True)
    assert len(more.skipped) == 4 and len(_children(mlflow_uri)[1]) == 6
    assert more.table["n_seeds"].tolist() == [3, 3] and more.parent_run_id == result.parent_run_id


def test_resplit_draws_each_seeds_own_split_and_is_another_ablation(tmp_path, base, monkeypatch):
    """ablation.resplit (repeated hold-out, issue 35): seed s trains and tests every variant on split s."""
    from medtricks.ablation.runner import ablation_id, ablation_settings, child_recipe

    monkeypatch.chdir(tmp_path)
    seen = []

    class Recording(FakeTrainer):
        def __call__(self, recipe, **kwargs):
            seen.append((kwargs["extra_tags"]["variant"], recipe.experiment.seed, recipe.data.split_seed))
            return super().__call__(recipe, **kwargs)

    monkeypatch.setattr(medtricks.run, "run_recipe", Recording())
    recipe = base.model_copy(deep=True)
    recipe.tracking.backend = "none"
    fixed_id = ablation_id(recipe, ["warmup"], "cumulative")
    recipe.ablation.resplit = True
    assert ablation_settings(recipe, tricks="warmup")["tricks"] == ["warmup"]  # the key passes the settings check
    assert ablation_id(recipe, ["warmup"], "cumulative") != fixed_id  # never mixed with fixed-split children
    assert child_recipe(recipe, [], seed=7, variant="baseline", variant_index=0, ablation="x").data.split_seed == 7
    result = run_ablation(recipe, ["warmup"], seeds=2, quiet=True)
    assert sorted(seen) == [("+warmup", 0, 0), ("+warmup", 1, 1), ("baseline", 0, 0), ("baseline", 1, 1)]
    assert any("ablation.resplit" in note for note in result.notes)
