"""`medtricks evaluate`: a trained run evaluated on card-described data, logged to MLflow; flip TTA is named, a
root is logged as a hash, evaluating on the run's own data warns, errors advise the options evaluate has."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from medtricks.cli import main
from medtricks.data import folder_id, synthesize_phantoms
from medtricks.errors import ConfigError
from medtricks.posthoc import FlipTTA, evaluate_trained, resolve_tta
from medtricks.recipe import load_recipe
from medtricks.run import load_trained, run_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_load_trained_reproduces_the_runs_predictions(trained_run):
    result, uri, tmp = trained_run
    by_folder = load_trained(str(result.run_dir))
    by_id = load_trained(result.run_id, tracking_uri=uri)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(by_folder.model(x), by_id.model(x))
    assert by_folder.classes == ["normal", "bacterial", "covid"]
    with pytest.raises(FileNotFoundError, match="neither"):
        load_trained("not-a-run")


def test_evaluate_val_split_matches_training_and_logs(trained_run):
    result, uri, tmp = trained_run
    report = evaluate_trained(
        str(result.run_dir),
        card="synthetic-phantoms",
        root=str(tmp / "phantoms"),
        split="val",
        n_bootstrap=10,
        tracking_uri=uri,
        progress=False,
    )
    assert report.n_images == result.metrics.values["n"]
    assert report.metrics.values["auroc"] == pytest.approx(result.metrics.values["auroc"])
    run = MlflowClient(uri).get_run(report.run_id)
    assert run.data.tags["mlflow.parentRunId"] == result.run_id
    assert run.data.metrics["eval/auroc"] == pytest.approx(report.metrics.values["auroc"])
    assert {a.path for a in MlflowClient(uri).list_artifacts(report.run_id, "plots")} >= {"plots/roc.png"}


def test_evaluate_cli_all_images_with_tta(trained_run, capsys):
    result, uri, tmp = trained_run
    code = main(
        [
            "evaluate",
            str(result.run_dir),
            "--card",
            "synthetic-phantoms",
            "--root",
            str(tmp / "phantoms"),
            "--tta",
            "flip",
            "--n-bootstrap",
            "10",
            "--no-log",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "48 images" in out and "flip TTA" in out and "95% CI" in out
    assert "warning: --tta flip averages every prediction with the mirrored X-ray" in out  # opt-in, explained


def test_flip_tta_averages_probabilities():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2)
    expected = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
    assert torch.allclose(torch.softmax(FlipTTA(model)(x), 1), expected, atol=1e-6)


def test_evaluate_rejects_a_card_with_other_classes(trained_run, tmp_path):
    result, uri, tmp = trained_run
    with pytest.raises(ValueError, match="classes"):
        evaluate_trained(str(result.run_dir), card="kermany-pneumonia", root=str(tmp_path), log=False)


# ------------------------------------------------------------------------------------------ audit
def test_audit_trained_logs_onto_the_audited_run(trained_run):
    from medtricks.posthoc import audit_trained

    result, uri, tmp = trained_run
    report = audit_trained(
        result.run_id,
        attacks="fgsm",
        eps="0,2/255",
        corruptions="gaussian_noise",
        n=12,
        tracking_uri=uri,
        progress=False,
        device="cpu",
    )
    assert report.run_id == result.run_id  # re-opened, not a new run
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    fgsm_keys = [k for k in metrics if k.startswith("audit/fgsm/")]
    assert fgsm_keys and any("accuracy" in k for k in fgsm_keys)
    assert any(k.startswith("audit/corrupt/") for k in metrics)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "audit")}
    assert "audit/report.json" in artifacts
    assert "accuracy" in report.table.lower()


def test_audit_cli_rejects_a_bad_eps_and_runs_without_logging(trained_run, capsys):
    result, uri, tmp = trained_run
    assert main(["audit", str(result.run_dir), "--eps", "0,two/255", "--no-log"]) == 2
    assert "two/255" in capsys.readouterr().err
    code = main(
        [
            "audit",
            str(result.run_dir),
            "--attacks",
            "fgsm",
            "--eps",
            "0,1/255",
            "--corruptions",
            "none",
            "--n",
            "8",
            "--target-class",
            "covid",
            "--no-log",
        ]
    )
    assert code == 0
    assert "fgsm_to_covid" in capsys.readouterr().out


def test_recipe_audit_section_lands_in_the_training_run(fresh_sqlite_uri, tmp_path):
    uri = fresh_sqlite_uri(tmp_path)
    recipe = load_recipe(
        ROOT / "recipes" / "audit.yaml",
        overrides=[
            "data.synth.n=32",
            "data.synth.size=32",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"data.root={tmp_path / 'phantoms'}",
            f"experiment.output_dir={tmp_path / 'runs'}",
            f"tracking.uri={uri}",
            "audit.attacks=[fgsm]",
            "audit.eps=[0.0,0.01]",
            "audit.corruptions=[contrast]",
            "audit.severities=[3]",
            "audit.n=8",
            "audit.n_bootstrap=10",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    assert any(k.startswith("audit/fgsm/") for k in metrics)
    assert any(k.startswith("audit/corrupt/contrast") for k in metrics)
    assert "val/loss" in metrics  # the training metrics are on the same run


def _evaluate(run, card, root, *extra):
    return main(
        [
            "evaluate",
            str(run.run_dir),
            "--card",
            str(card),
            "--root",
            str(root),
            "--no-log",
            "--n-bootstrap",
            "0",
            *extra,
        ]
    )


@pytest.mark.slow
def test_evaluate_takes_the_threshold_forms_predict_takes(one_line_error, untracked_binary_run, capsys):
    result, tmp, card = untracked_binary_run
    for spec in ("youden", "sens=0.9", "0.3"):
        assert _evaluate(result, card, tmp / "phantoms", "--threshold", spec) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert ("Youden" in out or "youden" in out) if spec == "youden" else True
    assert _evaluate(result, card, tmp / "phantoms", "--threshold", "sens=2") == 2
    assert "target sensitivity" in one_line_error(capsys, "evaluate")
    assert _evaluate(result, card, tmp / "phantoms", "--class-map", ",,,") == 2
    assert "maps no class" in one_line_error(capsys, "evaluate")


@pytest.mark.slow
def test_evaluate_on_a_corrupt_image_offers_its_own_option(untracked_binary_run, capsys):

    result, tmp, card = untracked_binary_run
    root = tmp / "corrupt"
    if not root.exists():
        shutil.copytree(tmp / "phantoms", root)
        victim = sorted((root / "images").glob("*.png"))[0]
        victim.write_bytes(victim.read_bytes()[:100])
    assert _evaluate(result, card, root) == 2
    err = capsys.readouterr().err
    assert "--on-bad-image skip" in err and "data.on_bad_image" not in err and "Traceback" not in err
    assert _evaluate(result, card, root, "--on-bad-image", "skip") == 0
    assert "skipped 1 unusable" in capsys.readouterr().out


def test_evaluate_logs_its_root_as_a_hash(one_step_run, tmp_path):

    root = Path(one_step_run.recipe.data.root)
    assert (
        main(
            [
                "evaluate",
                str(one_step_run.run_dir),
                "--card",
                one_step_run.recipe.data.card,
                "--root",
                str(root),
                "--n-bootstrap",
                "0",
            ]
        )
        == 0
    )
    runs = Path(one_step_run.recipe.experiment.output_dir)
    logged = [json.loads(p.read_text()) for p in runs.rglob("store/params.json")]
    (evaluation,) = [params for params in logged if "source_run" in params]  # the run store tiny_run uses
    assert evaluation["root"].startswith("r_") and evaluation["root"] == folder_id(root)
    assert str(root) not in " ".join(map(str, evaluation.values()))


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
def test_evaluate_on_redrawn_quickstart_phantoms_warns(tmp_path, capsys, finished_one_epoch_overrides):
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            *finished_one_epoch_overrides,
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
