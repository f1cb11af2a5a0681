"""Issue 20 item 1: the DRLoc relative-localization loss as a trick -- targets of hand-picked pairs, zero
loss for a perfect predictor, the token grid of ViT (prefix tokens dropped), Swin and CNNs, the features
of the training forward kept without a second pass, the head trained by the run's optimizer and kept out
of the model, a recipe run that resumes exactly, and bad settings refused with their key."""

from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import medtricks.run
from medtricks.errors import ConfigError
from medtricks.recipe import RecipeError, load_recipe
from medtricks.run import run_recipe
from medtricks.rundir import RunDir
from medtricks.tricks.base import TrickContext
from medtricks.tricks.registry import build_tricks
from medtricks.tricks.drloc import (
    Drloc,
    DrlocConfig,
    DrlocHead,
    drloc_loss,
    features_to_grid,
    pair_features,
    relative_targets,
    sample_positions,
    token_grid,
)


ROOT = Path(__file__).resolve().parents[2]
VIT = [
    "model.name=vit_tiny_patch16_224",
    "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "tricks.bn_gamma.strategy=none",
]


def tiny_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=2, in_chans=1, **kw
    )


def _recipe(*extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.image_size=32",
            "tricks.bn_gamma.strategy=none",
            "train.batch_size=4",
            "tricks.drloc.lambda=0.5",
            "tricks.drloc.pairs=16",
            *extra,
        ],
    )


def _trick(recipe, model=None):
    trick = Drloc(
        recipe,
        TrickContext(recipe=recipe, classes=["a", "b"], device=torch.device("cpu"), extras={"updates_per_epoch": 5}),
    )
    if model is not None:
        trick.on_model(model)
        trick.on_fit_start(model)
    return trick


def _coordinate_grid(batch, height, width):
    """A grid whose embedding at (i, j) is (i, j): a perfect offset predictor can read it."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows, cols], dim=-1).float().expand(batch, height, width, 2).clone()


# ---------------------------------------------------------------------------------- the loss
def test_targets_of_hand_picked_pairs_are_the_offsets_normalised_by_the_grid():
    pos1 = torch.tensor([[[0, 0], [3, 1], [2, 2], [3, 4]]])
    pos2 = torch.tensor([[[1, 3], [0, 0], [2, 2], [0, 0]]])
    l1 = relative_targets(pos1, pos2, 4, 5, "l1")
    assert torch.allclose(l1, torch.tensor([[[-1 / 4, -3 / 5], [3 / 4, 1 / 5], [0.0, 0.0], [3 / 4, 4 / 5]]]))
    ce = relative_targets(pos1, pos2, 4, 5, "ce")  # classes 0..2H-2 (rows), 0..2W-2 (columns)
    assert ce.tolist() == [[[2, 1], [6, 5], [3, 4], [6, 8]]]


def test_pair_features_are_the_embeddings_at_the_two_positions():
    grid = _coordinate_grid(2, 3, 4)
    grid[1] += 100  # the second image's embeddings differ
    pos1 = torch.tensor([[[0, 1], [2, 3]], [[1, 1], [0, 0]]])
    pos2 = torch.tensor([[[2, 0], [2, 3]], [[0, 3], [2, 2]]])
    pairs = pair_features(grid, pos1, pos2)
    assert pairs.shape == (2, 2, 4)
    assert pairs[0].tolist() == [[0, 1, 2, 0], [2, 3, 2, 3]]
    assert pairs[1].tolist() == [[101, 101, 100, 103], [100, 100, 102, 102]]


def test_a_perfect_predictor_has_zero_loss_and_a_wrong_one_does_not():
    height, width = 4, 6
    grid = _coordinate_grid(3, height, width)

    def perfect(pairs):  # reads (i, j, k, l) and returns ((i - k) / H, (j - l) / W)
        return torch.stack([(pairs[..., 0] - pairs[..., 2]) / height, (pairs[..., 1] - pairs[..., 3]) / width], -1)

    torch.manual_seed(0)
    assert drloc_loss(grid, perfect, pairs=32, mode="l1").item() == 0.0
    torch.manual_seed(0)
    assert drloc_loss(grid, lambda p: perfect(p) + 0.25, pairs=32, mode="l1").item() == pytest.approx(0.25)

    # the head itself, its forward monkeypatched to the true offsets
    head = DrlocHead(2, (height, width), "l1")
    head.forward = perfect
    torch.manual_seed(1)
    assert drloc_loss(grid, head, pairs=8).item() == 0.0


def test_ce_mode_classifies_each_axis_offset():
    head = DrlocHead(2, (3, 5), "ce")
    rows, cols = head(torch.zeros(2, 7, 4))
    assert rows.shape == (2, 7, 5) and cols.shape == (2, 7, 9)  # 2H-1 and 2W-1 classes
    grid = _coordinate_grid(2, 3, 5)

    def confident(pairs):  # very confident logits at the true classes: loss close to 0
        d_rows = (pairs[..., 0] - pairs[..., 2]).long() + 2
        d_cols = (pairs[..., 1] - pairs[..., 3]).long() + 4
        return (nn.functional.one_hot(d_rows, 5).float() * 50, nn.functional.one_hot(d_cols, 9).float() * 50)

    assert drloc_loss(grid, confident, pairs=16, mode="ce").item() < 1e-6
    assert drloc_loss(grid, head, pairs=16, mode="ce").item() > 1.0  # an untrained head is far off


def test_pairs_come_from_the_global_generator_inside_the_grid():
    torch.manual_seed(5)
    first = sample_positions(4, 3, 7, 50)
    torch.manual_seed(5)
    again = sample_positions(4, 3, 7, 50)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for pos in first:
        assert pos.shape == (4, 50, 2)
        assert pos[..., 0].min() >= 0 and pos[..., 0].max() <= 2 and pos[..., 1].max() <= 6
        assert len(torch.unique(pos[..., 1])) == 7  # every column is drawn


# ---------------------------------------------------------------------------------- the grids
@pytest.mark.parametrize(
    "kw,prefix", [({}, 1), ({"reg_tokens": 2}, 3), ({"class_token": False, "global_pool": "avg"}, 0)]
)
def test_vit_grid_drops_the_prefix_tokens_and_is_the_patch_grid(kw, prefix):
    model = tiny_vit(**kw).eval()
    images = torch.randn(2, 1, 32, 32)
    grid = token_grid(model, images)
    assert grid.shape == (2, 4, 4, 32)  # 32 px / patch 8: the 4 x 4 patch grid, no class token
    tokens = model.forward_features(images)
    assert tokens.shape[1] == 16 + prefix
    assert torch.equal(grid, tokens[:, prefix:].reshape(2, 4, 4, 32))
    assert torch.equal(grid[:, 1, 2], tokens[:, prefix + 1 * 4 + 2])  # row-major: token (row 1, col 2)


def test_swin_features_are_used_as_they_are():
    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 1),
        num_classes=2,
        in_chans=1,
    ).eval()
    images = torch.randn(2, 1, 32, 32)
    grid = token_grid(model, images)
    assert grid.shape == (2, 4, 4, 32)
    assert torch.equal(grid, model.forward_features(images))


def test_cnn_feature_maps_become_channels_last_grids():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2, in_chans=1).eval()
    images = torch.randn(2, 1, 64, 64)
    grid = token_grid(model, images)
    assert grid.shape == (2, 2, 2, 512)
    assert torch.equal(grid, model.forward_features(images).permute(0, 2, 3, 1))


def test_a_model_without_a_grid_is_refused_naming_it():
    recipe = _recipe("model.name=resnet18")
    with pytest.raises(ConfigError, match="tricks.drloc: model 'resnet18' has a 1x1 grid.*at least 2x2"):
        _trick(recipe).on_model(timm.create_model("resnet18", num_classes=2, in_chans=1))  # 32 px -> 1 x 1
    with pytest.raises(ConfigError, match="tricks.drloc: model 'resnet18' has no forward_features"):
        _trick(recipe).on_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))
    with pytest.raises(ConfigError, match="model 'resnet18'.*not a grid of embeddings"):
        features_to_grid(nn.Identity(), torch.zeros(2, 8), name="resnet18")


# ---------------------------------------------------------------------------------- the trick
def test_the_training_forward_features_are_kept_without_a_second_pass():
    model = tiny_vit()
    trick = _trick(_recipe(*VIT), model)
    assert trick.grid == (4, 4) and trick.head.channels == 32
    assert trick.log_params()["drloc.features"] == "hook on norm"
    passes = []
    model.patch_embed.register_forward_hook(lambda *a: passes.append(1))
    images, targets = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    model.train()
    images, targets = trick.transform_batch(images, targets)
    logits = model(images)
    torch.manual_seed(7)
    kept = trick.extra_loss(model, images, targets, logits)
    assert len(passes) == 1  # the training forward only
    assert not model.norm._forward_hooks  # the hook is gone after the training forward
    torch.manual_seed(7)
    again = 0.5 * drloc_loss(token_grid(model, images), trick.head, 16)  # the same pairs on a second pass
    assert kept.item() == pytest.approx(again.item(), rel=1e-6)
    # later passes of other tricks (TRADES, pseudo-labels) in the same batch are not kept
    trick.transform_batch(images, targets)
    model(images)
    model(torch.zeros_like(images))
    assert trick._seen == 1 and torch.equal(trick._captured, model.forward_features(images))


def test_behind_a_learnable_resizer_and_in_ce_mode():
    from medtricks.models.resizer import LearnableResizer, ResizerModel

    recipe = _recipe(
        *VIT,
        "model.resizer.enabled=true",
        "model.resizer.input_size=48",
        "model.resizer.output_size=32",
        "tricks.drloc.mode=ce",
    )
    model = ResizerModel(LearnableResizer(in_chans=1, out_size=32), tiny_vit())
    trick = _trick(recipe, model)
    assert trick.grid == (4, 4) and trick.head.out_rows.out_features == 7
    images, targets = trick.transform_batch(torch.randn(2, 1, 48, 48), torch.tensor([0, 1]))
    model.train()
    loss = trick.extra_loss(model, images, targets, model(images))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.resizer.head[0].weight.grad.abs().sum() > 0  # the resizer learns from the term too


def test_the_head_trains_in_the_runs_optimizer_and_stays_out_of_the_model():
    recipe = _recipe(*VIT, "optim.name=adamw", "optim.lr=0.01", "tricks.no_bias_decay=true", "train.grad_clip=1.0")
    model = tiny_vit()
    tricks = build_tricks(
        recipe,
        TrickContext(recipe=recipe, classes=["a", "b"], device=torch.device("cpu"), extras={"updates_per_epoch": 5}),
    )
    trick = next(t for t in tricks if t.name == "drloc")
    trick.on_model(model)
    trick.on_fit_start(model)
    assert set(trick.extra_modules()) == {"drloc_head"}
    opt = medtricks.run.prepare.build_optimization(recipe, model, tricks, updates_per_epoch=5)
    head_params = set(trick.head.parameters())
    in_optimizer = {p for group in opt.optimizer.param_groups for p in group["params"]}
    assert head_params <= in_optimizer and set(model.parameters()) <= in_optimizer
    assert len(in_optimizer) == len(head_params) + len(list(model.parameters()))
    decay = {id(p): g["weight_decay"] for g in opt.optimizer.param_groups for p in g["params"]}
    assert {decay[id(p)] for p in trick.head.parameters()} == {0.0, 1e-4}  # no-bias-decay applies to the head
    assert not any("trunk" in k or "drloc" in k for k in model.state_dict())  # export never sees the head
    before = [p.detach().clone() for p in trick.head.parameters()]
    images, targets = trick.transform_batch(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1]))
    model.train()
    loss = trick.extra_loss(model, images, targets, model(images))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trick.head.parameters())
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the backbone learns from the term too
    opt.optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trick.head.parameters()))


def test_state_dict_restores_the_head():
    recipe = _recipe(*VIT, "optim.name=adamw", "optim.lr=0.01")
    model = tiny_vit()
    trick = _trick(recipe, model)
    with torch.no_grad():
        for p in trick.head.parameters():
            p.add_(1.0)
    state = trick.state_dict()
    assert set(state) == {"head"}  # the head's optimizer state lives in the run's optimizer (last.pt)
    other = _trick(recipe, tiny_vit())
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(trick.head.state_dict().values(), other.head.state_dict().values()))
    pending = Drloc(recipe, TrickContext(recipe=recipe, classes=["a", "b"], device=torch.device("cpu")))
    pending.load_state_dict(state)  # before the head exists (resume order): applied in on_fit_start
    fresh = tiny_vit()
    pending.on_model(fresh)
    pending.on_fit_start(fresh)
    assert all(torch.equal(a, b) for a, b in zip(trick.head.state_dict().values(), pending.head.state_dict().values()))
    # the head starts from the experiment seed, whatever the global RNG says
    torch.manual_seed(123)
    a = _trick(recipe, tiny_vit())
    torch.manual_seed(456)
    b = _trick(recipe, tiny_vit())
    assert all(torch.equal(x, y) for x, y in zip(a.head.parameters(), b.head.parameters()))


def test_a_recipe_trains_with_drloc_tags_it_and_resumes_exactly(
    tiny_recipe, killed_then_resumed, tmp_path, monkeypatch
):
    extra = [*VIT, "tricks.drloc.lambda=0.1", "tricks.drloc.pairs=8", "tricks.ema=true"]
    full = run_recipe(tiny_recipe(tmp_path, *extra), quiet=True)
    assert "drloc=0.1" in full.tracker.tags["tricks"]
    assert full.tracker.params["drloc.grid"] == "4x4"
    assert full.tracker.params["drloc.features"] == "hook on norm"  # no second forward pass
    assert all(h["train/drloc_loss"] > 0 for h in full.history)
    saved = [p for p in (RunDir(full.run_dir).best_checkpoint, RunDir(full.run_dir).model_state) if p.is_file()]
    assert saved
    for path in saved:  # the best model and the exported state: the model's keys only, no DRLoc head
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        assert not any("trunk" in k or k.startswith("out") for k in state)
    resumed = killed_then_resumed(
        monkeypatch, tiny_recipe(tmp_path, *extra, f"experiment.output_dir={tmp_path / 'r2'}")
    )
    assert [h["train/epoch_loss"] for h in resumed.history] == pytest.approx(
        [h["train/epoch_loss"] for h in full.history], abs=1e-6
    )
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)


# ---------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "override,key",
    [
        ("tricks.drloc.pairs=0", "tricks.drloc.pairs"),
        ("tricks.drloc.lambda=-0.1", "tricks.drloc.lambda"),
        ("tricks.drloc.mode=l2", "tricks.drloc.mode"),
        ("tricks.drloc.lambda=true", "tricks.drloc.lambda"),
    ],
)
def test_bad_settings_are_refused_with_the_key(override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        _recipe(override)


def test_off_by_default_tags_ablation_name_and_the_shipped_recipe():
    from medtricks.ablation.variants import trick_overrides
    from medtricks.recipe import dump_recipe
    from medtricks.posthoc.load import build_model
    from medtricks.tricks.registry import ablation_names

    plain = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert plain.tricks.drloc.weight == 0 and not any(t.startswith("drloc") for t in plain.tricks_on())
    assert DrlocConfig().weight == 0.0
    assert "drloc=0.5" in _recipe().tricks_on() and "drloc=0.5(ce)" in _recipe("tricks.drloc.mode=ce").tricks_on()
    assert trick_overrides("drloc") == ["tricks.drloc.lambda=0.1"]
    assert trick_overrides("drloc=0.3") == ["tricks.drloc.lambda=0.3"]
    assert ablation_names()["drloc"].key == "tricks.drloc.lambda"

    shipped = load_recipe(ROOT / "recipes" / "vit_tiny_drloc.yaml")
    assert "lambda: 0.1" in dump_recipe(shipped)  # the resolved recipe says lambda, and reloads
    assert shipped.model.weights == "none" and shipped.optim.name == "adamw"
    assert "drloc=0.1" in shipped.tricks_on()
    model, _ = build_model(shipped, num_classes=2)
    trick = Drloc(shipped, TrickContext(recipe=shipped, classes=["a", "b"], device=torch.device("cpu")))
    trick.on_model(model)
    assert trick.grid == (8, 8) and trick.head.channels == 192
