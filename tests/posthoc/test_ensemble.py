"""`medtricks ensemble`: the mean of several trained runs' probabilities on the same images; one run twice or a copy
is refused, members evaluated on their training data are warned about."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from medtricks.ablation import compare_runs
from medtricks.cli import main
from medtricks.errors import ConfigError
from medtricks.evaluate.operating_point import OPERATING_POINT_FILE, OperatingPoint, select_threshold
from medtricks.posthoc import evaluate_trained
from medtricks.posthoc.ensemble import ensemble_runs
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["normal", "pneumonia"]


@pytest.fixture(scope="module")
def two_runs(binary_phantom_card, fresh_sqlite_uri, tmp_path_factory):
    """Two tiny binary runs on the same phantoms and split, with different image sizes (32 and 40 px)."""
    from medtricks.data import synthesize_phantoms

    tmp = tmp_path_factory.mktemp("ensemble")
    uri = fresh_sqlite_uri(tmp)
    synthesize_phantoms(tmp / "data", n=64, classes=CLASSES, size=40, seed=0)
    card = binary_phantom_card(tmp, "binary-phantoms", CLASSES)
    runs = []
    for i, size in enumerate((32, 40)):
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            overrides=[
                f"data.card={card}",
                "data.synth=null",
                f"data.root={tmp / 'data'}",
                f"data.image_size={size}",
                "data.val_fraction=0.3",
                "model.name=resnet18",
                "model.weights=none",
                "train.epochs=1",
                "train.batch_size=16",
                "eval.n_bootstrap=10",
                "train.progress=false",
                "schedule.warmup_epochs=0",
                f"experiment.seed={i}",
                f"experiment.name=member{i}",
                f"experiment.output_dir={tmp / 'runs'}",
                f"tracking.uri={uri}",
                "tracking.experiment=ensemble-test",
            ],
        )
        result = run_recipe(recipe, quiet=True)
        op_path = result.run_dir / "model" / OPERATING_POINT_FILE
        if not op_path.is_file():  # a run.py that does not store operating points yet: store one as it would
            with np.load(result.run_dir / "artifacts" / "predictions_val.npz") as val:
                select_threshold(val["y_true"], val["probs"], train_priors=[0.5, 0.5]).to_json(op_path)
        runs.append(result)
    return runs, uri, tmp, card


def _copy_run(result, dest: Path, **data_updates) -> Path:
    """A copy of a run folder (no MLflow id) with recipe ``data`` keys changed."""
    shutil.copytree(result.run_dir, dest)
    (dest / "state.json").unlink()
    recipe = yaml.safe_load((dest / "recipe.yaml").read_text())
    recipe["data"].update(data_updates)
    (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dest


def test_ensemble_probs_are_the_mean_of_the_members(two_runs):
    runs, uri, tmp, card = two_runs
    dirs = [str(r.run_dir) for r in runs]
    report = ensemble_runs(dirs, card=str(card), root=str(tmp / "data"), n_bootstrap=10, log=False, progress=False)
    members = [
        evaluate_trained(d, card=str(card), root=str(tmp / "data"), n_bootstrap=0, log=False, progress=False)
        for d in dirs
    ]
    assert report.n_images == 64 and report.member_names[0].startswith("member0")
    assert np.allclose(report.probs, (members[0].probs + members[1].probs) / 2, atol=1e-6)
    for got, expected in zip(report.members, members):
        assert np.allclose(got.probs, expected.probs, atol=1e-6)
        assert got.rule.threshold == pytest.approx(expected.rule.threshold)  # each member at its own point

    # both members saved validation predictions of the same images: the threshold is chosen there
    vals = [np.load(r.run_dir / "artifacts" / "predictions_val.npz") for r in runs]
    expected = select_threshold(vals[0]["y_true"], (vals[0]["probs"] + vals[1]["probs"]) / 2)
    assert report.ensemble.rule.source == "ensemble-val"
    assert report.ensemble.rule.threshold == pytest.approx(expected.threshold, abs=1e-6)
    text = report.table()
    assert "ensemble (mean of 2)" in text and "Δ AUROC ensemble − member" in text and "validation" in text


def test_ensemble_threshold_falls_back_to_the_members_mean(two_runs, tmp_path):
    runs, uri, tmp, card = two_runs
    copy = _copy_run(runs[1], tmp_path / "no-val")
    (copy / "artifacts" / "predictions_val.npz").unlink()
    report = ensemble_runs(
        [str(runs[0].run_dir), str(copy)],
        card=str(card),
        root=str(tmp / "data"),
        n_bootstrap=0,
        log=False,
        progress=False,
    )
    thresholds = [
        OperatingPoint.from_json(Path(d) / "model" / OPERATING_POINT_FILE).threshold for d in (runs[0].run_dir, copy)
    ]
    assert report.ensemble.rule.source == "members-mean"
    assert report.ensemble.rule.threshold == pytest.approx(np.mean(thresholds))
    assert "saved no artifacts/predictions_val.npz" in report.threshold_note


def test_ensemble_refuses_other_classes_and_other_images(binary_phantom_card, two_runs, tmp_path):
    runs, uri, tmp, card = two_runs
    swapped = _copy_run(
        runs[1], tmp_path / "swapped", card=str(binary_phantom_card(tmp_path, "swapped", CLASSES[::-1]))
    )
    with pytest.raises(ValueError, match=r"predicts classes \['pneumonia', 'normal'\].*same classes in the same order"):
        ensemble_runs(
            [str(runs[0].run_dir), str(swapped)], card=str(card), root=str(tmp / "data"), log=False, progress=False
        )
    resplit = _copy_run(runs[1], tmp_path / "resplit", split_seed=7)
    with pytest.raises(ValueError, match=r"sees other images .*\(val\).*training images"):
        ensemble_runs(
            [str(runs[0].run_dir), str(resplit)],
            card=str(card),
            root=str(tmp / "data"),
            split="val",
            log=False,
            progress=False,
        )
    with pytest.raises(ValueError, match="at least two runs"):
        ensemble_runs([str(runs[0].run_dir)], card=str(card), root=str(tmp / "data"), log=False)


def test_ensemble_cli_logs_an_evaluation_run_that_compare_pairs(two_runs, capsys):
    runs, uri, tmp, card = two_runs
    code = main(
        [
            "ensemble",
            str(runs[0].run_dir),
            str(runs[1].run_dir),
            "--card",
            str(card),
            "--root",
            str(tmp / "data"),
            "--n-bootstrap",
            "10",
            "--prevalence",
            "0.3",
            "--tracking-uri",
            uri,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Ensemble of 2 runs" in out and "prevalence" in out
    ensemble_id = out.strip().splitlines()[-1].split()[-1]
    run = MlflowClient(uri).get_run(ensemble_id)
    assert run.data.tags["medtricks.kind"] == "ensemble" and run.data.params["prevalence"] == "0.3"
    assert {"eval/auroc", "eval/op/accuracy", "eval/op/threshold"} <= set(run.data.metrics)
    single = evaluate_trained(
        str(runs[0].run_dir), card=str(card), root=str(tmp / "data"), n_bootstrap=10, tracking_uri=uri, progress=False
    )
    text = compare_runs(run_ids=[single.run_id, ensemble_id], metric="eval/auroc", tracking_uri=uri)
    assert "Paired on the same 64 eval images" in text


def test_ensemble_is_in_the_cli_help(capsys):
    from medtricks.cli import build_parser

    assert "ensemble" in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        main(["ensemble", "--help"])
    assert exit_info.value.code == 0
    assert "--prevalence" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 10: ensemble members
def _copy(run_dir: Path, dest: Path, perturb: bool = False) -> Path:
    shutil.copytree(run_dir, dest)
    (dest / "state.json").unlink(missing_ok=True)
    if perturb:  # another model: the same architecture, other weights
        state_file = dest / "model" / "model_state.pt"
        state = torch.load(state_file, weights_only=True)
        name = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
        state[name] = state[name] + 0.01
        torch.save(state, state_file)
    return dest


def test_ensemble_refuses_one_run_twice_and_a_copy(salted_run, tmp_path):
    run_dir, tmp = salted_run
    kwargs = dict(card="synthetic-phantoms", root=str(tmp / "phantoms"), n_bootstrap=0, log=False, progress=False)
    with pytest.raises(ConfigError, match="same run") as info:
        ensemble_runs([str(run_dir), str(run_dir)], **kwargs)
    assert str(info.value).count(str(run_dir)) == 2
    copy = _copy(run_dir, tmp_path / "copy")
    with pytest.raises(ConfigError, match="identical model/model_state.pt") as info:
        ensemble_runs([str(run_dir), str(copy)], **kwargs)
    assert str(run_dir) in str(info.value) and str(copy) in str(info.value)


def test_ensemble_warns_about_training_data_as_evaluate_does(salted_run, run_salt, tmp_path, capsys, monkeypatch):
    run_dir, tmp = salted_run
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", run_salt)
    other = _copy(run_dir, tmp_path / "other", perturb=True)
    kwargs = dict(card="synthetic-phantoms", root=str(tmp / "phantoms"), n_bootstrap=0, log=False, progress=False)
    evaluated = evaluate_trained(str(run_dir), **kwargs)
    expected = [w for w in evaluated.warnings if "train split" in w]
    assert expected
    capsys.readouterr()
    report = ensemble_runs([str(run_dir), str(other)], **kwargs)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: member")]
    assert any(line.endswith(expected[0]) for line in printed)  # evaluate's own words, per member
    assert len([w for w in report.ensemble.warnings if "train split" in w]) == 2
    assert "WARNING" in report.table()
