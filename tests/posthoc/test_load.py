"""Loading a finished run (medtricks/posthoc/load.py) runs no code it was not asked to: a plug-in named in a
stored recipe is never imported, a planted model file is refused in one line (issue 31 items 1 and 3)."""

import argparse
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medtricks.cli import main
from medtricks.posthoc.load import ModelFileError, load_trained
from medtricks.recipe import RecipeError


def _received_copy(one_step_run, tmp_path, plugin) -> Path:
    """The run folder as someone could send it: its recipe.yaml now names a plug-in."""
    copy = tmp_path / "received_run"
    shutil.copytree(one_step_run.run_dir, copy)
    data = yaml.safe_load((copy / "recipe.yaml").read_text())
    data["experiment"]["plugins"] = [str(plugin)]
    (copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    return copy


def test_a_stored_runs_plugin_list_is_never_imported_when_loading_its_model(
    evil_plugin, one_step_run, tmp_path, monkeypatch, capsys
):
    plugin, marker = evil_plugin(tmp_path)
    copy = _received_copy(one_step_run, tmp_path, plugin)
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "1")  # not even an opted-in user's runs import it
    trained = load_trained(str(copy))
    assert trained.recipe.experiment.plugins == [str(plugin)] and not marker.exists()
    images = sorted((Path(one_step_run.recipe.data.root)).rglob("*.png"))[:2]
    assert main(["predict", str(copy), *map(str, images), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(copy), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert not marker.exists(), "a plug-in named in a stored run's recipe ran"
    # A plug-in the user names on the command line is their own choice:
    capsys.readouterr()
    assert main(["predict", str(copy), str(images[0]), "--out", str(tmp_path / "q.csv"), "--plugin", str(plugin)]) == 0
    assert marker.exists()


def test_a_stored_recipe_that_needs_its_plugin_says_to_name_it(evil_plugin, one_step_run, tmp_path):
    plugin, _ = evil_plugin(tmp_path)
    copy = _received_copy(one_step_run, tmp_path, plugin)
    data = yaml.safe_load((copy / "recipe.yaml").read_text())
    data["tricks"]["loss_scale"] = 2.0  # a key only the plug-in would define
    (copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="never imports from a stored run.*--plugin"):
        load_trained(str(copy))


def test_a_planted_model_file_is_refused_in_one_line(one_step_run, tmp_path, capsys):
    copy = tmp_path / "planted"
    shutil.copytree(one_step_run.run_dir, copy)
    torch.save({"conv1.weight": torch.zeros(1), "payload": argparse.Namespace(x=1)}, copy / "model" / "model_state.pt")
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_trained(str(copy))
    image = next(Path(one_step_run.recipe.data.root).rglob("*.png"))
    assert main(["predict", str(copy), str(image)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refused" in err
    assert "weights_only=False" not in err and "Traceback" not in err
