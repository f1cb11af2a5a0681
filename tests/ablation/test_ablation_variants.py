"""Ablation variants: cumulative / one-at-a-time / grid generation, validation, child recipes, ids."""

from pathlib import Path

import pytest

from medtricks.ablation.runner import ablation_id, child_recipe
from medtricks.ablation.variants import make_variants, trick_overrides, variant_recipe
from medtricks.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = [
    "data.synth.n=60",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=50",
    "train.progress=false",
]


@pytest.fixture
def base():
    return load_recipe(RECIPES / "paper_baseline.yaml", overrides=TINY)


def test_trick_specs_map_to_recipe_keys():
    assert trick_overrides("warmup") == ["schedule.warmup_epochs=1"]
    assert trick_overrides("warmup=2") == ["schedule.warmup_epochs=2"]
    assert trick_overrides("cosine") == ["schedule.name=cosine"]
    assert trick_overrides("label_smoothing=0.1") == ["tricks.label_smoothing=0.1"]
    assert trick_overrides("no_bias_decay") == ["tricks.no_bias_decay=true"]
    assert trick_overrides("bn_gamma=zero_late") == ["tricks.bn_gamma.strategy=zero_late"]
    assert trick_overrides("mixup=0.2") == ["tricks.mixup_alpha=0.2"]
    assert trick_overrides("ema") == ["tricks.ema=true"]
    assert trick_overrides("linear_scaling") == ["optim.linear_scaling=true"]
    assert trick_overrides("optim.lr=0.05") == ["optim.lr=0.05"]
    with pytest.raises(ValueError, match="needs a value"):
        trick_overrides("bn_gamma")
    with pytest.raises(ValueError, match="unknown trick 'warmpu'"):
        trick_overrides("warmpu")


def test_cumulative_adds_each_trick_on_top(base):
    variants = make_variants(base, ["warmup", "cosine", "bn_gamma=zero_late"])
    assert [name for name, _ in variants] == [
        "baseline",
        "+warmup",
        "+warmup +cosine",
        "+warmup +cosine +bn_gamma=zero_late",
    ]
    assert variants[0][1] == []
    assert variants[3][1] == ["schedule.warmup_epochs=1", "schedule.name=cosine", "tricks.bn_gamma.strategy=zero_late"]
    last = variant_recipe(base, variants[3][1])
    assert (last.schedule.warmup_epochs, last.schedule.name, last.tricks.bn_gamma.strategy) == (
        1,
        "cosine",
        "zero_late",
    )
    assert base.schedule.name == "step"  # the base recipe is not changed


def test_a_bundle_is_one_step_of_the_table(base):
    variants = make_variants(base, ["warmup+cosine+label_smoothing=0.1", "bn_gamma=zero_late"])
    assert [name for name, _ in variants] == [
        "baseline",
        "+warmup+cosine+label_smoothing=0.1",
        "+warmup+cosine+label_smoothing=0.1 +bn_gamma=zero_late",
    ]
    assert variants[1][1] == ["schedule.warmup_epochs=1", "schedule.name=cosine", "tricks.label_smoothing=0.1"]
    assert trick_overrides("optim.lr=1e+3") == ["optim.lr=1e+3"]  # '+' inside a value is not a bundle
    with pytest.raises(ValueError, match="sets \\['schedule.warmup_epochs'\\] twice"):
        trick_overrides("warmup+warmup=2")
    with pytest.raises(ValueError, match="unknown trick 'warmpu'"):
        trick_overrides("cosine+warmpu")


def test_one_at_a_time_changes_one_thing(base):
    variants = make_variants(base, ["warmup", "label_smoothing=0.1", "bn_gamma=zero_all"], mode="one_at_a_time")
    assert variants == [
        ("baseline", []),
        ("+warmup", ["schedule.warmup_epochs=1"]),
        ("+label_smoothing=0.1", ["tricks.label_smoothing=0.1"]),
        ("+bn_gamma=zero_all", ["tricks.bn_gamma.strategy=zero_all"]),
    ]


def test_grid_is_full_factorial_with_alternative_levels(base):
    variants = make_variants(base, ["warmup", "bn_gamma=zero_late", "bn_gamma=zero_all"], mode="grid")
    names = [n for n, _ in variants]
    # warmup on/off x bn_gamma {off, zero_late, zero_all}: the two bn_gamma values never combine
    assert names == [
        "baseline",
        "+warmup",
        "+bn_gamma=zero_late",
        "+bn_gamma=zero_all",
        "+warmup +bn_gamma=zero_late",
        "+warmup +bn_gamma=zero_all",
    ]
    assert len(make_variants(base, ["warmup", "cosine", "ema"], mode="grid")) == 8
    with pytest.raises(ValueError, match="variants"):
        make_variants(base, ["warmup", "cosine", "ema", "no_bias_decay", "mixup", "label_smoothing"], mode="grid")


def test_bad_input_is_named(base):
    with pytest.raises(RecipeError, match="variant '\\+bn_gamma=zero_lat'.*zero_lat"):
        make_variants(base, ["bn_gamma=zero_lat"])
    with pytest.raises(ValueError, match="mode must be one of"):
        make_variants(base, ["warmup"], mode="pairs")
    with pytest.raises(ValueError, match="at least one trick"):
        make_variants(base, [])
    with pytest.raises(ValueError, match="more than once"):
        make_variants(base, ["warmup", "warmup"])
    # paper_baseline already scales the lr linearly: that "trick" would train the baseline twice
    with pytest.raises(ValueError, match="exactly the same recipe as 'baseline'"):
        make_variants(base, ["linear_scaling"])


def test_child_recipe_sets_only_the_seed_and_its_folder(base):
    child = child_recipe(
        base, ["schedule.warmup_epochs=1"], seed=3, variant="+warmup", variant_index=1, ablation="abc123"
    )
    assert child.experiment.seed == 3 and child.schedule.warmup_epochs == 1
    assert child.data.split_seed == base.data.split_seed and child.data.synth == base.data.synth
    assert "ablation-abc123" in child.experiment.output_dir and child.experiment.output_dir.endswith("seed3")
    assert child.tracking.run_name == "+warmup | seed 3"


def test_ablation_id_ignores_seed_and_tracking_but_not_training(base):
    aid = ablation_id(base, ["warmup"], "cumulative")
    assert len(aid) == 12
    other = base.model_copy(deep=True)
    other.experiment.seed = 7
    other.tracking.uri = "sqlite:///elsewhere.db"
    other.train.progress = True
    assert ablation_id(other, ["warmup"], "cumulative") == aid
    assert ablation_id(base, ["warmup"], "one_at_a_time") != aid
    assert ablation_id(base, ["warmup", "cosine"], "cumulative") != aid
    lr = base.model_copy(deep=True)
    lr.optim.lr = 0.01
    assert ablation_id(lr, ["warmup"], "cumulative") != aid


def test_settings_merge_cli_over_recipe_over_defaults(base):
    from medtricks.ablation.runner import ablation_settings

    assert ablation_settings(base, tricks="warmup, bn_gamma=zero_late") == {
        "tricks": ["warmup", "bn_gamma=zero_late"],
        "seeds": 5,
        "mode": "cumulative",
        "metric": "val/auroc",
        "jobs": 1,
        "test": "t",
        "executor": "local",
        "address": None,
        "cpus_per_run": 1.0,
        "gpus_per_run": 0.0,
        "retries": 2,
    }
    with pytest.raises(ValueError, match="no tricks to ablate"):
        ablation_settings(base)
    with_section = base.model_copy()
    object.__setattr__(with_section, "ablation", {"tricks": ["ema"], "seeds": 3, "mode": "grid"})
    settings = ablation_settings(with_section, seeds=2)
    assert (settings["tricks"], settings["seeds"], settings["mode"]) == (["ema"], 2, "grid")
    object.__setattr__(with_section, "ablation", {"tricks": ["ema"], "seed": 3})
    with pytest.raises(ValueError, match="unknown key.*seed"):
        ablation_settings(with_section)


def test_ablation_id_survives_keys_left_at_their_default(base):
    """A release that adds a key (off by default) must not orphan an ablation: keys at their schema
    default stay out of the id, a key set to anything else enters it."""
    from medtricks.recipe import Recipe, recipe_digest

    aid = ablation_id(base, ["warmup"], "cumulative")
    data = base.model_dump(mode="json")
    data["model"]["vit"] = {"spt": False, "lsa": False}  # written out at its default
    data["train"]["cache_frozen"] = None
    assert ablation_id(Recipe.model_validate(data), ["warmup"], "cumulative") == aid
    data["model"]["vit"] = {"spt": False, "lsa": True}
    assert ablation_id(Recipe.model_validate(data), ["warmup"], "cumulative") != aid
    assert recipe_digest(base) != recipe_digest(base, tricks=["warmup"])
