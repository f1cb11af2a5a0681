"""End-to-end tiny runs: null tracker, a temporary sqlite MLflow store, and resume; no patient ID reaches MLflow or
the run folder through file names or error messages (issue 15)."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from medtricks.data import BadImageError
from medtricks.data.manifest import image_id
from medtricks.posthoc import evaluate_trained
from medtricks.recipe import load_recipe
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.tracking import NullStore

ROOT = Path(__file__).resolve().parents[2]

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


def test_tiny_run_logs_to_mlflow(fresh_sqlite_uri, tmp_path):
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
def test_resume_auto_continues_unfinished_run(fit_killed_after_epoch, tmp_path, monkeypatch, balance):
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


MARKERS = (b"ZZMRN123", b"ZZPHI")


PHI_TINY = [
    "data.synth=null",
    "data.image_size=32",
    "data.val_fraction=0.25",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.n_bootstrap=10",
    "train.progress=false",
    "schedule.warmup_epochs=0",
    "tricks.bn_gamma.strategy=none",
]


def _phi_recipe(base: Path, uri: str, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            *PHI_TINY,
            f"data.card={base / 'zz-toy.yaml'}",
            f"data.root={base / 'data'}",
            f"experiment.output_dir={base / 'runs'}",
            f"tracking.uri={uri}",
            *extra,
        ],
    )


def _leaks(base: Path) -> list[str]:
    """Every file under ``base`` except the data itself (and its card) holding a marker: the MLflow
    database, the MLflow artifact folder, run folders (state.json, store/, artifacts/, model/...)."""
    found = []
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.name == "zz-toy.yaml" or "data" in path.relative_to(base).parts[:1]:
            continue
        content = path.read_bytes()
        found += [f"{path.relative_to(base)}: {m.decode()}" for m in MARKERS if m in content]
    return found


def _logged_strings(uri: str) -> str:
    """Params, tags and experiment names of every run in the store, as one text."""
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return json.dumps([[r.data.params, r.data.tags] for r in runs])


# ------------------------------------------------------------------------- item 2: runs and MLflow
def test_skipped_images_and_evaluation_log_no_patient_id(phi_set, tmp_path, mlflow_uri, capsys):
    data = phi_set(tmp_path)
    result = run_recipe(_phi_recipe(tmp_path, mlflow_uri, "data.on_bad_image=skip"))
    out = capsys.readouterr().out
    assert "ZZMRN12399_ZZPHI_0.png" in out  # the local console keeps the real path
    run = result.run_dir
    quarantine = pd.read_csv(run / "artifacts" / "quarantine.csv")
    assert quarantine["image_id"].tolist() == [image_id("PNEUMONIA/ZZMRN12399_ZZPHI_0.png")]
    client = MlflowClient(mlflow_uri)
    logged = {a.path for a in client.list_artifacts(result.run_id, "data")}
    assert {"data/quarantine.csv", "data/split_manifest.csv"} <= logged
    manifest = pd.read_csv(run / "artifacts" / "split_manifest.csv")
    assert manifest["content_id"].str.fullmatch(r"c_[0-9a-f]{16}").all()  # bytes, salted: for evaluate's check

    # an identical-bytes copy of the data as "external" test set: evaluated with flip TTA and logged
    external = tmp_path / "external"
    shutil.copytree(data, external / "data")
    (external / "data" / "PNEUMONIA" / "ZZMRN12399_ZZPHI_0.png").unlink()
    report = evaluate_trained(
        str(run),
        card=str(tmp_path / "zz-toy.yaml"),
        root=str(external / "data"),
        tta="flip",
        n_bootstrap=10,
        tracking_uri=mlflow_uri,
        progress=False,
    )
    out = capsys.readouterr().out
    assert "warning: --tta flip" in out and "warning: " in out and "in the run's train split" in out
    n_train = int((manifest["split"] == "train").sum())
    assert report.overlap.images["train"] == n_train and report.overlap.n_images == 48
    tags = client.get_run(report.run_id).data.tags
    assert tags["medtricks.overlap"].startswith(f"train: {n_train} images")

    assert not _leaks(tmp_path), _leaks(tmp_path)
    assert not any(m.decode() in _logged_strings(mlflow_uri) for m in MARKERS)


def test_bad_image_error_fails_before_anything_is_logged(phi_set, tmp_path, mlflow_uri):
    phi_set(tmp_path)
    with pytest.raises(BadImageError, match="ZZMRN12399_ZZPHI_0.png"):  # the user sees the file
        run_recipe(_phi_recipe(tmp_path, mlflow_uri, "data.on_bad_image=error"), quiet=True)
    assert not (tmp_path / "runs").exists()  # the up-front preparation failed: no run folder, no tracked run
    assert not _leaks(tmp_path)
    assert "ZZMRN" not in _logged_strings(mlflow_uri)


def test_an_error_during_the_run_is_logged_with_hashed_paths(phi_set, tmp_path, mlflow_uri, monkeypatch):
    import medtricks.run

    data = phi_set(tmp_path, corrupt=False)
    gone = data / "NORMAL" / "ZZMRN12301_ZZPHI_1.png"

    def fit_reading_a_vanished_file(*args, **kwargs):
        raise BadImageError(gone, f"file not found (was {gone.relative_to(data)} moved?)")

    monkeypatch.setattr(medtricks.run, "fit", fit_reading_a_vanished_file)
    with pytest.raises(BadImageError):
        run_recipe(_phi_recipe(tmp_path, mlflow_uri), quiet=True)
    run_dir = next((tmp_path / "runs").glob("*/*"))
    state = json.loads((run_dir / "state.json").read_text())
    hashed = f"<data root>/{image_id('NORMAL/ZZMRN12301_ZZPHI_1.png')}"
    assert state["status"] == "failed" and state["error"] == (
        f"BadImageError: {hashed}: file not found (was {hashed} moved?)"
    )
    run = MlflowClient(mlflow_uri).get_run(state["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["medtricks.error"] == state["error"]
    assert not _leaks(tmp_path)
