"""``model.weights: run:<run folder or run id>``: fine-tuning starts from a finished medtricks run (issue 35).

One tiny parent run (resnet18, 3-class phantoms, 32 px, one epoch, local run store) is trained once per module;
the children are built from it (most tests build only) or trained from it (lineage params, resume after a kill,
load_trained after the parent is gone).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medtricks.errors import ConfigError, MissingFileError
from medtricks.recipe import RecipeError, load_recipe, recipe_digest, load_run_recipe
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.run.prepare import prepare_run as _prepare
from medtricks.posthoc.load import build_model, load_trained
from medtricks.tracking import NullStore


ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["normal", "bacterial", "covid"]  # the synthetic-phantoms card


@pytest.fixture(scope="module")
def make_recipe(one_epoch_overrides):
    """``make_recipe(folder, *extra)``: the one-epoch quickstart recipe, phantoms and runs under ``folder``."""

    def make(folder: Path, *extra: str):
        return load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            overrides=[
                *one_epoch_overrides,
                f"data.root={folder / 'phantoms'}",
                f"experiment.output_dir={folder / 'runs'}",
                *extra,
            ],
        )

    return make


@pytest.fixture(scope="module")
def parent(make_recipe, tmp_path_factory):
    """A finished tiny run on the 3-class phantoms (ImageNet is not needed: weights none)."""
    folder = tmp_path_factory.mktemp("parent")
    result = run_recipe(make_recipe(folder, "model.weights=none", "experiment.name=pneumonia"), quiet=True)
    state = torch.load(result.run_dir / "model" / "model_state.pt", weights_only=True)
    return result, state, folder


@pytest.fixture(scope="module")
def make_child(make_recipe):
    """``make_child(folder, parent_ref, *extra)``: a recipe fine-tuning from the run ``parent_ref``."""
    return lambda folder, parent_ref, *extra: make_recipe(
        folder, f"model.weights=run:{parent_ref}", "experiment.name=covid", *extra
    )


def _card(folder: Path, classes: list[str]) -> Path:
    card = yaml.safe_load((ROOT / "data_cards" / "synthetic-phantoms.yaml").read_text())
    card.update(name="reordered-phantoms", classes=classes)
    path = folder / "reordered-phantoms.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def test_same_classes_load_every_parent_tensor_and_the_head(make_child, parent, tmp_path):
    result, state, _ = parent
    model, data_config = build_model(make_child(tmp_path, str(result.run_dir)), num_classes=3)
    child = model.state_dict()
    assert set(child) == set(state)
    assert all(torch.equal(child[k], state[k]) for k in state)
    info = model.medtricks_info
    assert info["head"] == "pretrained" and info["weights"] == f"run:{result.run_dir}"
    assert info["weights_source"] == str(result.run_dir.resolve()) and len(info["weights_sha256"]) == 64
    saved = yaml.safe_load((result.run_dir / "model" / "data_config.json").read_text())
    assert list(data_config["mean"]) == saved["mean"] and list(info["std"]) == saved["std"]
    lineage = info["lineage"]
    parent_recipe = load_run_recipe(result.run_dir / "recipe.yaml")
    assert lineage == {
        "parent_run_id": result.run_id,
        "parent_run_dir": str(result.run_dir.resolve()),
        "parent_recipe_digest": recipe_digest(parent_recipe),
        "parent_weights": "none",
        "parent_classes": CLASSES,
    }


@pytest.mark.parametrize(
    "classes", [["covid", "bacterial", "normal"], ["normal", "pneumonia"]], ids=["reordered", "two_classes"]
)
def test_other_classes_keep_the_backbone_and_get_a_new_head(make_child, binary_phantom_card, parent, tmp_path, classes):
    result, state, _ = parent
    card = _card(tmp_path, classes) if len(classes) == 3 else binary_phantom_card(tmp_path, classes=classes)
    model, _ = build_model(make_child(tmp_path, str(result.run_dir), f"data.card={card}"), num_classes=len(classes))
    child = model.state_dict()
    head = {k for k in child if k.startswith("fc.")}
    assert head == {"fc.weight", "fc.bias"} and set(child) == set(state)
    assert all(torch.equal(child[k], state[k]) for k in state if k not in head)
    assert child["fc.weight"].shape[0] == len(classes)
    assert not torch.equal(child["fc.weight"], state["fc.weight"][: len(classes)])
    assert model.medtricks_info["head"] == "new"
    assert model.medtricks_info["lineage"]["parent_classes"] == CLASSES


def test_a_run_id_is_found_in_the_local_run_store(make_child, parent):
    result, state, folder = parent
    model, _ = build_model(make_child(folder, result.run_id), num_classes=3)  # output_dir: the parent's store
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert model.medtricks_info["lineage"]["parent_run_id"] == result.run_id


def test_an_experiment_folder_means_its_newest_finished_run(make_child, parent, tmp_path):
    result, state, folder = parent
    experiment = result.run_dir.parent  # <output_dir>/pneumonia
    unfinished = experiment / "99999999-999999-ffffff"  # newer by its stamp, but never finished
    (unfinished / "model").mkdir(parents=True)
    try:
        shutil.copy(result.run_dir / "recipe.yaml", unfinished / "recipe.yaml")
        model, _ = build_model(make_child(tmp_path, str(experiment)), num_classes=3)
    finally:
        shutil.rmtree(unfinished)
    assert model.medtricks_info["lineage"]["parent_run_dir"] == str(result.run_dir.resolve())
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.name=resnet34", r"model.name='resnet18'.*model.name='resnet34'"),
        ("model.in_chans=3", r"model.in_chans=1.*model.in_chans=3"),
        ("model.resizer.enabled=true", r"model.resizer.enabled=False.*model.resizer.enabled=True"),
        ("model.drop_rate=0.2", None),  # no tensor changes: allowed
    ],
)
def test_refuses_another_architecture_naming_both(make_child, parent, tmp_path, override, match):
    result, _, _ = parent
    recipe = make_child(
        tmp_path, str(result.run_dir), override, "model.resizer.input_size=48", "model.resizer.output_size=32"
    )
    if match is None:
        build_model(recipe, num_classes=3)
        return
    with pytest.raises(ConfigError, match=match):
        build_model(recipe, num_classes=3)


def test_other_kwargs_fail_the_strict_load(make_child, parent, tmp_path):
    result, _, _ = parent
    with pytest.raises(ConfigError, match="do not fit the model"):
        build_model(make_child(tmp_path, str(result.run_dir), "model.kwargs={attention: se}"), num_classes=3)


def test_unknown_and_empty_run_refs_are_clear_errors(make_recipe, make_child, tmp_path):
    with pytest.raises(MissingFileError, match="no-such-run.*neither a run folder"):
        build_model(make_child(tmp_path, "no-such-run"), num_classes=3)
    with pytest.raises(MissingFileError, match="holds no recipe.yaml"):
        build_model(make_child(tmp_path, str(tmp_path)), num_classes=3)
    with pytest.raises(RecipeError, match=r"model.weights.*names nothing after 'run:'"):
        make_recipe(tmp_path, "model.weights='run: '")
    with pytest.raises(RecipeError, match=r"model.weights.*read as a mapping.*run:<\.\.\.>"):
        make_child(tmp_path, "")  # `--set model.weights=run:` is YAML for {"run": None}
    with pytest.raises(RecipeError, match=r"model.weights.*'imagenett'.*did you mean 'imagenet'"):
        make_recipe(tmp_path, "model.weights=imagenett")


def test_bn_gamma_strategy_acts_after_the_parent_load_and_the_kept_head_stays(make_child, parent, tmp_path):
    result, state, _ = parent
    prep = _prepare(make_child(tmp_path, str(result.run_dir), "tricks.bn_gamma.strategy=zero_late"))
    report = next(t for t in prep.tricks if t.name == "bn_gamma").report
    touched = [row["name"] for row in report]
    assert touched and all(name.startswith("layer4") for name in touched)
    assert any(state[f"{name}.weight"].abs().sum() > 0 for name in touched)  # the parent's trained gammas ...
    child = prep.model.state_dict()
    assert all(child[f"{name}.weight"].abs().sum() == 0 for name in touched)  # ... zeroed after the load
    assert torch.equal(child["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    assert torch.equal(child["fc.weight"], state["fc.weight"])  # init_new_head leaves a kept head alone


def test_chained_run_logs_lineage_resumes_after_a_kill_and_loads_without_its_parent(
    make_child, fit_killed_after_epoch, parent, tmp_path, monkeypatch
):
    import medtricks.run

    result, _, _ = parent
    copy = tmp_path / "parent-copy"  # the parent is deleted at the end
    shutil.copytree(result.run_dir, copy)
    recipe = make_child(tmp_path, str(copy), "train.epochs=2")
    real_fit = medtricks.run.fit
    monkeypatch.setattr(medtricks.run, "fit", fit_killed_after_epoch(real_fit, 1))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tracker=NullStore(), quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    unfinished = find_resumable_run_dir(recipe)
    assert unfinished is not None

    tracker = NullStore()
    resumed = run_recipe(recipe, resume="auto", tracker=tracker, quiet=True)
    assert resumed.run_dir == unfinished and len(resumed.history) == 2
    parent_recipe = load_run_recipe(copy / "recipe.yaml")
    assert tracker.params["lineage.parent_run"] == result.run_id
    assert tracker.params["lineage.parent_recipe_digest"] == recipe_digest(parent_recipe)
    assert tracker.params["lineage.parent_weights"] == "none"
    assert tracker.params["weights.source"] == str(copy.resolve())
    assert f"parent run: {result.run_id}" in (resumed.run_dir / "model" / "MODEL_CARD.md").read_text()

    shutil.rmtree(copy)
    trained = load_trained(str(resumed.run_dir))
    saved = torch.load(resumed.run_dir / "model" / "model_state.pt", weights_only=True)
    assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in saved.items())
    assert trained.classes == CLASSES


def test_a_resizer_parent_loads_into_a_resizer_child_with_a_new_backbone_head(
    make_recipe, make_child, binary_phantom_card, parent, tmp_path
):
    result, _, _ = parent
    resizer = ["model.resizer.enabled=true", "model.resizer.input_size=48", "model.resizer.output_size=32"]
    fake = tmp_path / "resizer-parent"  # a finished resizer run: its recipe and a trained-looking state
    shutil.copytree(result.run_dir, fake)
    parent_recipe = make_recipe(tmp_path, "model.weights=none", *resizer)
    (fake / "recipe.yaml").write_text(yaml.safe_dump(parent_recipe.model_dump(mode="json")))
    model, _ = build_model(parent_recipe, num_classes=3)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, fake / "model" / "model_state.pt")

    card = binary_phantom_card(tmp_path)
    child, _ = build_model(make_child(tmp_path, str(fake), *resizer, f"data.card={card}"), num_classes=2)
    loaded = child.state_dict()
    assert any(k.startswith("resizer.") for k in state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("backbone.fc."))
    assert loaded["backbone.fc.weight"].shape[0] == 2
    assert child.medtricks_info["head"] == child.backbone.medtricks_info["head"] == "new"
