"""Learnable resizer (Talebi & Milanfar, ICCV 2021) and its CBAM variant, as a trainable model front.

A chest X-ray arrives at 1-3k pixels while the backbone was pretrained at 224. Instead of a fixed
bilinear resize, :class:`LearnableResizer` learns a residual on top of that resize, end to end with
the classifier; :class:`ResizerModel` chains it in front of any backbone::

    >>> import torch, timm
    >>> from medtricks.models.resizer import LearnableResizer, ResizerModel
    >>> backbone = timm.create_model("resnet10t", pretrained=False, num_classes=2, in_chans=1)
    >>> model = ResizerModel(LearnableResizer(in_chans=1, out_size=64), backbone)
    >>> model(torch.randn(2, 1, 128, 128)).shape
    torch.Size([2, 2])

Every resizer parameter is named ``resizer.*`` inside a :class:`ResizerModel`, so optimizer
parameter groups (its own LR multiplier) and BN-gamma rules can select or skip it by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtricks.errors import ConfigError, ConfigTypeError

__all__ = ["ATTENTIONS", "INTERPOLATIONS", "LearnableResizer", "ResizerModel", "resizer_param_count"]

#: ``interpolation`` values accepted by :class:`LearnableResizer` (``torch.nn.functional.interpolate``
#: modes). ``bilinear``/``bicubic`` are anti-aliased, as torchvision's and PIL's resizes are.
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")
#: ``attention`` values accepted by :class:`LearnableResizer`.
ATTENTIONS = (None, "cbam")

# CBAM reference (Woo et al. 2018): channel-MLP reduction ratio and spatial-gate kernel size.
_CBAM_REDUCTION = 16
_CBAM_SPATIAL_KERNEL = 7
# Scale applied to the tail conv's default init, so that at init the learned residual is small and
# the output stays close to the plain resize (the backbone first sees the images it was pretrained
# on), while gradients still reach every parameter (an all-zero tail would block them at step 0).
_TAIL_INIT_SCALE = 0.1
_LEAKY_SLOPE = 0.2


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"LearnableResizer: {name} must be a positive integer, got {value!r}")
    return value


def _check_size(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair: Sequence[object] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = value
    else:
        raise ConfigError(f"LearnableResizer: out_size must be an int or a (height, width) pair, got {value!r}")
    for side in pair:
        _check_positive_int("out_size", side)
    return int(pair[0]), int(pair[1])  # type: ignore[arg-type]


def _cbam_reduced_channels(n_filters: int) -> int:
    # The reference uses channels // 16; keep at least one hidden unit for narrow resizers.
    return max(1, n_filters // _CBAM_REDUCTION)


def _make_cbam(channels: int) -> nn.Module:
    """CBAM as in the reference: channel gate, then spatial gate; spatial BN gamma initialised to 0.

    timm's ``CbamModule`` matches the reference layer for layer (shared MLP on avg- and max-pooled
    features, 7x7 conv + BN + sigmoid on channel mean and max); only its init differs, so set the
    spatial BN gamma to 0 here: the spatial gate then starts uniform (sigmoid(0) = 0.5).
    """
    from timm.layers.cbam import CbamModule  # timm is heavy: import only when CBAM is asked for

    cbam = CbamModule(channels, rd_channels=_cbam_reduced_channels(channels), mlp_bias=True)
    nn.init.zeros_(cbam.spatial.conv.bn.weight)
    return cbam


class _ResBlock(nn.Module):
    """Conv3x3 -> BN -> LeakyReLU -> Conv3x3 -> BN [-> CBAM], plus identity."""

    def __init__(self, channels: int, attention: str | None) -> None:
        super().__init__()
        # No conv bias in front of a BN: the BN shift makes it redundant.
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(_LEAKY_SLOPE)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # CBAM sits on the residual branch before the identity add, as in the CBAM reference's
        # ResNet blocks; with the spatial gate at 0.5 it starts as a mild damping of the branch.
        self.attention = _make_cbam(channels) if attention == "cbam" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return x + self.attention(y)


class LearnableResizer(nn.Module):
    """Learnable resizer: a fixed resize of the image plus a learned residual at the output size.

    Architecture (Talebi & Milanfar 2021, Fig. 2), with ``n = n_filters``, ``C = in_chans``:

    - skip: the input resized to ``out_size`` with ``interpolation``;
    - head: Conv7x7(C->n) -> LeakyReLU(0.2) -> Conv1x1(n->n) -> LeakyReLU(0.2) -> BN, then resized
      to ``out_size`` (call it r);
    - body: ``n_res_blocks`` x [Conv3x3 -> BN -> LeakyReLU(0.2) -> Conv3x3 -> BN (-> CBAM), plus
      identity], then Conv3x3 -> BN, plus r;
    - tail: Conv7x7(n->C), added to the skip.

    Convs directly followed by a BN have no bias. The tail conv starts at 0.1x PyTorch's default init
    so that at init the output is the skip plus a small residual: for unit-std inputs, mean
    |output - skip| is about 0.06 in train mode (0.01 in eval mode), max under 1 (tested).
    Works for down- and up-sampling; any input size is accepted.

    Args:
        in_chans: image channels in and out (1 for grayscale X-rays, 3 for RGB backbones).
        out_size: output size, an int (square) or ``(height, width)``.
        n_filters: feature channels ``n`` of the head and body.
        n_res_blocks: residual blocks in the body (0 allowed).
        interpolation: one of :data:`INTERPOLATIONS`; ``bilinear``/``bicubic`` are anti-aliased.
        attention: ``None`` or ``"cbam"`` (a CBAM on each residual block's branch, spatial BN
            gamma initialised to 0 as in the CBAM reference).

    Example:
        >>> LearnableResizer(in_chans=3, out_size=224)(torch.randn(2, 3, 448, 448)).shape
        torch.Size([2, 3, 224, 224])
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_size: int | tuple[int, int] = 224,
        n_filters: int = 16,
        n_res_blocks: int = 1,
        interpolation: str = "bilinear",
        attention: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("in_chans", in_chans)
        _check_positive_int("n_filters", n_filters)
        if isinstance(n_res_blocks, bool) or not isinstance(n_res_blocks, int) or n_res_blocks < 0:
            raise ConfigError(f"LearnableResizer: n_res_blocks must be an integer >= 0, got {n_res_blocks!r}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"LearnableResizer: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if attention not in ATTENTIONS:
            raise ConfigError(f"LearnableResizer: attention must be one of {ATTENTIONS}, got {attention!r}")
        self.in_chans = in_chans
        self.out_size = _check_size(out_size)
        self.n_filters = n_filters
        self.n_res_blocks = n_res_blocks
        self.interpolation = interpolation
        self.attention = attention

        n = n_filters
        self.head = nn.Sequential(
            nn.Conv2d(in_chans, n, 7, padding=3),
            nn.LeakyReLU(_LEAKY_SLOPE),
            nn.Conv2d(n, n, 1),
            nn.LeakyReLU(_LEAKY_SLOPE),
            nn.BatchNorm2d(n),
        )
        self.blocks = nn.Sequential(*(_ResBlock(n, attention) for _ in range(n_res_blocks)))
        self.body_conv = nn.Conv2d(n, n, 3, padding=1, bias=False)
        self.body_bn = nn.BatchNorm2d(n)
        self.tail = nn.Conv2d(n, in_chans, 7, padding=3)
        with torch.no_grad():
            self.tail.weight.mul_(_TAIL_INIT_SCALE)
            self.tail.bias.mul_(_TAIL_INIT_SCALE)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed resize used for the image skip and the head's bottleneck."""
        antialias = self.interpolation in ("bilinear", "bicubic")
        align = False if self.interpolation in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=self.out_size, mode=self.interpolation, align_corners=align, antialias=antialias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(
                f"LearnableResizer: expected a (N, {self.in_chans}, H, W) batch, got shape {tuple(x.shape)}"
            )
        skip = self.resize(x)
        r = self.resize(self.head(x))
        body = self.body_bn(self.body_conv(self.blocks(r))) + r
        return skip + self.tail(body)

    def extra_repr(self) -> str:
        return (
            f"in_chans={self.in_chans}, out_size={self.out_size}, n_filters={self.n_filters}, "
            f"n_res_blocks={self.n_res_blocks}, interpolation={self.interpolation!r}, "
            f"attention={self.attention!r}"
        )


class ResizerModel(nn.Module):
    """A backbone fed by a learnable resizer: ``forward(x) = backbone(resizer(x))``.

    Attributes ``.resizer`` and ``.backbone`` are the two parts; parameter names are prefixed
    ``resizer.`` and ``backbone.`` accordingly.

    Example:
        >>> model = ResizerModel(LearnableResizer(in_chans=1, out_size=32), nn.Sequential(
        ...     nn.Flatten(), nn.Linear(32 * 32, 2)))
        >>> model(torch.randn(4, 1, 64, 64)).shape
        torch.Size([4, 2])
    """

    def __init__(self, resizer: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        if not isinstance(resizer, nn.Module) or not isinstance(backbone, nn.Module):
            raise ConfigTypeError(
                "ResizerModel: resizer and backbone must be torch.nn.Module instances, got "
                f"{type(resizer).__name__} and {type(backbone).__name__}"
            )
        self.resizer = resizer
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.resizer(x))


def resizer_param_count(in_chans: int, n_filters: int, n_res_blocks: int, attention: str | None = None) -> int:
    """Number of trainable parameters of ``LearnableResizer(in_chans, _, n_filters, n_res_blocks, _, attention)``.

    With ``C = in_chans``, ``n = n_filters``, ``r = n_res_blocks`` (BN counts gamma and beta; running
    statistics are buffers, not parameters)::

        head   Conv7x7(C->n)+bias + Conv1x1(n->n)+bias + BN     = 49Cn + n + n^2 + n + 2n
        body   r x (2 x [Conv3x3(n->n), no bias] + 2 BN)         = r (18n^2 + 4n)
               Conv3x3(n->n), no bias + BN                       = 9n^2 + 2n
        tail   Conv7x7(n->C)+bias                                = 49nC + C
        total  = 98Cn + C + (18r + 10) n^2 + (4r + 6) n

    ``attention="cbam"`` adds per residual block, with ``h = max(1, n // 16)``: the channel MLP
    (``2nh + h + n``, with biases as in the CBAM reference) and the spatial gate's bias-free 7x7
    conv on 2 maps plus its BN (``98 + 2``): ``r (2nh + h + n + 100)``.

    For ``C=3, n=16, r=1`` this is 12,035 (11,872 of them conv weights, the "about 11.9K" usually
    quoted), 12,184 with CBAM; for ``C=1`` it is 8,897 and 9,046.

    Example:
        >>> resizer_param_count(3, 16, 1)
        12035
    """
    for name, value in (("in_chans", in_chans), ("n_filters", n_filters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"resizer_param_count: {name} must be a positive integer, got {value!r}")
    if isinstance(n_res_blocks, bool) or not isinstance(n_res_blocks, int) or n_res_blocks < 0:
        raise ConfigError(f"resizer_param_count: n_res_blocks must be an integer >= 0, got {n_res_blocks!r}")
    if attention not in ATTENTIONS:
        raise ConfigError(f"resizer_param_count: attention must be one of {ATTENTIONS}, got {attention!r}")
    c, n, r = in_chans, n_filters, n_res_blocks
    total = 98 * c * n + c + (18 * r + 10) * n * n + (4 * r + 6) * n
    if attention == "cbam":
        h = _cbam_reduced_channels(n)
        total += r * (2 * n * h + h + n + 2 * _CBAM_SPATIAL_KERNEL**2 + 2)
    return total
