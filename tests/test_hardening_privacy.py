"""Issue 15 (2, 18, 19): no patient ID reaches MLflow or the run folder through file names or error
messages; flip TTA is opt-in and explained; `evaluate` says when its data is the run's own."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from medtricks.cli import main
from medtricks.data import BadImageError, export_quarantine, redact_paths, synthesize_phantoms
from medtricks.data.manifest import image_id
from medtricks.errors import ConfigError
from medtricks.posthoc import evaluate_trained, resolve_tta
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
MARKERS = (b"ZZMRN123", b"ZZPHI")

CARD = """name: zz-toy
description: bright vs dark squares, file names that carry a medical record number
source: https://example.org
license: CC0
citation: none
task: binary
classes: [normal, pneumonia]
label_map: {NORMAL: normal, PNEUMONIA: pneumonia}
layout: {kind: folder}
patient: {regex: '^(?P<patient>ZZMRN\\d+)_'}
"""
TINY = [
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


def _phi_set(base: Path, corrupt: bool = True) -> Path:
    """``base/data/{NORMAL,PNEUMONIA}/ZZMRN123<k>_ZZPHI_<n>.png`` (patient ZZMRN123<k>) plus one corrupt file."""
    rng = np.random.default_rng(0)
    data = base / "data"
    for cls, level, patients in (("NORMAL", 60, range(0, 12)), ("PNEUMONIA", 170, range(20, 32))):
        (data / cls).mkdir(parents=True, exist_ok=True)
        for k in patients:
            for n in range(2):
                img = np.clip(rng.normal(level, 40, (32, 32)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(data / cls / f"ZZMRN123{k:02d}_ZZPHI_{n}.png")
    if corrupt:
        (data / "PNEUMONIA" / "ZZMRN12399_ZZPHI_0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (base / "zz-toy.yaml").write_text(CARD)
    return data


def _recipe(base: Path, uri: str, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            *TINY,
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


# ------------------------------------------------------------------------------------ item 2: unit
def test_redact_paths_and_export_quarantine_hash_every_data_path(tmp_path):
    data = _phi_set(tmp_path)
    bad = data / "PNEUMONIA" / "ZZMRN12399_ZZPHI_0.png"
    spaced = data / "NORMAL" / "ZZMRN12300 ZZPHI copy.png"
    spaced.write_bytes(b"x")
    text = (
        f"BadImageError: {bad}: 2 unusable image(s) in {data} (card 'zz-toy'); fix:\n  {bad}: truncated\n"
        f"  {spaced}: empty\nrelative PNEUMONIA/ZZMRN12399_ZZPHI_0.png, bare 'ZZMRN12300_ZZPHI_1.png', "
        f"deleted {data}/NORMAL/ZZMRN12377_ZZPHI_9.png. lr 0.5, file.py"
    )
    out = redact_paths(text, data)
    assert "ZZMRN123" not in out and "ZZPHI" not in out, out
    expected = f"<data root>/{image_id('PNEUMONIA/ZZMRN12399_ZZPHI_0.png')}"
    assert out.startswith(f"BadImageError: {expected}: 2 unusable") and out.count(expected) == 3
    assert f"in {data} (card 'zz-toy')" in out and "lr 0.5, file.py" in out  # the root itself and prose stay
    assert redact_paths(text, f"{data}/") == out  # the root as given, with a trailing slash

    quarantine = pd.DataFrame({"path": [str(bad)], "label": ["pneumonia"], "reason": [f"cannot decode {bad}"]})
    exported = export_quarantine(quarantine, data)
    assert list(exported.columns) == ["image_id", "label", "reason"]
    assert exported["image_id"].tolist() == [image_id("PNEUMONIA/ZZMRN12399_ZZPHI_0.png")]
    assert "ZZMRN" not in exported.to_csv() and expected in exported["reason"][0]


# ------------------------------------------------------------------------- item 2: runs and MLflow
def test_skipped_images_and_evaluation_log_no_patient_id(tmp_path, mlflow_uri, capsys):
    data = _phi_set(tmp_path)
    result = run_recipe(_recipe(tmp_path, mlflow_uri, "data.on_bad_image=skip"))
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


def test_bad_image_error_fails_before_anything_is_logged(tmp_path, mlflow_uri):
    _phi_set(tmp_path)
    with pytest.raises(BadImageError, match="ZZMRN12399_ZZPHI_0.png"):  # the user sees the file
        run_recipe(_recipe(tmp_path, mlflow_uri, "data.on_bad_image=error"), quiet=True)
    assert not (tmp_path / "runs").exists()  # the up-front preparation failed: no run folder, no tracked run
    assert not _leaks(tmp_path)
    assert "ZZMRN" not in _logged_strings(mlflow_uri)


def test_an_error_during_the_run_is_logged_with_hashed_paths(tmp_path, mlflow_uri, monkeypatch):
    import medtricks.run

    data = _phi_set(tmp_path, corrupt=False)
    gone = data / "NORMAL" / "ZZMRN12301_ZZPHI_1.png"

    def fit_reading_a_vanished_file(*args, **kwargs):
        raise BadImageError(gone, f"file not found (was {gone.relative_to(data)} moved?)")

    monkeypatch.setattr(medtricks.run, "fit", fit_reading_a_vanished_file)
    with pytest.raises(BadImageError):
        run_recipe(_recipe(tmp_path, mlflow_uri), quiet=True)
    run_dir = next((tmp_path / "runs").glob("*/*"))
    state = json.loads((run_dir / "state.json").read_text())
    hashed = f"<data root>/{image_id('NORMAL/ZZMRN12301_ZZPHI_1.png')}"
    assert state["status"] == "failed" and state["error"] == (
        f"BadImageError: {hashed}: file not found (was {hashed} moved?)"
    )
    run = MlflowClient(mlflow_uri).get_run(state["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["medtricks.error"] == state["error"]
    assert not _leaks(tmp_path)


# ------------------------------------------------------------------------------ item 18: flip TTA
def test_flip_tta_must_be_named(capsys):
    assert resolve_tta(None) == resolve_tta(False) == resolve_tta("none") == "none"
    assert resolve_tta("flip") == resolve_tta(" FLIP ") == "flip"
    for value in (True, "", "yes"):
        with pytest.raises(ConfigError, match="heart"):
            resolve_tta(value)
    # a bare --tta fails at once, before the run is even looked up
    assert main(["evaluate", "no-such-run", "--card", "synthetic-phantoms", "--root", "x", "--tta"]) == 2
    err = capsys.readouterr().err
    assert "a bare --tta" in err and "mirrors the chest" in err and "--tta flip" in err
    assert main(["ensemble", "a", "b", "--card", "synthetic-phantoms", "--root", "x", "--tta"]) == 2
    assert "a bare --tta" in capsys.readouterr().err


# ---------------------------------------------------------------- item 19: evaluating on training data
def test_evaluate_on_redrawn_quickstart_phantoms_warns(tmp_path, capsys):
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=48",
            "data.synth.size=32",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            "data.test_fraction=0.2",
            "tracking.backend=none",
            f"data.root={tmp_path / 'phantoms'}",
            f"experiment.output_dir={tmp_path / 'runs'}",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    # `medtricks data synth` with the run's settings draws the very same phantoms
    synthesize_phantoms(tmp_path / "redrawn", n=48, size=32)
    report = evaluate_trained(
        str(result.run_dir),
        card="synthetic-phantoms",
        root=str(tmp_path / "redrawn"),
        n_bootstrap=10,
        log=False,
        progress=False,
    )
    out = capsys.readouterr().out
    manifest = pd.read_csv(result.run_dir / "artifacts" / "split_manifest.csv")
    counts = manifest.groupby("split").agg(images=("split", "size"), patients=("patient", "nunique"))
    assert report.overlap.images == counts["images"].to_dict()
    assert report.overlap.patients == counts["patients"].to_dict()
    assert f"warning: {counts.loc['train', 'images']} of 48 evaluated images (identical bytes)" in out
    assert "another --seed" in out and "val split" in out
    table = report.table()
    assert "WARNING: " in table and "run's own held-out test data" in table

    # another seed: other patients, other bytes, no warning
    synthesize_phantoms(tmp_path / "fresh", n=48, size=32, seed=5)
    fresh = evaluate_trained(
        str(result.run_dir),
        card="synthetic-phantoms",
        root=str(tmp_path / "fresh"),
        n_bootstrap=10,
        log=False,
        progress=False,
    )
    assert fresh.overlap.splits() == [] and not fresh.warnings and "warning" not in capsys.readouterr().out
