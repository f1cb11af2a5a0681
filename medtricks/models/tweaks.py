"""Model tweaks: add SE or CBAM attention to a pretrained CNN without changing what it computes.

A pretrained ResNet-50 or EfficientNet-Lite has no attention; adding a freshly initialised SE or
CBAM block would disturb the pretrained features at step 0. Here every gate is ``2·sigmoid(z)``
with the logit ``z`` produced by a zero-initialised last layer, so the gate is exactly 1 at the
start (the model's outputs are unchanged) and learns from the first step. The blocks are timm's
``SEModule`` / ``CbamModule``, placed in the residual block's ``se`` slot (where SE-ResNet and
EfficientNet put theirs); CBAM's spatial gate uses a plain zero-initialised 7x7 conv (no BN, so
BN-gamma strategies cannot disturb the identity start).

Composer-style surgery: changes the model in place and returns a report of what it changed::

    >>> import timm
    >>> from medtricks.models.tweaks import add_attention
    >>> model = timm.create_model("resnet18", num_classes=2)
    >>> rows = add_attention(model, kind="se")        # last two stages: layer3, layer4
    >>> [r["module"] for r in rows]
    ['layer3.0.se', 'layer3.1.se', 'layer4.0.se', 'layer4.1.se']
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from medtricks.errors import ConfigError
from medtricks.models.layout import stage_of_parameter

__all__ = ["DoubledSigmoid", "make_zero_gated", "add_attention", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("se", "cbam")


class DoubledSigmoid(nn.Module):
    """``2 * sigmoid(x)``: equals 1 at ``x = 0``, so a zero logit leaves features unchanged."""

    def __init__(self, inplace: bool = False) -> None:  # timm's create_act_layer passes inplace
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


def make_zero_gated(kind: str, channels: int, rd_ratio: float = 1.0 / 16, spatial_kernel_size: int = 7) -> nn.Module:
    """A timm SE or CBAM module whose output equals its input until it has learned something."""
    from timm.layers.cbam import CbamModule
    from timm.layers.squeeze_excite import SEModule

    if kind == "se":
        module = SEModule(channels, rd_ratio=rd_ratio, gate_layer=DoubledSigmoid)
        nn.init.zeros_(module.fc2.weight)
        nn.init.zeros_(module.fc2.bias)
        return module
    if kind == "cbam":
        module = CbamModule(
            channels, rd_ratio=rd_ratio, spatial_kernel_size=spatial_kernel_size, gate_layer=DoubledSigmoid
        )
        nn.init.zeros_(module.channel.fc2.weight)  # bias-free MLP: logit 0 → channel gate 1
        conv = nn.Conv2d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2, bias=False)
        nn.init.zeros_(conv.weight)
        module.spatial.conv = conv  # replaces ConvNormAct: no BN inside the gate
        return module
    raise ConfigError(f"attention kind must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")


def _slot_channels(block: nn.Module) -> Optional[int]:
    """Channels at the ``se`` slot of timm's residual/inverted-residual blocks, else ``None``."""
    if not hasattr(block, "se"):
        return None
    kind = type(block).__name__
    if kind == "Bottleneck" and hasattr(block, "conv3"):
        return block.conv3.out_channels
    if kind == "BasicBlock" and hasattr(block, "conv2"):
        return block.conv2.out_channels
    if hasattr(block, "conv_dw"):  # EfficientNet InvertedResidual / DepthwiseSeparableConv
        return block.conv_dw.out_channels
    return None


def _is_empty(slot: Optional[nn.Module]) -> bool:
    return slot is None or isinstance(slot, nn.Identity)


def add_attention(
    model: nn.Module, kind: str = "se", stages: Optional[Sequence[int]] = None, rd_ratio: float = 1.0 / 16
) -> list[dict]:
    """Insert zero-gated ``kind`` (``"se"`` / ``"cbam"``) attention into blocks of ``stages``.

    Args:
        model: a timm ResNet-family or EfficientNet-family model (or a wrapper holding one).
        kind: ``"se"`` (squeeze-excitation) or ``"cbam"`` (channel + spatial attention).
        stages: stage indices as in :func:`medtricks.models.stage_of_parameter` (ResNet: 1-4 =
            layer1-4); default: the last two stages that have blocks ("late stages").
        rd_ratio: channel reduction of the attention MLP.

    Returns:
        One row per inserted module: ``module`` (its name), ``block``, ``stage``, ``kind``,
        ``channels``.

    Raises:
        ValueError: unknown kind, no eligible blocks, a block that already has attention, or a
            stage without blocks.
    """
    if kind not in ATTENTION_KINDS:
        raise ConfigError(f"attention kind must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    candidates = [(name, module, _slot_channels(module)) for name, module in model.named_modules()]
    candidates = [(name, module, ch) for name, module, ch in candidates if ch is not None]
    if not candidates:
        raise ConfigError(
            f"{type(model).__name__}: no block with an attention slot found; "
            "attention insertion supports timm ResNet-family and EfficientNet-family "
            "models (blocks with an `se` slot), not MONAI nets"
        )
    param_stage = stage_of_parameter(model)
    blocks = []  # (name, block, stage, channels)
    for name, module, channels in candidates:
        own = {param_stage[f"{name}.{p}" if name else p] for p, _ in module.named_parameters()}
        if len(own) == 1:
            blocks.append((name, module, own.pop(), channels))
    available = sorted({stage for _, _, stage, _ in blocks})
    chosen = list(stages) if stages is not None else available[-2:]
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ConfigError(f"attention_stages {missing} hold no blocks; stages with blocks: {available}")
    rows = []
    for name, block, stage, channels in blocks:
        if stage not in chosen:
            continue
        if not _is_empty(block.se):
            raise ConfigError(
                f"block {name!r} already has attention ({type(block.se).__name__}); "
                "attention is only added to models that have none (e.g. use resnet50, "
                "not seresnet50)"
            )
        ref = next(block.parameters())
        block.se = make_zero_gated(kind, channels, rd_ratio=rd_ratio).to(device=ref.device, dtype=ref.dtype)
        rows.append({"module": f"{name}.se", "block": name, "stage": stage, "kind": kind, "channels": channels})
    return rows
