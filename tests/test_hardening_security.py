"""Hardening round 2, security (issue 31 items 1 and 3): a recipe or a stored run cannot make medtricks
run code the user did not ask for, a planted model file is refused in one line, and data folders
are logged as salted hashes, never as paths."""

import argparse
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medtricks.cli import main
from medtricks.data import folder_id
from medtricks.logged_params import run_params
from medtricks.recipe import RecipeError, load_recipe
from medtricks.run import run_recipe
from medtricks.posthoc.load import ModelFileError, load_trained
from medtricks.tricks.registry import PluginError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = [
    "data.synth.n=60",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=1",
    "train.batch_size=16",
    "train.max_steps_per_epoch=1",
    "eval.n_bootstrap=0",
    "train.progress=false",
    "eval.plots=false",
    "tracking.backend=none",
    "schedule.warmup_epochs=0",
]


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    """A plug-in whose import leaves a marker file: the proof that code ran."""
    marker = tmp_path / "pwned"
    plugin = tmp_path / "evil.py"
    plugin.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return plugin, marker


def _recipe_file(tmp_path: Path, plugin: Path) -> Path:
    path = tmp_path / "received.yaml"
    path.write_text(f"base: {QUICKSTART}\nexperiment:\n  plugins: [{plugin}]\n")
    return path


def test_a_recipe_plugin_runs_no_code_without_the_users_opt_in(tmp_path, capsys):
    plugin, marker = _evil(tmp_path)
    recipe = _recipe_file(tmp_path, plugin)
    for args in (["run", str(recipe), "--dry-run"], ["run", str(recipe)], ["ablate", str(recipe), "--tricks", "ema"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "--allow-plugins" in err and "MEDTRICKS_ALLOW_PLUGINS" in err and len(err.strip().splitlines()) == 1
        assert not marker.exists(), f"{args}: the plug-in ran without the user's opt-in"
    with pytest.raises(PluginError, match="opt in"):
        load_recipe(recipe)
    assert not marker.exists()
    # The opt-in is the user's, on the command line:
    assert main(["run", str(recipe), "--dry-run", "--allow-plugins"]) == 0
    assert marker.read_text() == "ran"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    recipe = load_recipe(
        QUICKSTART, overrides=[*TINY, f"data.root={tmp / 'data'}", f"experiment.output_dir={tmp / 'runs'}"]
    )
    result = run_recipe(recipe, quiet=True)
    result.recipe = recipe
    return result


def _received_copy(tiny_run, tmp_path, plugin) -> Path:
    """The run folder as someone could send it: its recipe.yaml now names a plug-in."""
    copy = tmp_path / "received_run"
    shutil.copytree(tiny_run.run_dir, copy)
    data = yaml.safe_load((copy / "recipe.yaml").read_text())
    data["experiment"]["plugins"] = [str(plugin)]
    (copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    return copy


def test_a_stored_runs_plugin_list_is_never_imported_when_loading_its_model(tiny_run, tmp_path, monkeypatch, capsys):
    plugin, marker = _evil(tmp_path)
    copy = _received_copy(tiny_run, tmp_path, plugin)
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "1")  # not even an opted-in user's runs import it
    trained = load_trained(str(copy))
    assert trained.recipe.experiment.plugins == [str(plugin)] and not marker.exists()
    images = sorted((Path(tiny_run.recipe.data.root)).rglob("*.png"))[:2]
    assert main(["predict", str(copy), *map(str, images), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(copy), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert not marker.exists(), "a plug-in named in a stored run's recipe ran"
    # A plug-in the user names on the command line is their own choice:
    capsys.readouterr()
    assert main(["predict", str(copy), str(images[0]), "--out", str(tmp_path / "q.csv"), "--plugin", str(plugin)]) == 0
    assert marker.exists()


def test_a_stored_recipe_that_needs_its_plugin_says_to_name_it(tiny_run, tmp_path):
    plugin, _ = _evil(tmp_path)
    copy = _received_copy(tiny_run, tmp_path, plugin)
    data = yaml.safe_load((copy / "recipe.yaml").read_text())
    data["tricks"]["loss_scale"] = 2.0  # a key only the plug-in would define
    (copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="never imports from a stored run.*--plugin"):
        load_trained(str(copy))


def test_a_planted_model_file_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    copy = tmp_path / "planted"
    shutil.copytree(tiny_run.run_dir, copy)
    torch.save({"conv1.weight": torch.zeros(1), "payload": argparse.Namespace(x=1)}, copy / "model" / "model_state.pt")
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_trained(str(copy))
    image = next(Path(tiny_run.recipe.data.root).rglob("*.png"))
    assert main(["predict", str(copy), str(image)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refused" in err
    assert "weights_only=False" not in err and "Traceback" not in err


def test_data_folders_are_logged_as_salted_hashes(tiny_run, tmp_path):
    root = tiny_run.recipe.data.root
    params = tiny_run.tracker.params
    # (the salt is per machine -- here per test -- so the run's hash is checked for its form only)
    assert params["data.root"].startswith("r_") and len(params["data.root"]) == len(folder_id(root))
    assert all(str(root) not in str(v) and "data" != str(v) for v in params.values())
    named = load_recipe(QUICKSTART, overrides=[*TINY, "data.root=/x/Doe_Jane_MRN4711/cxr", "data.cache_dir=/c/Doe"])
    logged = run_params(named)
    assert "Doe" not in " ".join(map(str, logged.values()))
    assert logged["data.root"] == folder_id("/x/Doe_Jane_MRN4711/cxr") != folder_id("/x/other")


def test_evaluate_logs_its_root_as_a_hash(tiny_run, tmp_path):
    import json

    root = Path(tiny_run.recipe.data.root)
    assert (
        main(
            [
                "evaluate",
                str(tiny_run.run_dir),
                "--card",
                tiny_run.recipe.data.card,
                "--root",
                str(root),
                "--n-bootstrap",
                "0",
            ]
        )
        == 0
    )
    runs = Path(tiny_run.recipe.experiment.output_dir)
    logged = [json.loads(p.read_text()) for p in runs.rglob("store/params.json")]
    (evaluation,) = [params for params in logged if "source_run" in params]  # the run store tiny_run uses
    assert evaluation["root"].startswith("r_") and evaluation["root"] == folder_id(root)
    assert str(root) not in " ".join(map(str, evaluation.values()))
