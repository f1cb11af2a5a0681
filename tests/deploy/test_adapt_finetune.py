"""``medtricks adapt --method finetune`` (issue 30): fine-tune a trained run on a labelled site sample,
cross-fitted by patient, then once on every site image.

One tiny parent (resnet18, binary phantoms at 32 px, one epoch, local run store) and one cross-fit through the
command line (3 folds, 1 epoch) are made once per module; the other tests read them, or rerun the command.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml


ROOT = Path(__file__).resolve().parents[2]
SALT = "medtricks-finetune-tests"  # one patient salt for the module's runs and every test (hashes must match)
FOLDS = 3


@pytest.fixture(autouse=True)
def _one_salt(monkeypatch):
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", SALT)


def _args(parent_dir, card, site, out, *extra):
    return [
        "adapt",
        str(parent_dir),
        "--method",
        "finetune",
        "--card",
        str(card),
        "--root",
        str(site),
        "--folds",
        str(FOLDS),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--n-bootstrap",
        "20",
        "--out-dir",
        str(out),
        *extra,
    ]


def _kwargs(parent_dir, card, site, out):
    """The Python call that is the same cross-fit as :func:`_args`."""
    return dict(
        ref=str(parent_dir),
        card=str(card),
        root=str(site),
        folds=FOLDS,
        epochs=1,
        batch_size=8,
        n_bootstrap=20,
        output_dir=str(out),
        progress=False,
    )


def _counting(monkeypatch):
    """Wrap the cross-fit's run_recipe: every call's keyword arguments are recorded."""
    import medtricks.deploy.finetune as finetune

    calls, real = [], finetune.run_recipe

    def counted(recipe, **kwargs):
        calls.append({"name": recipe.experiment.name, **kwargs})
        return real(recipe, **kwargs)

    monkeypatch.setattr(finetune, "run_recipe", counted)
    return calls


@pytest.fixture(scope="module")
def crossfit(binary_phantom_card, tmp_path_factory):
    """A finished tiny parent on binary phantoms, a labelled "site" (phantoms of another seed: other patients),
    and the cross-fit run through `medtricks adapt ... --method finetune`."""
    from medtricks.cli import main
    from medtricks.data import synthesize_phantoms
    from medtricks.recipe import load_recipe
    from medtricks.run import run_recipe

    tmp = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTRICKS_PATIENT_SALT", SALT)
        synthesize_phantoms(tmp / "data", n=60, classes=("normal", "pneumonia"), size=32, seed=0)
        synthesize_phantoms(tmp / "site", n=60, classes=("normal", "pneumonia"), size=32, seed=5)
        card = binary_phantom_card(tmp)
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            overrides=[
                f"data.card={card}",
                "data.synth=null",
                f"data.root={tmp / 'data'}",
                "data.image_size=32",
                "data.val_fraction=0.25",
                "data.test_fraction=0.2",
                "model.name=resnet18",
                "model.weights=none",
                "train.epochs=1",
                "train.batch_size=16",
                "eval.n_bootstrap=0",
                "eval.plots=false",
                "train.progress=false",
                "schedule.warmup_epochs=0",
                "tracking.backend=none",
                f"experiment.output_dir={tmp / 'runs'}",
                "experiment.name=parent",
            ],
        )
        parent = run_recipe(recipe, quiet=True)
        calls = _counting(mp)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(_args(parent.run_dir, card, tmp / "site", tmp / "adapted", "--set", "eval.plots=false"))
    assert code == 0, err.getvalue()
    return {"parent": parent, "tmp": tmp, "card": card, "out": out.getvalue(), "calls": calls}


def _final(crossfit):
    runs = sorted((crossfit["tmp"] / "adapted" / "parent-finetune").iterdir())
    assert len(runs) == 1
    return runs[0]


def _fold_runs(crossfit) -> list[Path]:
    (folder,) = (crossfit["tmp"] / "adapted").glob("finetune-*")
    return [next(p for p in (folder / f"fold{k}").iterdir() if p.is_dir()) for k in range(1, FOLDS + 1)]


# ------------------------------------------------------------------------------- plain arrays
def test_patient_folds_are_patient_disjoint_stratified_and_cover_every_image():
    from medtricks.deploy.finetune import fold_splits, patient_folds

    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(40)], rng.integers(1, 4, 40))
    y = np.array([int(g[1:]) % 2 for g in groups])  # one class per patient
    fold_of = patient_folds(y, groups, 4, seed=1)
    assert set(fold_of) == {0, 1, 2, 3}
    assert all(len(set(fold_of[groups == g])) == 1 for g in np.unique(groups))  # a patient in one fold
    assert all(set(y[fold_of == k]) == {0, 1} for k in range(4))  # stratified: both classes everywhere
    for k in range(4):
        split = fold_splits(y.astype(str), groups, fold_of, k, val_fraction=0.25, split_seed=0)
        assert (split == "test").sum() == (fold_of == k).sum()
        assert set(groups[split == "val"]).isdisjoint(groups[split == "train"])
        assert set(groups[split == "test"]).isdisjoint(groups[split != "test"])
    assert np.array_equal(patient_folds(y, groups, 4, seed=1), fold_of)  # seeded


# ------------------------------------------------------------------------- the cross-fit, end to end
def test_cli_prints_the_comparison_and_trains_every_fold_then_the_final_run(crossfit):
    text = crossfit["out"]
    assert [c["name"] for c in crossfit["calls"]] == [f"fold{k}" for k in range(1, FOLDS + 1)] + ["parent-finetune"]
    for needed in (
        "out-of-the-box",
        "fine-tuned",
        "Youden on each fold's validation part",
        "threshold 0.5",
        "parent's stored threshold",
        "Δ AUROC fine-tuned − out-of-the-box",
        f"in {FOLDS} folds",
        f"final run: {_final(crossfit)}",
        "mean of the fold Youden thresholds",
    ):
        assert needed in text, needed
    assert str(crossfit["tmp"] / "site") not in text  # the site folder is named by its salted id only


def test_the_folds_are_patient_disjoint_and_score_every_site_image_exactly_once(crossfit):
    from medtricks.data import build_manifest, export_manifest

    site = export_manifest(
        build_manifest(crossfit["card"], crossfit["tmp"] / "site", val_fraction=0.2), crossfit["tmp"] / "site"
    )
    held, test_patients = [], []
    for run in _fold_runs(crossfit):
        rows = pd.read_csv(run / "artifacts" / "split_manifest.csv")
        test = rows[rows["split"] == "test"]
        assert set(test["patient"]).isdisjoint(rows.loc[rows["split"] != "test", "patient"])  # patient-disjoint
        assert set(rows.loc[rows["split"] == "val", "patient"]).isdisjoint(
            rows.loc[rows["split"] == "train", "patient"]
        )
        assert len(rows) == len(site)  # every fold run sees the whole sample, split three ways
        held += list(test["image_id"])
        test_patients.append(set(test["patient"]))
        y = np.load(run / "artifacts" / "predictions_test.npz")["y_true"]
        assert len(y) == len(test)
    assert sorted(held) == sorted(site["image_id"])  # every image held out exactly once
    assert all(a.isdisjoint(b) for i, a in enumerate(test_patients) for b in test_patients[i + 1 :])
    record = json.loads((_final(crossfit) / "model" / "adaptation.json").read_text())
    assert sum(f["n_test"] for f in record["crossfit"]["fold_runs"]) == len(site) == record["sample"]["n_images"]


def test_the_final_run_starts_from_the_parent_records_it_and_stores_the_crossfitted_threshold(crossfit):
    from medtricks.evaluate.operating_point import OperatingPoint
    from medtricks.recipe import load_run_recipe

    parent, final = crossfit["parent"], _final(crossfit)
    params = json.loads((final / "store" / "params.json").read_text())
    assert params["lineage.parent_run"] == parent.run_id and params["adapt.method"] == "finetune"
    before = torch.load(parent.run_dir / "model" / "model_state.pt", weights_only=True)
    after = torch.load(final / "model" / "model_state.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())  # trained
    recipe, parent_recipe = load_run_recipe(final / "recipe.yaml"), load_run_recipe(parent.run_dir / "recipe.yaml")
    assert recipe.model.weights == f"run:{parent.run_dir.resolve()}"
    assert recipe.data.test_fraction == 0 and recipe.train.epochs == 1 and recipe.schedule.warmup_epochs == 0
    assert recipe.optim.lr == pytest.approx(parent_recipe.optim.lr * 0.1)
    assert recipe.train.best_metric == "train/epoch_loss" and recipe.train.best_mode == "min"
    assert parent_recipe.tricks.bn_gamma.strategy == "zero_late" and recipe.tricks.bn_gamma.strategy == "none"
    assert recipe.model.freeze == parent_recipe.model.freeze

    record_text = (final / "model" / "adaptation.json").read_text()
    record = json.loads(record_text)
    assert record["method"] == "finetune" and record["parent_run_id"] == parent.run_id
    assert record["parent_run_dir"] == str(parent.run_dir.resolve()) and record["site_root"].startswith("r_")
    assert str(crossfit["tmp"] / "site") not in record_text  # no raw data path
    assert record["sample"]["n_patients"] > FOLDS and set(record["sample"]["per_class"]) == {"normal", "pneumonia"}
    assert record["crossfit"]["folds"] == FOLDS and len(record["crossfit"]["fold_runs"]) == FOLDS
    metrics = record["crossfit"]["metrics"]
    for model in ("finetuned", "parent"):
        assert set(metrics["models"][model]["rules"]) == {"stored", "0.5", "youden"}
        for rule in metrics["models"][model]["rules"].values():
            assert {"accuracy", "sensitivity", "specificity"} <= set(rule)
        assert metrics["models"][model]["auroc"]["ci"] is not None
    assert set(metrics["delta_auroc"]) >= {"value", "ci", "p_value", "decided"}
    assert record["settings"]["epochs"] == 1 and "train/epoch_loss" in record["settings"]["checkpoint"]
    point = OperatingPoint.from_json(final / "model" / "operating_point.json")
    thresholds = record["operating_point"]["fold_thresholds"]
    assert point.method == "crossfit-youden" and point.threshold == pytest.approx(np.mean(thresholds))
    assert json.loads((final / "state.json").read_text())["finetune_status"] == "complete"


def test_a_card_with_other_classes_and_finetune_without_a_card_are_refused(
    binary_phantom_card, crossfit, capsys, tmp_path
):
    from medtricks.cli import main
    from medtricks.deploy.adapt import adapt_run
    from medtricks.deploy.finetune import finetune_run
    from medtricks.errors import ConfigError

    parent, tmp = crossfit["parent"], crossfit["tmp"]
    other = binary_phantom_card(tmp_path, name="other-phantoms", classes=("normal", "bacterial"))
    with pytest.raises(ConfigError, match=r"\['normal', 'bacterial'\].*\['normal', 'pneumonia'\]"):
        finetune_run(
            str(parent.run_dir), card=str(other), root=str(tmp / "site"), output_dir=str(tmp_path), progress=False
        )
    assert not any(tmp_path.glob("finetune-*"))  # refused before anything was written
    assert main(["adapt", str(parent.run_dir), "--method", "finetune", "--root", str(tmp / "site")]) == 2
    assert "--card" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--card C"):
        adapt_run(str(parent.run_dir), root=str(tmp / "site"), method="finetune")
    with pytest.raises(ConfigError, match="data.root"):
        finetune_run(
            str(parent.run_dir),
            card=str(crossfit["card"]),
            root=str(tmp / "site"),
            overrides=["data.root=/elsewhere"],
            progress=False,
        )
    assert (
        main(
            [
                "adapt",
                str(parent.run_dir),
                "--method",
                "adabn",
                "--root",
                str(tmp / "site"),
                "--card",
                str(crossfit["card"]),
            ]
        )
        == 2
    )
    assert "for --method finetune only" in capsys.readouterr().err


def test_the_same_command_again_skips_finished_folds_and_continues_an_interrupted_one(crossfit, monkeypatch):
    from medtricks.deploy.finetune import finetune_run

    parent, tmp, card = crossfit["parent"], crossfit["tmp"], crossfit["card"]
    first = json.loads((_final(crossfit) / "model" / "adaptation.json").read_text())
    calls = _counting(monkeypatch)
    kwargs = _kwargs(parent.run_dir, card, tmp / "site", tmp / "adapted")
    again = finetune_run(overrides=["eval.plots=false"], **kwargs)
    assert calls == [] and again.trained_folds == 0 and again.final_reused
    assert again.run_dir == _final(crossfit)
    assert again.metrics == first["crossfit"]["metrics"]  # the same folds, predictions and resamples

    # fold 2 "interrupted": not finished, its last checkpoint kept -> continued, the others skipped
    fold2 = _fold_runs(crossfit)[1]
    state = json.loads((fold2 / "state.json").read_text())
    (fold2 / "state.json").write_text(json.dumps({**state, "status": "running"}))
    resumed = finetune_run(overrides=["eval.plots=false"], **kwargs)
    assert [(c["name"], c["resume"]) for c in calls] == [("fold2", "auto")] and resumed.trained_folds == 1
    assert json.loads((fold2 / "state.json").read_text())["status"] == "finished"  # the same folder, continued
    assert (
        resumed.metrics["models"]["finetuned"]["auroc"] == first["crossfit"]["metrics"]["models"]["finetuned"]["auroc"]
    )
    # other settings are another cross-fit: a new folder, nothing of this one reused
    other = finetune_run(overrides=["eval.plots=false", "optim.lr=0.001"], **{**kwargs, "folds": 2})
    assert other.crossfit_dir != again.crossfit_dir and other.trained_folds == 2 and not other.final_reused
    assert yaml.safe_load((other.run_dir / "recipe.yaml").read_text())["optim"]["lr"] == 0.001
