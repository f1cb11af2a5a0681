"""Issue 17, item 4: Noisy Student self-training -- the round plan (pure), the pool check, the table and
plot, three real rounds with their teachers and noise, a kill in round 1 then a rerun that skips round 0
and resumes round 1, and the `self-train` command with tracking off and with an sqlite MLflow store.
Issue 33: the teacher's input (clean) is in the self-training id and in the runs' params."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

import medtricks
import medtricks.run
import medtricks.self_train as st
from medtricks.cli import main
from medtricks.errors import ConfigError
from medtricks.recipe import recipe_digest
from medtricks.rundir import RunDir
from medtricks.self_train import (
    NoiseConfig,
    plan_rounds,
    plot_rounds,
    round_overrides,
    round_recipe,
    run_self_train,
    self_train_id,
    supports_drop_path,
)
from medtricks.tracking import create_store


ROOT = Path(__file__).resolve().parents[2]
# 1 epoch, 30 % of the training images labelled, a low threshold so some pseudo-labels are kept; 48 px so
# ResNet's last stage is 2x2 (a last batch of one image still has more than one value per BatchNorm channel)
FEW = [
    "data.label_fraction=0.3",
    "data.synth.size=48",
    "data.image_size=48",
    "train.epochs=1",
    "tricks.pseudo_label.threshold=0.4",
    "tricks.pseudo_label.batch_size=8",
    "train.batch_size=8",
]


def _recipe_of(run_dir) -> dict:
    return yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text())


# ------------------------------------------------------------------------------------ fast: planning
def test_the_plan_gives_the_teacher_no_pseudo_labels_and_every_student_the_noise(tiny_recipe, tmp_path):
    recipe = tiny_recipe(tmp_path, *FEW)
    plans = plan_rounds(recipe, 2, NoiseConfig(), drop_path=True)
    assert [p.index for p in plans] == [0, 1, 2] and [p.teacher_round for p in plans] == [None, 0, 1]
    assert plans[0].overrides == ["tricks.pseudo_label.enabled=false", "tricks.pseudo_label.teacher=null"]
    assert (
        plans[1].overrides
        == plans[2].overrides
        == [
            "tricks.pseudo_label.enabled=true",
            "model.drop_rate=0.5",
            "model.kwargs.drop_path_rate=0.2",
            "data.augment=cxr_shift",
        ]
    )
    # no stochastic depth where the model takes none; a bigger student; noise switched off key by key
    assert round_overrides(1, NoiseConfig(), drop_path=False) == [
        "tricks.pseudo_label.enabled=true",
        "model.drop_rate=0.5",
        "data.augment=cxr_shift",
    ]
    assert round_overrides(1, NoiseConfig(drop_rate=0, drop_path_rate=0, augment=None, student="resnet34")) == [
        "tricks.pseudo_label.enabled=true",
        "model.name=resnet34",
    ]
    # the recipe of a round: its overrides, the teacher's folder (a string, even with ':' in it), its own folder
    child = round_recipe(recipe, plans[2], teacher=str(tmp_path / "r1: run"), out_dir=tmp_path / "st")
    assert child.tricks.pseudo_label.enabled and child.tricks.pseudo_label.teacher == str(tmp_path / "r1: run")
    assert child.model.drop_rate == 0.5 and child.model.kwargs == {"drop_path_rate": 0.2}
    assert child.data.augment == "cxr_shift" and child.experiment.output_dir == str(tmp_path / "st" / "round2")
    assert child.data.label_fraction == 0.3  # the same labelled images and pool every round
    teacher = round_recipe(recipe, plans[0], teacher=None, out_dir=tmp_path / "st")
    assert not teacher.tricks.pseudo_label.enabled and teacher.model.drop_rate == 0.0
    with pytest.raises(ConfigError, match="round 1 needs the run folder of round 0"):
        round_recipe(recipe, plans[1], teacher=None, out_dir=tmp_path / "st")
    # the id ignores tracking and the number of rounds, not the noise
    other_tracking = tiny_recipe(tmp_path, *FEW, "tracking.backend=mlflow")
    assert self_train_id(recipe, NoiseConfig()) == self_train_id(other_tracking, NoiseConfig())
    assert self_train_id(recipe, NoiseConfig()) != self_train_id(recipe, NoiseConfig(drop_rate=0.3))
    # issue 33: the teacher's input is part of the id, so a folder whose students were labelled from the
    # augmented view (the id without it) is never continued by a clean-teacher self-training
    assert st.TEACHER_INPUT == "clean"
    assert self_train_id(recipe, NoiseConfig()) != recipe_digest(
        recipe, ignore=st._NOT_IDENTITY, noise=asdict(NoiseConfig())
    )


def test_without_an_unlabelled_pool_the_error_names_the_keys(tiny_recipe, tmp_path):
    for extra in ([], ["data.label_fraction=1.0"]):
        with pytest.raises(ConfigError, match=r"data\.label_fraction.*data\.label_count.*data\.unlabeled"):
            plan_rounds(tiny_recipe(tmp_path, *extra), 1, drop_path=True)
    assert len(plan_rounds(tiny_recipe(tmp_path, "data.label_count=10"), 1, drop_path=True)) == 2
    with pytest.raises(ConfigError, match="rounds must be an int >= 1"):
        plan_rounds(tiny_recipe(tmp_path, *FEW), 0, drop_path=True)


def test_noise_settings_are_checked():
    with pytest.raises(ConfigError, match="drop_rate must be a number in"):
        NoiseConfig(drop_rate=1.0)
    with pytest.raises(ConfigError, match="augment must be one of cxr_light, cxr_shift"):
        NoiseConfig(augment="randaugment")
    assert supports_drop_path("resnet18") and not supports_drop_path("vgg11")


def test_the_table_and_the_plot_of_the_rounds():
    nan = math.nan
    rows = [
        {
            "round": 0,
            "model": "resnet18",
            "teacher_round": None,
            "val_auroc": 0.8,
            "val_auroc_ci_low": 0.7,
            "val_auroc_ci_high": 0.9,
            "val_accuracy": 0.7,
            "val_accuracy_ci_low": 0.6,
            "val_accuracy_ci_high": 0.8,
            "pseudo_kept": nan,
            "run_id": "a",
            "run_dir": "/r0",
            "ran": True,
        },
        {
            "round": 1,
            "model": "resnet18",
            "teacher_round": 0,
            "val_auroc": 0.85,
            "val_auroc_ci_low": nan,
            "val_auroc_ci_high": nan,
            "val_accuracy": 0.75,
            "val_accuracy_ci_low": nan,
            "val_accuracy_ci_high": nan,
            "pseudo_kept": 0.4,
            "run_id": "b",
            "run_dir": "/r1",
            "ran": True,
        },
    ]
    table = pd.DataFrame(rows, columns=st._COLUMNS)
    result = st.SelfTrainResult(table=table, self_train_id="abc", rounds=1)
    md = result.markdown()
    assert "0.8000 [0.7000, 0.9000]" in md and "0.8500 (no CI)" in md and "round 0" in md and "0.400" in md
    assert "test AUROC" not in md and "not held out" in md and result.final_run_dir == "/r1"
    fig = plot_rounds(table)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["val auroc", "val accuracy"]


def test_the_public_api_and_the_help_name_it(capsys):
    assert medtricks.run_self_train is run_self_train and medtricks.NoiseConfig is NoiseConfig
    with pytest.raises(SystemExit):
        main(["self-train", "--help"])
    out = capsys.readouterr().out
    assert "--rounds" in out and "--drop-path-rate" in out and "keep" in out


# ------------------------------------------------------------------------------------ slow: real rounds
@pytest.mark.slow
def test_three_rounds_each_labelled_by_the_round_before(tiny_recipe, tmp_path):
    recipe = tiny_recipe(tmp_path, *FEW)
    result = run_self_train(recipe, 2, quiet=True)
    table = result.table
    assert table["round"].tolist() == [0, 1, 2] and table["ran"].tolist() == [True, True, True]
    recipes = [_recipe_of(d) for d in table["run_dir"]]
    assert not recipes[0]["tricks"]["pseudo_label"]["enabled"] and recipes[0]["model"]["drop_rate"] == 0.0
    for k in (1, 2):
        pl = recipes[k]["tricks"]["pseudo_label"]
        assert pl["enabled"] and pl["teacher"] == table["run_dir"][k - 1]  # the previous round's folder
        assert recipes[k]["model"]["drop_rate"] == 0.5 and recipes[k]["model"]["kwargs"] == {"drop_path_rate": 0.2}
        assert recipes[k]["data"]["augment"] == "cxr_shift"
        assert 0.0 <= table["pseudo_kept"][k] <= 1.0
    assert all(RunDir(d).is_finished() for d in table["run_dir"])
    # one parent, one child per round, in the self-training folder's local store
    out = result.output_dir
    assert (out / "rounds.png").is_file() and (out / "self_train_table.md").is_file()
    store = create_store("none", root=out)
    experiment = recipe.experiment.name
    (parent,) = store.search_runs(experiment, tags={"medtricks.role": "self_train_parent"})
    assert parent.status == "FINISHED" and parent.run_id == result.parent_run_id
    children = store.search_runs(experiment, tags={"medtricks.role": "self_train_child"})
    assert sorted(int(c.tags["round"]) for c in children) == [0, 1, 2]
    assert {c.parent_run_id for c in children} == {parent.run_id}
    png = store.download_artifact(parent.run_id, "self_train/rounds.png", tmp_path / "dl")
    assert png is not None and Path(png).is_file()
    state = json.loads((out / st.STATE_FILE).read_text())
    assert sorted(state["rounds"]) == ["0", "1", "2"]


@pytest.mark.slow
def test_a_kill_in_round_1_then_a_rerun_skips_round_0_and_resumes_round_1(tiny_recipe, kill_run, tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, *FEW, "train.epochs=2")
    real_run_recipe = st.run_recipe
    real_fit = medtricks.run.fit
    calls = []

    def wrapped(child, **kwargs):
        k = int(Path(child.experiment.output_dir).name.removeprefix("round"))
        calls.append(k)
        if k == 1 and len(calls) == 2:  # the first try of round 1 dies after its first epoch
            kill_run(monkeypatch, after_epoch=1)
        return real_run_recipe(child, **kwargs)

    monkeypatch.setattr(st, "run_recipe", wrapped)
    with pytest.raises(KeyboardInterrupt):
        run_self_train(recipe, 2, quiet=True)
    assert calls == [0, 1]
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    out = RunDir.experiment_dir(recipe.experiment.output_dir, recipe.experiment.name)
    (folder,) = [p for p in out.iterdir() if p.name.startswith("self-train-")]
    state = json.loads((folder / st.STATE_FILE).read_text())
    assert list(state["rounds"]) == ["0"]
    round0 = state["rounds"]["0"]["run_dir"]
    killed = RunDir.find_resumable(folder / "round1", recipe.experiment.name)
    assert killed is not None  # round 1 left a checkpoint
    parent_id = state["parent_run_id"]
    assert create_store("none", root=folder).get_run(parent_id).status == "KILLED"

    calls.clear()
    result = run_self_train(recipe, 2, quiet=True)
    assert calls == [1, 2]  # round 0 was not trained again
    assert result.table["ran"].tolist() == [False, True, True]
    assert result.table["run_dir"][0] == round0
    assert result.table["run_dir"][1] == str(killed.path.resolve())  # round 1 continued in its own folder
    assert len([p for p in (folder / "round0" / recipe.experiment.name).iterdir() if p.is_dir()]) == 1
    assert _recipe_of(result.table["run_dir"][2])["tricks"]["pseudo_label"]["teacher"] == str(killed.path.resolve())
    assert result.parent_run_id == parent_id
    assert create_store("none", root=folder).get_run(parent_id).status == "FINISHED"


@pytest.fixture(scope="module")
def cli_args(tiny_overrides):
    """``cli_args(tmp_path, *extra)``: the arguments of a one-round ``self-train`` of the tiny recipe."""

    def make(tmp_path, *extra):
        sets = [*tiny_overrides, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}"]
        sets += [*FEW, *extra]
        return [
            "self-train",
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--rounds",
            "1",
            *[a for s in sets for a in ("--set", s)],
        ]

    return make


@pytest.mark.slow
def test_the_command_with_tracking_off(cli_args, tmp_path, capsys):
    assert main(cli_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "Noisy Student self-training" in out and "round 1" in out and "val AUROC" in out
    (folder,) = (tmp_path / "runs" / "quickstart").glob("self-train-*")
    assert (folder / "rounds.png").is_file()
    # the same command again trains nothing
    assert main(cli_args(tmp_path)) == 0
    assert "finished before" in capsys.readouterr().out


@pytest.mark.slow
def test_the_command_with_an_sqlite_mlflow_store(cli_args, fresh_sqlite_uri, tmp_path, capsys):
    uri = fresh_sqlite_uri(tmp_path)
    args = cli_args(tmp_path, "tracking.backend=mlflow", f"tracking.uri={uri}")
    assert main(args + ["--drop-path-rate", "0", "--augment", "keep"]) == 0
    store = create_store("mlflow", uri)
    (parent,) = store.search_runs("quickstart", tags={"medtricks.role": "self_train_parent"})
    children = store.search_runs("quickstart", tags={"medtricks.role": "self_train_child"})
    assert parent.status == "FINISHED" and sorted(c.tags["round"] for c in children) == ["0", "1"]
    assert {c.parent_run_id for c in children} == {parent.run_id}
    assert "self_train/val_auroc" in parent.metrics or "self_train/val_accuracy" in parent.metrics
    png = store.download_artifact(parent.run_id, "self_train/rounds.png", tmp_path / "dl")
    assert png is not None and Path(png).is_file()
    student = next(c for c in children if c.tags["round"] == "1")
    assert student.params.get("model.drop_rate") == "0.5" and student.params.get("data.augment") == "cxr_light"
    # the student's teacher labelled the clean (eval-transform) view; both runs say so
    assert student.params.get("pseudo_label.teacher_input") == "clean"
    assert parent.params.get("self_train.teacher_input") == "clean"
