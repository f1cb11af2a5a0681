"""Common random numbers (issue 28): the variants of one seed see the same first batch (images, labels,
augmentations, order) and start from the same new head, whatever the tricks build or draw; another seed
sees another batch. A probe trick records the first training batch as the engine hands it over (before any
other trick's transform_batch) and the head at on_fit_start, then stops the run."""

import hashlib
from pathlib import Path

import pytest
import torch
from pydantic import Field

import medtricks.run
from medtricks.ablation.variants import trick_overrides
from medtricks.recipe import load_recipe
from medtricks.tricks.base import Trick, register_trick, unregister_trick


class _Stop(Exception):
    pass


SEEN: dict = {}


class CrnProbe(Trick):
    name = "crn_probe"
    order = -10_000  # before every other trick's transform_batch (mixup would change the images)
    fields = {"crn_probe": (str, Field(""))}

    @classmethod
    def tags(cls, recipe):
        return ["crn_probe"] if recipe.tricks.crn_probe else []

    def on_fit_start(self, model):
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        SEEN.setdefault(self.config.crn_probe, {})["head"] = [p.detach().clone() for p in head.parameters()]

    def transform_batch(self, images, targets):
        digest = hashlib.sha256(images.detach().cpu().numpy().tobytes() + targets.cpu().numpy().tobytes()).hexdigest()
        SEEN[self.config.crn_probe]["batch"] = digest
        raise _Stop


@pytest.fixture
def probe():
    register_trick(CrnProbe)
    SEEN.clear()
    yield SEEN
    unregister_trick("crn_probe")


def _first_batch(tmp_path, key: str, seed: int, overrides: list[str]) -> dict:
    recipe = load_recipe(
        Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=48",
            "data.synth.size=32",
            "data.image_size=32",
            f"data.root={tmp_path / 'phantoms'}",
            "model.name=resnet10t",
            "model.weights=none",
            "train.epochs=2",
            "train.batch_size=8",
            "train.progress=false",
            "tracking.backend=none",
            f"experiment.output_dir={tmp_path / 'runs' / key}",
            "tricks.bn_gamma.strategy=none",
            f"experiment.seed={seed}",
            f"tricks.crn_probe={key}",
            *overrides,
        ],
    )
    with pytest.raises(_Stop):
        medtricks.run.run_recipe(recipe, quiet=True)
    return SEEN[key]


VARIANTS = {
    "baseline": [],
    "reinit_late": trick_overrides("reinit_late"),  # draws thousands of numbers in on_model
    "zero_late": trick_overrides("bn_gamma=zero_late"),
    "label_smoothing": ["tricks.label_smoothing=0.0"],
    "mixup": ["tricks.mixup_alpha=0.2"],  # draws on every batch (after the probe)
}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_variants_of_one_seed_share_first_batch_and_head(tmp_path, probe, monkeypatch):
    # A variant whose model construction draws random numbers before the head is made (a different stem,
    # an extra module built first) must not shift the head: it is drawn from its own derived seed.
    real_build = medtricks.run.build_model

    def build(recipe, num_classes):
        if recipe.tricks.crn_probe.startswith("draws_first"):
            torch.randn(12345)
        return real_build(recipe, num_classes=num_classes)

    monkeypatch.setattr(medtricks.run.prepare, "build_model", build)
    seen = {name: _first_batch(tmp_path, f"{name}-0", 0, o) for name, o in VARIANTS.items()}
    seen["draws_first"] = _first_batch(tmp_path, "draws_first-0", 0, [])
    other = _first_batch(tmp_path, "baseline-1", 1, [])

    batches = {name: s["batch"] for name, s in seen.items()}
    assert len(set(batches.values())) == 1, batches  # images and labels hash equal across variants of seed 0
    assert other["batch"] != seen["baseline"]["batch"]  # another seed, another draw
    ref = seen["baseline"]["head"]
    for name, s in seen.items():
        assert all(torch.equal(a, b) for a, b in zip(ref, s["head"])), name
    assert not all(torch.equal(a, b) for a, b in zip(ref, other["head"]))


def test_a_new_head_after_a_pretrained_load_keeps_pytorchs_default_scale():
    """The common-random-numbers redraw must not change the head's distribution: after a pretrained load
    timm makes a plain nn.Linear (std ~ 1/sqrt(3 fan_in)); EfficientNet's constructor init is ~20x wider
    and wrecked the quickstart (val accuracy 0.93 -> 0.67)."""
    import math

    from medtricks.models.reinit import init_new_head
    from medtricks.recipe import load_recipe
    from medtricks.posthoc.load import build_model

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")
    model, _ = build_model(recipe, num_classes=3)
    assert model.medtricks_info["head"] == "new"
    assert init_new_head(model, 0) == ["classifier"]
    expected = 1 / math.sqrt(3 * model.classifier.in_features)
    assert abs(float(model.classifier.weight.std()) - expected) < 0.2 * expected
