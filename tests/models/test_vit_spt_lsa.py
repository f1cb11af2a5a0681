"""Issue 32 item 1: Shifted Patch Tokenization and Locality Self-Attention (Lee, Lee & Song 2021) for timm
ViTs -- exact half-patch diagonal shifts, token count and dimensions, the LayerNorm before the projection, a
self-attention weight of exactly 0, a learnable temperature that trains, forward == the attention weights
it exposes, create_model/recipe wiring (model.vit), and clear refusals (a ResNet, pretrained SPT, a typo)."""

from pathlib import Path

import pytest
import timm
import torch

from medtricks.chained import ParentRun, _check_fits
from medtricks.errors import ConfigError
from medtricks.logged_params import run_params
from medtricks.models import LocalitySelfAttention, ShiftedPatchEmbed, create_model
from medtricks.models.vit_locality import SHIFT_DIRECTIONS, use_locality_attention
from medtricks.recipe import RecipeError, load_recipe
from medtricks.posthoc.load import build_model

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def _tiny(*extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml", overrides=["model.weights=none", "tricks.bn_gamma.strategy=none", *extra]
    )


# ---------------------------------------------------------------------------------- SPT
def test_shifts_move_a_bright_pixel_half_a_patch_in_each_diagonal_direction():
    spt = ShiftedPatchEmbed(img_size=8, patch_size=4, in_chans=1, embed_dim=6)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 1.0
    shifted = spt.shifted(x)
    assert shifted.shape == (1, 5, 8, 8)
    expected = {"left-up": (1, 2), "right-up": (1, 6), "left-down": (5, 2), "right-down": (5, 6)}
    assert list(SHIFT_DIRECTIONS) == list(expected)  # the channel order of [x, s1..s4]
    assert torch.equal(shifted[0, 0], x[0, 0])
    for channel, (row, col) in enumerate(expected.values(), start=1):
        want = torch.zeros(8, 8)
        want[row, col] = 1.0
        assert torch.equal(shifted[0, channel], want), list(expected)[channel - 1]
    # zero padded: a pixel shifted out of the frame is gone (no wrap-around), zeros come in
    corner = torch.zeros(1, 1, 8, 8)
    corner[0, 0, 0, 0] = 1.0
    out = spt.shifted(corner)
    assert out[0, 1].sum() == 0 and out[0, 2].sum() == 0 and out[0, 3].sum() == 0 and out[0, 4, 2, 2] == 1


def test_channels_are_shifted_together_and_stacked_image_first():
    spt = ShiftedPatchEmbed(img_size=8, patch_size=4, in_chans=2, embed_dim=6)
    x = torch.zeros(1, 2, 8, 8)
    x[0, 1, 4, 4] = 1.0  # the second channel only
    shifted = spt.shifted(x)
    assert shifted.shape == (1, 10, 8, 8)
    assert [tuple(torch.nonzero(shifted[0, c]).flatten().tolist()) for c in range(10)] == [
        (),
        (4, 4),
        (),
        (2, 2),
        (),
        (2, 6),
        (),
        (6, 2),
        (),
        (6, 6),
    ]


def test_tokens_count_dims_and_the_layernorm_comes_before_the_projection():
    torch.manual_seed(0)
    spt = ShiftedPatchEmbed(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=12)
    x = torch.randn(2, 3, 16, 24)
    assert spt.num_patches == (16 // 8) * (24 // 8) == 6 and spt.grid_size == (2, 3)
    assert spt.patch_dim == 8 * 8 * 5 * 3
    patches = spt.patch_tokens(x)
    assert patches.shape == (2, 6, 8 * 8 * 5 * 3)
    # patch (row 1, col 2) holds its pixels row, column, channel first-to-last
    shifted = spt.shifted(x)
    r, c, ch = 3, 5, 7
    assert patches[1, 1 * 3 + 2, (r * 8 + c) * 15 + ch] == shifted[1, ch, 8 + r, 16 + c]
    with torch.no_grad():
        spt.patch_norm.weight.uniform_(0.5, 1.5)
        spt.patch_norm.bias.uniform_(-0.1, 0.1)
    tokens = spt(x)
    assert tokens.shape == (2, 6, 12)
    normed = torch.nn.functional.layer_norm(patches, (spt.patch_dim,), spt.patch_norm.weight, spt.patch_norm.bias)
    assert torch.allclose(tokens, normed @ spt.proj.weight.T + spt.proj.bias, atol=1e-5)
    assert spt.feat_ratio() == 8 and spt.dynamic_feat_size((17, 24)) == (2, 3)
    with pytest.raises(ValueError, match="does not match"):
        spt(torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="patch size"):
        spt.set_input_size(patch_size=4)


# ---------------------------------------------------------------------------------- LSA
def _lsa(**kw):
    torch.manual_seed(0)
    return LocalitySelfAttention(16, num_heads=4, qkv_bias=True, **kw).eval()


def test_self_attention_weight_is_exactly_zero_for_every_token_head_and_image():
    lsa = _lsa()
    probs = lsa.attention_probs(torch.randn(3, 7, 16))
    assert probs.shape == (3, 4, 7, 7)
    assert torch.equal(torch.diagonal(probs, dim1=-2, dim2=-1), torch.zeros(3, 4, 7))
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 7))
    assert (probs + torch.eye(7) > 0).all()  # every other token keeps some weight


def test_the_temperature_is_a_learnable_scale_initialised_to_one_over_sqrt_head_dim():
    lsa = _lsa()
    assert isinstance(lsa.scale, torch.nn.Parameter) and lsa.scale.ndim == 0
    assert lsa.scale.item() == pytest.approx(4**-0.5)
    assert "scale" in dict(lsa.named_parameters())
    lsa(torch.randn(2, 5, 16)).square().sum().backward()
    assert lsa.scale.grad is not None and lsa.scale.grad.abs() > 0
    with torch.no_grad():
        lsa.scale.zero_()  # tau -> infinity: uniform weight on the *other* tokens
    probs = lsa.attention_probs(torch.randn(1, 5, 16))
    assert torch.allclose(probs, (1 - torch.eye(5)) / 4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_applies_exactly_the_weights_attention_probs_returns(fused, masked):
    lsa = _lsa()
    lsa.fused_attn = fused
    x = torch.randn(2, 6, 16)
    mask = None
    if masked:  # a caller's mask (True = may attend) is kept next to the diagonal one
        mask = torch.ones(6, 6, dtype=torch.bool)
        mask[:, 0] = False
    probs = lsa.attention_probs(x, attn_mask=mask)
    if masked:
        assert torch.equal(probs[..., 1:, 0], torch.zeros(2, 4, 5))
    v = lsa.qkv(x).reshape(2, 6, 3, 4, 4).permute(2, 0, 3, 1, 4)[2]
    expected = lsa.proj((probs @ v).transpose(1, 2).reshape(2, 6, 16))
    assert torch.allclose(lsa(x, attn_mask=mask), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="is_causal"):
        lsa(x, is_causal=True)


def test_lsa_takes_timm_attention_weights_and_draws_the_same_initial_weights():
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=2, in_chans=1, **TINY_VIT)
    torch.manual_seed(0)
    local = timm.create_model(
        "vit_tiny_patch16_224", num_classes=2, in_chans=1, attn_layer=LocalitySelfAttention, **TINY_VIT
    )
    theirs, ours = plain.state_dict(), local.state_dict()
    assert sorted(ours) == sorted([*theirs, "blocks.0.attn.scale", "blocks.1.attn.scale"])
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)  # same seed, same start: a paired comparison
    assert use_locality_attention(plain) == ["blocks.0.attn", "blocks.1.attn"]
    assert torch.equal(
        plain.blocks[0].attn.attention_probs(torch.ones(1, 17, 32)),
        local.blocks[0].attn.attention_probs(torch.ones(1, 17, 32)),
    )


# ---------------------------------------------------------------------------------- create_model
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_create_model_builds_and_trains_a_tiny_vit_with_spt_and_lsa(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=1, spt=True, lsa=True, **TINY_VIT)
    assert isinstance(model.patch_embed, ShiftedPatchEmbed) and model.patch_embed.num_patches == 16
    assert all(isinstance(block.attn, LocalitySelfAttention) for block in model.blocks)
    assert model.medtricks_info["spt"] is True and model.medtricks_info["lsa"] is True
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 2)
    out.sum().backward()
    for param in (model.patch_embed.patch_norm.weight, model.patch_embed.proj.weight, model.blocks[1].attn.scale):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_dynamic_image_size_takes_other_sizes():
    model = create_model("vit_tiny_patch16_224", num_classes=2, in_chans=1, spt=True, dynamic_img_size=True, **TINY_VIT)
    assert model(torch.randn(1, 1, 40, 48)).shape == (1, 2)


def test_lsa_on_pretrained_weights_converts_the_loaded_attention(tmp_path):
    torch.manual_seed(0)
    plain = create_model("vit_tiny_patch16_224", num_classes=2, in_chans=1, **TINY_VIT)
    torch.save(plain.state_dict(), tmp_path / "vit.pth")
    model = create_model(
        "vit_tiny_patch16_224", weights=f"file:{tmp_path / 'vit.pth'}", num_classes=2, in_chans=1, lsa=True, **TINY_VIT
    )
    attn = model.blocks[1].attn
    assert isinstance(attn, LocalitySelfAttention) and attn.scale.item() == pytest.approx(16**-0.5)
    assert torch.equal(attn.qkv.weight, plain.blocks[1].attn.qkv.weight)


def test_non_vits_and_pretrained_spt_are_refused_naming_what_works():
    with pytest.raises(ConfigError, match=r"'resnet18' is not one.*") as err:
        create_model("resnet18", spt=True)
    assert "vit_tiny_patch16_224" in str(err.value) and "deit_tiny_patch16_224" in str(err.value)
    with pytest.raises(ConfigError, match="model.weights='imagenet'.*weights: none"):
        create_model("vit_tiny_patch16_224", weights="imagenet", spt=True, **TINY_VIT)
    with pytest.raises(ConfigError, match="attn_layer"):
        create_model("vit_tiny_patch16_224", lsa=True, attn_layer="attn", **TINY_VIT)
    with pytest.raises(ConfigError, match="ParallelThingsBlock"):  # a ViT whose blocks ignore attn_layer
        create_model("vit_small_patch16_18x2_224", lsa=True, **TINY_VIT)


# ---------------------------------------------------------------------------------- recipes
def test_a_recipe_with_spt_on_a_resnet_is_a_clear_error():
    recipe = _tiny("model.name=resnet18", "model.vit.spt=true")
    with pytest.raises(ConfigError, match=r"model\.vit\.spt.*'resnet18' is not one"):
        build_model(recipe, num_classes=3)


def test_unknown_and_wrong_keys_under_model_vit_are_refused():
    with pytest.raises(RecipeError, match=r"unknown key 'sptt' in section 'model\.vit'; did you mean 'spt'"):
        _tiny("model.vit.sptt=true")
    with pytest.raises(RecipeError, match=r"model\.vit\.lsa"):
        _tiny("model.vit.lsa=sometimes")


def test_the_shipped_recipe_builds_spt_lsa_and_logs_the_switches():
    plain = _tiny()
    assert plain.model.vit.spt is False and plain.model.vit.lsa is False
    assert run_params(plain)["model.vit.spt"] is False
    shipped = load_recipe(ROOT / "recipes" / "vit_tiny_spt_lsa.yaml")
    assert shipped.model.vit.spt and shipped.model.vit.lsa and shipped.tricks.drloc.weight == 0
    assert shipped.model.weights == "none" and shipped.data.image_size == 64
    params = run_params(shipped)
    assert params["model.vit.spt"] is True and params["model.vit.lsa"] is True
    model, _ = build_model(shipped, num_classes=2)
    assert isinstance(model.patch_embed, ShiftedPatchEmbed) and model.patch_embed.grid_size == (8, 8)
    assert len(model.blocks) == 12 and all(isinstance(b.attn, LocalitySelfAttention) for b in model.blocks)


def test_a_parent_run_with_other_locality_layers_is_refused():
    parent = _tiny("model.name=vit_tiny_patch16_224", "model.vit.spt=true")
    child = _tiny("model.name=vit_tiny_patch16_224", "model.weights=run:parent")
    run = ParentRun(
        ref="parent",
        files_dir=Path("."),
        run_dir=None,
        run_id=None,
        recipe=parent,
        classes=["a", "b"],
        state={},
        sha256="",
    )
    with pytest.raises(ConfigError, match=r"model\.vit\.spt=True but this recipe has model\.vit\.spt=False"):
        _check_fits(child, run)
