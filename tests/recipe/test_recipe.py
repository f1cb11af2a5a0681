"""Recipe loading, inheritance, overrides and error messages; strict YAML (duplicate keys, aliases, booleans as
numbers, non-UTF-8), seeds in range, run names inside the output folder, the tie-break key."""

import sys
import time
from pathlib import Path

import pytest

from medtricks.cli import main
from medtricks.data import load_card
from medtricks.errors import ConfigError
from medtricks.logged_params import run_params
from medtricks.recipe import RecipeError, apply_overrides, dump_recipe, flatten_recipe, load_recipe, recipe_from_dict
from medtricks.run import run_recipe
from medtricks.rundir import RunDir

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ROOT = RECIPES.parent
QUICKSTART = str(RECIPES / "quickstart.yaml")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_recipe_validates():
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.experiment.name


def test_base_inheritance_is_relative_and_deep_merged(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", "optim: {lr: 0.2, momentum: 0.8}\ntrain: {epochs: 7}\n")
    child = _write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\noptim: {lr: 0.05}\n")
    recipe = load_recipe(child)
    assert recipe.optim.lr == 0.05
    assert recipe.optim.momentum == 0.8  # kept from the base: deep merge
    assert recipe.train.epochs == 7


def test_quickstart_inherits_chain():
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert recipe.optim.name == "nesterov"  # from paper_baseline
    assert recipe.schedule.name == "cosine"  # from bag_of_tricks
    assert recipe.tricks.label_smoothing == 0.1
    assert recipe.tricks.bn_gamma.strategy == "zero_late"  # its own


def test_overrides_coerce_types(tmp_path):
    path = _write(tmp_path / "r.yaml", "train: {epochs: 2}\n")
    recipe = load_recipe(
        path,
        overrides=[
            "optim.lr=0.05",
            "tricks.label_smoothing=0.1",
            "tricks.no_bias_decay=true",
            "schedule.milestones=[2, 4]",
            "model.layer_decay=null",
            "data.synth.n=40",
        ],
    )
    assert recipe.optim.lr == pytest.approx(0.05)
    assert recipe.tricks.label_smoothing == pytest.approx(0.1)
    assert recipe.tricks.no_bias_decay is True
    assert recipe.schedule.milestones == [2, 4]
    assert recipe.data.synth.n == 40


def test_unknown_key_names_key_section_and_closest(tmp_path):
    path = _write(tmp_path / "r.yaml", "optim: {learning_rate: 0.1, lr: 0.1}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "learning_rate" in text and "'optim'" in text and "r.yaml" in text
    path = _write(tmp_path / "r2.yaml", "trick: {label_smoothing: 0.1}\n")
    with pytest.raises(RecipeError, match="did you mean 'tricks'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="did you mean 'lr'"):
        load_recipe(tmp_path / "r2.yaml" if False else _write(tmp_path / "r3.yaml", ""), overrides=["optim.lrr=1"])


def test_unknown_key_inside_nested_rule():
    with pytest.raises(RecipeError, match="valu"):
        recipe_from_dict({"tricks": {"bn_gamma": {"strategy": "rules", "rules": [{"valu": 0.0}]}}})


def test_bad_value_names_key_value_and_allowed(tmp_path):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"optim": {"name": "adam"}}, source="x.yaml")
    text = str(info.value)
    assert "optim.name" in text and "'adam'" in text and "nesterov" in text
    with pytest.raises(RecipeError, match="optim.lr = -1"):
        recipe_from_dict({"optim": {"lr": -1}})
    with pytest.raises(RecipeError, match="train.device"):
        recipe_from_dict({"train": {"device": "gpu"}})


def test_malformed_override_and_missing_base(tmp_path):
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(RecipeError, match="not a section"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])
    path = _write(tmp_path / "r.yaml", "base: nope.yaml\n")
    with pytest.raises(RecipeError, match="nope.yaml"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_inheritance_cycle_is_reported(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_rules_require_rules_strategy():
    with pytest.raises(RecipeError, match="strategy"):
        recipe_from_dict({"tricks": {"bn_gamma": {"strategy": "zero_late", "rules": [{"value": 1.0}]}}})


def test_flatten_holds_every_knob():
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    flat = flatten_recipe(recipe)
    assert flat["optim.lr"] == recipe.optim.lr
    assert flat["tricks.bn_gamma.strategy"] == "zero_late"
    assert flat["model.resizer.enabled"] is False
    assert all("." in key for key in flat)


def test_a_shipped_recipe_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
    from medtricks.recipe import find_recipe, load_recipe

    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart").name == "quickstart.yaml"
    assert load_recipe("quickstart.yaml").experiment.name == "quickstart"
    with pytest.raises(RecipeError, match="shipped: .*quickstart"):
        load_recipe("quikstart")


def test_installed_copies_are_used_without_a_checkout(tmp_path, monkeypatch):
    """A regular (non-editable) install reads cards and recipes from <prefix>/share/medtricks."""

    import medtricks.data.cards as cards
    import medtricks.recipe.load as recipe_module

    share = tmp_path / "prefix" / "share" / "medtricks"
    (share / "data_cards").mkdir(parents=True)
    (share / "recipes").mkdir()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(cards, "__file__", str(tmp_path / "site" / "medtricks" / "data" / "cards.py"))
    monkeypatch.setattr(recipe_module, "__file__", str(tmp_path / "site" / "medtricks" / "recipe" / "load.py"))
    monkeypatch.delenv("MEDTRICKS_CARDS_DIR", raising=False)
    assert cards.cards_dir() == share / "data_cards"
    assert recipe_module.shipped_recipes_dir() == share / "recipes"


def _sections(model, prefix=""):
    """(dotted key, field) of every key of ``model`` and of the sections nested in it, ``tricks`` left out."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        if not prefix and name == "tricks":  # each trick's keys are the trick's (medtricks/tricks/)
            continue
        yield prefix + name, field
        for sub in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _sections(sub, f"{prefix}{name}.")


def test_every_recipe_key_says_what_it_means():
    """The recipe reference's "meaning" column is the fields' descriptions: none may be missing."""
    from medtricks.recipe import Recipe

    keys = dict(_sections(Recipe))
    assert {"experiment.seed", "data.synth.n", "model.resizer.enabled", "ablation.retries"} <= set(keys)
    missing = sorted(key for key, field in keys.items() if not (field.description or "").strip())
    assert not missing, f"recipe keys without a description (Field(description=...)): {missing}"


# ---- item 2: experiment.name names one folder inside experiment.output_dir
@pytest.mark.parametrize(
    "name", ["../../x", "a/../../x", "/tmp/elsewhere", "..", ".", ".hidden", "a\\..\\b", "a/b", ""]
)
def test_a_run_name_that_leaves_the_output_folder_is_refused_at_validation(tiny_recipe, tmp_path, name):
    with pytest.raises(
        RecipeError,
        match=r"experiment\.name = "
        + repr(name).replace("\\", "\\\\").replace(".", r"\.").replace("/", r"/")
        + r".*cannot name a run folder",
    ):
        tiny_recipe(tmp_path, f"experiment.name={name}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_a_bad_run_name_fails_dry_run_too_and_plain_names_pass(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "run",
                str(ROOT / "recipes" / "quickstart.yaml"),
                "--dry-run",
                "--set",
                "experiment.name=../../x",
                "--set",
                f"experiment.output_dir={tmp_path / 'runs'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "experiment.name" in err and "'../../x'" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no store, nothing
    assert tiny_recipe(tmp_path, "experiment.name=kermany_v2-seed.3").experiment.name == "kermany_v2-seed.3"
    with pytest.raises(ConfigError, match="cannot name a run folder"):  # the folder layer refuses as well
        RunDir.create(tmp_path / "runs", "../x")


def test_the_tie_break_is_in_the_resolved_recipe_the_logged_params_and_checked(tiny_recipe, tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert (recipe.train.best_tiebreak, recipe.train.best_tiebreak_mode) == ("val/loss", "min")
    assert "best_tiebreak: val/loss" in dump_recipe(recipe) and "best_tiebreak_mode: min" in dump_recipe(recipe)
    assert run_params(recipe)["train.best_tiebreak"] == "val/loss"
    with pytest.raises(ConfigError, match=r"train.best_tiebreak 'val/los' .*did you mean 'val/loss'"):
        run_recipe(tiny_recipe(tmp_path, "train.best_tiebreak=val/los"), quiet=True)
    assert not (tmp_path / "runs").exists()
    assert tiny_recipe(tmp_path, "train.best_tiebreak=null").train.best_tiebreak is None


# ------------------------------------------------------------------------------- 13. strict YAML
def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_recipe_duplicate_keys_are_refused_with_key_and_lines(tmp_path):
    path = _recipe(tmp_path, "train:\n  epochs: 1\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'epochs' \(first on line 2, again on line 4\)"):
        load_recipe(path)


def test_recipe_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    # Each level repeats the one before 9 times: 9**6 leaves from ~400 bytes (9**9 gave a 351 MB message).
    lines = ["experiment:", "  tags:", "    a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcde", "bcdef"):
        lines.append(f"    {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = _recipe(tmp_path, "\n".join(lines) + "\n")
    assert path.stat().st_size < 500
    start = time.monotonic()
    with pytest.raises(RecipeError, match="anchors and aliases are not allowed in a recipe") as err:
        load_recipe(path)
    assert time.monotonic() - start < 5 and len(str(err.value)) < 1000
    assert "line 3" in str(err.value)


def test_values_echoed_in_recipe_errors_are_capped():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"data": {"val_fraction": "9" * 200_000 + "x"}})
    assert "data.val_fraction" in str(err.value) and len(str(err.value)) < 2000


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "batch_size", True),
        ("train", "epochs", False),
        ("model", "in_chans", True),
        ("optim", "lr", True),
        ("train", "max_steps_per_epoch", True),
        ("optim", "betas", [0.9, True]),
        ("ablation", "seeds", True),
    ],
)
def test_booleans_are_refused_for_number_fields(section, key, value):
    with pytest.raises(RecipeError, match=rf"{section}\.{key} = .*boolean"):
        recipe_from_dict({section: {key: value}})


def test_numbers_lists_and_booleans_still_validate_where_they_belong():
    recipe = recipe_from_dict(
        {
            "optim": {"lr": 1, "betas": [1, 0]},
            "train": {"batch_size": 4, "progress": False},
            "ablation": {"seeds": [0, 1]},
            "model": {"in_chans": 3},
        }
    )
    assert recipe.optim.lr == 1.0 and recipe.optim.betas == (1.0, 0.0) and recipe.train.batch_size == 4
    assert recipe.train.progress is False and recipe.model.in_chans == 3


def test_shipped_recipes_and_cards_load_with_the_strict_loader():
    root = Path(__file__).resolve().parents[2]
    recipes = [load_recipe(path) for path in sorted((root / "recipes").glob("*.yaml"))]
    cards = [load_card(path) for path in sorted((root / "data_cards").glob("*.yaml"))]
    assert len(recipes) >= 10 and all(r.experiment.name for r in recipes)
    assert len(cards) >= 3 and all(c.classes for c in cards)


# ---- item 13: seeds and devices
@pytest.mark.parametrize(
    "key,value",
    [
        ("experiment.seed", -1),
        ("experiment.seed", 2**32),
        ("experiment.seed", 10**30),
        ("data.split_seed", -1),
        ("data.synth.seed", 2**40),
        ("ablation.seeds", [0, -3]),
    ],
)
def test_a_seed_out_of_range_fails_the_dry_run(capsys, key, value):
    assert main(["run", QUICKSTART, "--set", f"{key}={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err
        and key in err
        and ("2**32" in err or str(2**32) in err or ">= 0" in err or "greater than or equal to 0" in err)
    )


def test_the_largest_seed_is_accepted():
    recipe = load_recipe(QUICKSTART, overrides=[f"experiment.seed={2**32 - 1}", f"data.split_seed={2**32 - 1}"])
    assert recipe.experiment.seed == 2**32 - 1
    from medtricks.ablation.runner import _resolve_seeds

    with pytest.raises(ConfigError, match="2\\*\\*32"):
        _resolve_seeds(3, 2**32 - 2)  # the children's seeds would pass the limit


# ---- item 17: advice that can be followed
def test_non_utf8_and_deeply_nested_recipes_are_one_line_naming_the_file(one_line_error, tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("experiment:\n  name: café\n".encode("latin-1"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("experiment: " + "[" * 10000 + "]" * 10000 + "\n")
    for path, words in ((latin1, "not UTF-8"), (deep, "nested deeper than")):
        with pytest.raises(RecipeError, match=words) as err:
            load_recipe(path)
        assert str(path) in str(err.value)
        assert main(["run", str(path), "--dry-run"]) == 2
        assert words in one_line_error(capsys)
