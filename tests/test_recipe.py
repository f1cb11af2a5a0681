"""Recipe loading, inheritance, overrides and error messages."""

from pathlib import Path

import pytest

from medtricks.recipe import RecipeError, apply_overrides, flatten_recipe, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


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
    import sys

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
