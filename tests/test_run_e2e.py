"""End-to-end tiny runs: null tracker, a temporary sqlite MLflow store, and resume."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medtricks.recipe import load_recipe
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.tracking import NullStore

from conftest import fit_killed_after_epoch, fresh_sqlite_uri

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.synth.n=48",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=20",
    "train.progress=false",
    "train.log_every=1",
    "schedule.warmup_epochs=0.5",
    "optim.lr=0.8",
]


def _tiny(tmp_path, *extra):
    overrides = [*TINY, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}", *extra]
    return load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=overrides)


def test_tiny_run_with_null_tracker(tmp_path):
    tracker = NullStore()
    result = run_recipe(_tiny(tmp_path), tracker=tracker, quiet=True)
    assert 0.0 <= result.metrics.values["auroc"] <= 1.0
    assert set(result.metrics.ci) >= {"accuracy", "auroc"}
    assert len(result.history) == 2 and result.best_epoch in (1, 2)
    assert len(result.gamma_report) > 0  # zero_late touched resnet18's layer4
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()
    assert (result.run_dir / "model" / "MODEL_CARD.md").is_file()
    assert tracker.params["optim.lr"] == pytest.approx(0.8)
    assert "val/auroc" in tracker.metrics and "train/loss" in tracker.metrics
    assert "plots/val_roc.png" in tracker.artifacts
    assert tracker.status == "FINISHED"


def test_tiny_run_logs_to_mlflow(tmp_path):
    uri = fresh_sqlite_uri(tmp_path)
    result = run_recipe(_tiny(tmp_path, f"tracking.uri={uri}"), quiet=True)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["optim.name"] == "nesterov" and params["tricks.bn_gamma.strategy"] == "zero_late"
    assert params["model.name"] == "resnet18" and "bn_gamma" in params
    for key in (
        "val/loss",
        "val/accuracy",
        "val/balanced_accuracy",
        "val/auroc",
        "val/ece",
        "val/sensitivity/covid",
        "val/specificity/normal",
        "train/img_per_s",
        "lr",
        "train/loss",
        "best/val/auroc",
        "best/val/auroc_ci_low",
        "best/val/auroc_ci_high",
    ):
        assert key in metrics, key
    assert "bn_gamma=zero_late" in tags["tricks"] and tags["medtricks.version"] == "0.1.0"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"recipe.yaml", "plots", "data", "model", "tricks", "predictions"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {
        "plots/lr_schedule.png",
        "plots/val_confusion_matrix.png",
        "plots/val_roc.png",
        "plots/val_reliability.png",
    } <= plots
    manifest = Path(client.download_artifacts(result.run_id, "data/split_manifest.csv", str(tmp_path)))
    text = manifest.read_text()
    assert "patient" in text and "PHANTOM" not in text


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_resume_auto_continues_unfinished_run(tmp_path, monkeypatch, balance):
    import medtricks.run

    full = run_recipe(
        _tiny(tmp_path, "train.epochs=3", f"tricks.class_balance={balance}"), tracker=NullStore(), quiet=True
    )

    recipe = _tiny(
        tmp_path, "train.epochs=3", f"experiment.output_dir={tmp_path / 'runs2'}", f"tricks.class_balance={balance}"
    )
    real_fit = medtricks.run.fit

    monkeypatch.setattr(medtricks.run, "fit", fit_killed_after_epoch(real_fit, 2))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tracker=NullStore(), quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    unfinished = find_resumable_run_dir(recipe)
    assert unfinished is not None
    resumed = run_recipe(recipe, resume="auto", tracker=NullStore(), quiet=True)
    assert resumed.run_dir == unfinished
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)
    assert resumed.metrics.values == pytest.approx(full.metrics.values, nan_ok=True)
    assert find_resumable_run_dir(recipe) is None  # finished now


def test_tiny_run_with_cbam_resizer_logs_its_figure(tmp_path):
    tracker = NullStore()
    result = run_recipe(
        _tiny(
            tmp_path,
            "model.resizer.enabled=true",
            "model.resizer.input_size=48",
            "model.resizer.output_size=32",
            "model.resizer.attention=cbam",
            "model.resizer.lr_mult=0.5",
            "train.epochs=1",
        ),
        tracker=tracker,
        quiet=True,
    )
    assert "plots/resizer.png" in tracker.artifacts
    assert not any(row["name"].startswith("resizer") for row in result.gamma_report.rows)
    assert tracker.params["resolved.image_size"] == 48
