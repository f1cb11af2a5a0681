"""Tricks are plug-ins: a toy trick in one file, registered in one line, works from a recipe (the CLI
too) and from ``ablate --tricks``, with no other file changed; the registry assembles the recipe; a recipe's
plug-in runs no code without the user's opt-in."""

import textwrap
from pathlib import Path

import pytest
import torch

from medtricks.ablation.variants import make_variants, trick_overrides
from medtricks.cli import main
from medtricks.recipe import RecipeError, load_recipe, recipe_from_dict
from medtricks.run import run_recipe
from medtricks.tricks.base import (
    RENAMED_POINTS,
    Trick,
    TrickRegistryError,
    register_trick,
    registered_tricks,
    unregister_trick,
)
from medtricks.tricks.registry import PluginError, ablation_names, trick_tags, tricks_config_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"

# The whole trick: one file, one registration line.
TOY_TRICK = textwrap.dedent("""
    from pydantic import Field
    from medtricks.tricks.base import AblationName, Trick, register_trick

    class LossScale(Trick):
        name = "loss_scale"
        fields = {"loss_scale": (float, Field(1.0, gt=0))}
        ablation = {"loss_scale": AblationName("tricks.loss_scale", "2.0", "multiply the training loss")}

        @classmethod
        def tags(cls, recipe):
            return [f"loss_scale={recipe.tricks.loss_scale:g}"] if recipe.tricks.loss_scale != 1 else []

        def transform_loss_fn(self, loss_fn):
            return lambda logits, targets: self.config.loss_scale * loss_fn(logits, targets)

    register_trick(LossScale)
""")

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
    "tracking.log_model=false",
    "tracking.backend=none",
    "schedule.warmup_epochs=0",
    "tricks.bn_gamma.strategy=none",
    "tricks.label_smoothing=0",
]


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "1")  # the user opted in (--allow-plugins)
    path = tmp_path / "loss_scale_trick.py"
    path.write_text(TOY_TRICK)
    yield path
    unregister_trick("loss_scale")


def _recipe(tmp_path, plugin, *extra):
    return load_recipe(
        RECIPES / "quickstart.yaml",
        overrides=[
            *TINY,
            f"experiment.output_dir={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}",
            f"experiment.plugins=[{plugin}]",
            *extra,
        ],
    )


def test_a_toy_trick_in_one_file_acts_on_the_loss_from_a_recipe(tmp_path, toy_plugin):
    plain = run_recipe(_recipe(tmp_path, toy_plugin), quiet=True)
    scaled = run_recipe(_recipe(tmp_path, toy_plugin, "tricks.loss_scale=3.0"), quiet=True)
    # One update from the same initialisation and batch: the logged loss is exactly three times larger.
    assert scaled.history[0]["train/epoch_loss"] == pytest.approx(3 * plain.history[0]["train/epoch_loss"], rel=1e-5)
    assert "loss_scale=3" in scaled.tracker.tags["tricks"] and "loss_scale" not in plain.tracker.tags["tricks"]
    assert scaled.tracker.params["tricks.loss_scale"] == 3.0  # the recipe logs it like any key


def test_the_toy_trick_from_the_command_line(tmp_path, toy_plugin, capsys):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        f"base: {RECIPES / 'quickstart.yaml'}\nexperiment:\n  plugins: [{toy_plugin}]\ntricks:\n  loss_scale: 2.5\n"
    )
    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert "loss_scale: 2.5" in capsys.readouterr().out
    recipe.write_text(recipe.read_text().replace("loss_scale: 2.5", "loss_scael: 2.5"))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "did you mean 'loss_scale'" in capsys.readouterr().err


def test_the_toy_trick_in_ablate_tricks(tmp_path, toy_plugin, monkeypatch):
    base = _recipe(tmp_path, toy_plugin)
    assert trick_overrides("loss_scale") == ["tricks.loss_scale=2.0"]
    variants = make_variants(base, ["loss_scale", "loss_scale=4"], mode="one_at_a_time")
    assert variants == [
        ("baseline", []),
        ("+loss_scale", ["tricks.loss_scale=2.0"]),
        ("+loss_scale=4", ["tricks.loss_scale=4"]),
    ]
    # The whole ablation, children in this process, each child's recipe re-validated with the plug-in.
    from medtricks.ablation import run_ablation

    result = run_ablation(base, ["loss_scale=3"], seeds=1, metric="val/accuracy", quiet=True)
    assert list(result.table["variant"]) == ["baseline", "+loss_scale=3"] and not result.failed


def test_the_registry_assembles_the_recipe_section_and_the_ablation_names():
    fields = set(tricks_config_model().model_fields)
    assert {
        "bn_gamma",
        "label_smoothing",
        "label_smoothing_mode",
        "no_bias_decay",
        "mixup_alpha",
        "cutmix_alpha",
        "mix_prob",
        "ema",
        "ema_decay",
        "class_balance",
        "adversarial",
        "distill",
        "pseudo_label",
        "fixmatch",
        "mpl",
        "layerscale_gamma",
        "drloc",
        "reinit_late",
    } == fields
    names = ablation_names()
    assert {
        "warmup",
        "cosine",
        "label_smoothing",
        "no_bias_decay",
        "bn_gamma",
        "mixup",
        "cutmix",
        "ema",
        "linear_scaling",
        "resizer",
        "class_balance",
        "augment",
        "adversarial",
        "distill",
        "pseudo_label",
        "fixmatch",
        "mpl",
        "layerscale_gamma",
        "drloc",
        "reinit_late",
    } == set(names)
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert trick_tags(recipe) == recipe.tricks_on()
    assert recipe.tricks_on()[:3] == ["warmup", "cosine", "linear_scaling"]


def test_registration_errors_name_the_clash():
    class Clash(Trick):
        name = "clash"
        fields = {"label_smoothing": (float, 0.0)}

    with pytest.raises(TrickRegistryError, match="tricks.label_smoothing already belong to trick 'label_smoothing'"):
        register_trick(Clash)

    class SameName(Trick):
        name = "ema"

    with pytest.raises(TrickRegistryError, match="trick name 'ema' is taken"):
        register_trick(SameName)
    with pytest.raises(TrickRegistryError, match="expects a Trick subclass"):
        register_trick(object)


@pytest.mark.parametrize("old, new", sorted(RENAMED_POINTS.items()))
def test_a_trick_defining_a_point_by_its_old_name_is_refused_when_it_registers(old, new):
    old_style = type("OldStyle", (Trick,), {"name": "old_style", old: lambda self, *args: None})
    with pytest.raises(TrickRegistryError, match=rf"OldStyle defines .* {old}\(\) is now {new}\(\)"):
        register_trick(old_style)
    assert "old_style" not in {cls.name for cls in registered_tricks()}  # refused, not half-registered
    inherited = type("Inherited", (old_style,), {"name": "inherited"})  # an old name from a base class too
    with pytest.raises(TrickRegistryError, match=rf"{old}\(\) is now {new}\(\)"):
        register_trick(inherited)


def test_a_plugin_file_written_against_the_old_names_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "1")
    path = tmp_path / "old_loss_scale.py"
    path.write_text(TOY_TRICK.replace("def transform_loss_fn(", "def wrap_loss("))
    with pytest.raises(PluginError, match=r"wrap_loss\(\) is now transform_loss_fn\(\)"):
        recipe_from_dict({"experiment": {"plugins": [str(path)]}})
    assert "loss_scale" not in {cls.name for cls in registered_tricks()}


def test_a_missing_plugin_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "1")
    with pytest.raises(PluginError, match="no_such_trick_module"):
        recipe_from_dict({"experiment": {"plugins": ["no_such_trick_module"]}})
    with pytest.raises(PluginError, match="missing.py"):
        recipe_from_dict({"experiment": {"plugins": [str(tmp_path / "missing.py")]}})


def test_unknown_trick_key_without_the_plugin_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown key 'loss_scale' in section 'tricks'"):
        recipe_from_dict({"tricks": {"loss_scale": 2.0}})


def test_options_two_tricks_disagree_on_are_an_error():
    from medtricks.tricks.registry import merged_options

    class A(Trick):
        name = "a"

        def loader_options(self):
            return {"drop_last": True}

    class B(Trick):
        name = "b"

        def loader_options(self):
            return {"drop_last": False}

    from types import SimpleNamespace

    recipe = SimpleNamespace(tricks=None)
    with pytest.raises(ValueError, match="tricks 'a' and 'b' both set 'drop_last'"):
        merged_options([A(recipe, None), B(recipe, None)], "loader_options")


def test_label_smoothing_paper_mode_gives_the_papers_targets():

    from medtricks.train.losses import build_loss
    from medtricks.tricks.label_smoothing import effective_smoothing

    logits = torch.tensor([[2.0, -1.0]])
    target = torch.tensor([0])
    log_p = torch.log_softmax(logits, dim=1)
    paper = build_loss(label_smoothing=effective_smoothing(0.1, "paper", 2))(logits, target)
    assert paper.item() == pytest.approx(-(0.9 * log_p[0, 0] + 0.1 * log_p[0, 1]).item())  # q = (0.9, 0.1)
    torch_form = build_loss(label_smoothing=effective_smoothing(0.1, "torch", 2))(logits, target)
    assert torch_form.item() == pytest.approx(-(0.95 * log_p[0, 0] + 0.05 * log_p[0, 1]).item())  # q = (0.95, 0.05)
    assert effective_smoothing(0.1, "paper", 3) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="at most 0.5"):
        effective_smoothing(0.6, "paper", 2)
    recipe = recipe_from_dict({"tricks": {"label_smoothing": 0.1, "label_smoothing_mode": "paper"}})
    assert "label_smoothing=0.1(paper)" in recipe.tricks_on()


def _recipe_file(tmp_path: Path, plugin: Path) -> Path:
    path = tmp_path / "received.yaml"
    path.write_text(f"base: {QUICKSTART}\nexperiment:\n  plugins: [{plugin}]\n")
    return path


def test_a_recipe_plugin_runs_no_code_without_the_users_opt_in(evil_plugin, tmp_path, capsys):
    plugin, marker = evil_plugin(tmp_path)
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
