"""Read attention weights out of a ViT and per-stage activation maps out of a CNN, with forward hooks.

**ViT** (:func:`find_vit`): a timm-style VisionTransformer anywhere in the model (behind a learnable
resizer too): a module with ``patch_embed``, ``blocks`` whose every block has an ``attn`` module, and
``num_prefix_tokens``. :class:`AttentionProbe` hooks each ``blocks[i].attn`` *before* it runs and keeps
its post-softmax weights ``(B, heads, N, N)`` (:func:`attention_probs`):

* a module with an ``attention_probs(x)`` method (the Locality Self-Attention of
  :mod:`medtricks.models.vit_locality`: learnable temperature, masked diagonal) is asked for them;
* timm's ``Attention`` computes them inside ``F.scaled_dot_product_attention`` (fused) and never holds
  them, so they are recomputed from the module's input exactly as its unfused path does:
  ``q, k`` from ``qkv(x)`` reshaped ``(B, N, 3, heads, head_dim)``, ``q_norm``/``k_norm``, ``q * scale``,
  ``softmax(q k^T)``. (timm's ``AttentionExtract`` hooks ``attn_drop`` instead, which needs the fused
  path switched off when the model is built and sees nothing of a module with its own weights.)

Any other attention class is refused naming it (its weights cannot be recomputed faithfully: rotary
embeddings, windows...) unless it has ``attention_probs``. Attention masks are not supported.

**CNN** (:func:`cnn_stages`): the stage containers of the BN-gamma block finder
(:func:`~medtricks.gamma.blocks.find_stages`: ``layer1..4``, ``blocks.0..6``), else the modules
timm's ``feature_info`` names. :class:`StageProbe` keeps, per stage, the mean over channels of the
absolute activation ``(B, h, w)`` (outputs taken as ``(B, C, h, w)``): where the stage responds strongly,
whatever the sign (an EfficientNet stage ends in a linear projection, whose channel-mean would cancel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from medtricks.errors import ConfigError, MedtricksError
from medtricks.gamma.blocks import find_stages

__all__ = ["AttentionLayer", "VitLayout", "find_vit", "attention_probs", "AttentionProbe", "cnn_stages", "StageProbe"]


@dataclass
class AttentionLayer:
    """One transformer block: its name (``blocks.3``), its attention module's name and the module."""

    name: str
    attn_name: str
    module: nn.Module = field(repr=False)


@dataclass
class VitLayout:
    """Where a ViT's attention sits: its blocks, prefix (class + register) tokens and patch size.
    ``class_token``: whether the model's output reads its class token (timm ``global_pool="token"``); when
    not, the maps use the mean row over all queries."""

    prefix: str
    backbone: nn.Module = field(repr=False)
    layers: list[AttentionLayer]
    num_prefix_tokens: int
    class_token: bool
    patch_size: tuple[int, int]

    def grid(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of a backbone input of ``(H, W)`` pixels."""
        embed = self.backbone.patch_embed
        if hasattr(embed, "dynamic_feat_size"):
            return tuple(int(g) for g in embed.dynamic_feat_size(tuple(input_size)))
        return input_size[0] // self.patch_size[0], input_size[1] // self.patch_size[1]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_vit(model: nn.Module) -> Optional[VitLayout]:
    """The :class:`VitLayout` of the first timm-style VisionTransformer in ``model``; ``None`` if there is none."""
    for prefix, module in model.named_modules():
        blocks = getattr(module, "blocks", None)
        embed = getattr(module, "patch_embed", None)
        if not isinstance(blocks, nn.Module) or embed is None or not hasattr(module, "num_prefix_tokens"):
            continue
        children = list(blocks.named_children())
        if not children or not all(isinstance(getattr(b, "attn", None), nn.Module) for _, b in children):
            continue
        layers = [
            AttentionLayer(_join(prefix, f"blocks.{n}"), _join(prefix, f"blocks.{n}.attn"), b.attn) for n, b in children
        ]
        patch = getattr(embed, "patch_size", 16)
        patch = (int(patch), int(patch)) if isinstance(patch, int) else tuple(int(p) for p in patch)
        has_cls = bool(getattr(module, "has_class_token", getattr(module, "cls_token", None) is not None))
        # the output reads the class token only with token pooling; avg/max pooling reads every token
        class_token = has_cls and getattr(module, "global_pool", "token") == "token"
        return VitLayout(prefix, module, layers, int(module.num_prefix_tokens), class_token, patch)
    return None


def _is_timm_attention(module: nn.Module) -> bool:
    from timm.models.vision_transformer import Attention

    return isinstance(module, Attention)


def attention_probs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention weights ``(B, heads, N, N)`` of ``module`` for its input tokens ``x`` ``(B, N, C)``
    (see the module docstring)."""
    own = getattr(module, "attention_probs", None)
    if callable(own):
        return own(x)
    if not _is_timm_attention(module):
        raise MedtricksError(
            f"cannot read the attention weights of {type(module).__name__}: only timm's Attention "
            "is recomputed; give the module an attention_probs(x) method returning (B, heads, N, N)"
        )
    b, n, _ = x.shape
    qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = module.q_norm(q), module.k_norm(k)
    return ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class _Hooks:
    """The hooks a probe registered in ``self.handles``, removed by ``close`` or on leaving a ``with``."""

    handles: list

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class AttentionProbe(_Hooks):
    """Forward pre-hooks on every attention module of ``layout``: after a forward, ``probs[name]`` holds the
    weights ``(B, heads, N, N)`` of each block (float32, on the model's device) and ``input_size`` the
    ``(H, W)`` the patch embedding saw. A context manager (the hooks are removed on exit)."""

    def __init__(self, layout: VitLayout) -> None:
        self.layout = layout
        self.probs: dict[str, torch.Tensor] = {}
        self.input_size: Optional[tuple[int, int]] = None
        self.handles = [layout.backbone.patch_embed.register_forward_pre_hook(self._size)]
        for layer in layout.layers:
            self.handles.append(layer.module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))

    def _size(self, _module, args):
        self.input_size = tuple(int(s) for s in args[0].shape[-2:])

    def _hook(self, layer: AttentionLayer):
        def hook(module, args, kwargs):
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise MedtricksError(f"{layer.attn_name}: attention masks are not supported by the attention maps")
            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                self.probs[layer.name] = attention_probs(module, x).float()

        return hook


def cnn_stages(model: nn.Module) -> list[str]:
    """Stage names of a CNN (see the module docstring); a :class:`ConfigError` when it has none."""
    stages = find_stages(model)
    if stages:
        return stages
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if not isinstance(info, list):
            continue
        names = [i.get("module") for i in info if isinstance(i, dict) and i.get("module")]
        if names:
            return [_join(prefix, n) for n in names]
    raise ConfigError(
        f"{type(model).__name__} is neither a ViT (blocks[i].attn) nor a CNN whose stages medtricks "
        "knows (registered residual blocks or timm feature_info); name modules with --layers"
    )


class StageProbe(_Hooks):
    """Forward hooks on the modules ``names``: after a forward, ``maps[name]`` holds the mean over channels of
    the absolute output, ``(B, h, w)`` (float32, on the model's device). A context manager."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = next(o for o in output if isinstance(o, torch.Tensor))
            if output.ndim != 4:
                raise ConfigError(
                    f"{name}: its output has shape {tuple(output.shape)}, not a (B, C, h, w) feature "
                    "map; pick stages or blocks of the CNN"
                )
            self.maps[name] = output.detach().abs().float().mean(1)

        return hook
