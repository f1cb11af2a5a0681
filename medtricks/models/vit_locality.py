"""Locality for Vision Transformers trained on little data: Shifted Patch Tokenization (SPT) and Locality
Self-Attention (LSA), from Lee, Lee & Song 2021, "Vision Transformer for Small-Size Datasets" (arXiv:2112.13492).

A ViT trained from scratch on a few thousand X-rays lacks the locality a CNN has built in: each 16 px patch
is embedded on its own (SPT widens what one token sees), and its softmax attention is flat and dominated by
a token's own key (LSA sharpens it). Both are drop-in layers for timm's ``VisionTransformer``, passed as
``embed_layer=`` and ``attn_layer=``; :func:`medtricks.models.create_model` does that with ``spt=True`` /
``lsa=True`` (recipe keys ``model.vit.spt`` / ``model.vit.lsa``; docs/vit-small-data.md)::

    >>> import timm, torch
    >>> from medtricks.models.vit_locality import LocalitySelfAttention, ShiftedPatchEmbed
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=2,
    ...                         embed_layer=ShiftedPatchEmbed, attn_layer=LocalitySelfAttention)
    >>> vit(torch.randn(2, 1, 32, 32)).shape
    torch.Size([2, 2])

timm is not imported here at module level (it costs seconds; ``medtricks.models.backbones`` imports this
module): the layers copy the constructor signatures and attribute names of timm 1.0's ``PatchEmbed`` and
``Attention`` instead of subclassing them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from medtricks.errors import ConfigError

__all__ = [
    "ShiftedPatchEmbed",
    "LocalitySelfAttention",
    "SHIFT_DIRECTIONS",
    "VIT_MODULES",
    "locality_kwargs",
    "use_locality_attention",
    "check_locality",
]

#: The four diagonal shifts of SPT as (rows, columns) signs: content moves this way by half a patch.
SHIFT_DIRECTIONS = {"left-up": (-1, -1), "right-up": (-1, 1), "left-down": (1, -1), "right-down": (1, 1)}
#: timm modules whose models are a ``VisionTransformer`` built with ``embed_layer``/``attn_layer`` passed on.
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
_OUTPUT_FORMATS = ("NLC", "NHWC", "NCHW")


def _pair(value: Union[int, tuple[int, int], list[int]]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


# ------------------------------------------------------------------------------------ SPT
class ShiftedPatchEmbed(nn.Module):
    """Shifted Patch Tokenization: a drop-in for timm's ``PatchEmbed`` (same constructor, same attributes).

    Paper, Eq. 2: ``S(x) = LN(P([x, s1, s2, s3, s4])) E``. The image and its four diagonal shifts by half a
    patch (left-up, right-up, left-down, right-down; :data:`SHIFT_DIRECTIONS`) are stacked along channels
    (``5 * in_chans``), cut into ``p x p`` patches, each flattened to ``patch_dim = p * p * 5 * in_chans``
    values (order: row, column, channel, as ViT's ``(p1 p2 c)``), layer-normalised over those values, then
    projected to ``embed_dim`` by a linear layer. Why: every token then also holds the pixels half a patch
    beyond its borders, a wider receptive field at the tokenisation step. The LayerNorm sits *before* the
    projection, so this is not timm's conv-then-norm ``PatchEmbed`` with more input channels.

    Details the paper leaves open, chosen here:

    - shifts are exact pixel shifts of ``patch_size // 2`` (an odd patch rounds down), with zeros where the
      shifted image leaves the frame (no wrap-around, no interpolation);
    - ``dynamic_img_pad`` pads the image (right/bottom, zeros) to whole patches *before* shifting;
    - ``norm_layer`` (timm's ``embed_norm_layer``) is an optional extra norm *after* the projection, as in
      timm; ``proj`` is an ``nn.Linear`` (timm's is a conv), so timm's pretrained patch-embedding weights do
      not fit (:func:`medtricks.models.create_model` refuses pretrained weights with ``spt=True``);
    - a new ``patch_size`` in :meth:`set_input_size` is refused (the projection cannot be resampled).
    """

    def __init__(
        self,
        img_size: Optional[Union[int, tuple[int, int]]] = 224,
        patch_size: Union[int, tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable] = None,
        flatten: bool = True,
        output_fmt: Optional[str] = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = _pair(patch_size)
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        fmt = str(getattr(output_fmt, "value", output_fmt)) if output_fmt is not None else None  # timm passes a str
        if fmt is not None and fmt not in _OUTPUT_FORMATS:
            raise ConfigError(
                f"ShiftedPatchEmbed: output_fmt={output_fmt!r}; expected one of {', '.join(_OUTPUT_FORMATS)}"
            )
        # timm's rule: no output_fmt -> tokens (NLC) when flatten, else an NCHW map
        self.output_fmt = fmt or ("NLC" if flatten else "NCHW")
        self.flatten = self.output_fmt == "NLC"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.in_chans = in_chans
        self.shift = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.patch_dim = self.patch_size[0] * self.patch_size[1] * (1 + len(SHIFT_DIRECTIONS)) * in_chans
        self.patch_norm = nn.LayerNorm(self.patch_dim, **dd)  # the paper's LN, over the raw patch values
        self.proj = nn.Linear(self.patch_dim, embed_dim, bias=bias, **dd)  # the paper's E
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = _pair(img_size)
        grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ``VisionTransformer.set_input_size`` hook: a new image size; a new patch size is refused."""
        if patch_size is not None and _pair(patch_size) != self.patch_size:
            raise ConfigError(
                f"ShiftedPatchEmbed cannot change its patch size {self.patch_size} to "
                f"{_pair(patch_size)}: its LayerNorm and projection are sized for the old patch; "
                "build a new model"
            )
        if img_size is not None and _pair(img_size) != self.img_size:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True) -> Union[tuple[int, int], int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an image of ``img_size`` (timm's ``dynamic_img_size`` path)."""
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """``[x, s1..s4]``: ``(B, C, H, W)`` -> ``(B, 5C, H, W)``, shifts in :data:`SHIFT_DIRECTIONS` order.

        ``s(x)[i, j] = x[i - dy * sy, j - dx * sx]`` (zero outside the image): for ``left-up`` the pixel at
        ``(r, c)`` lands at ``(r - sy, c - sx)``. Pad-then-crop rather than ``torch.roll`` (which wraps
        around) or negative padding (not every exporter takes it).
        """
        sy, sx = self.shift
        height, width = x.shape[-2:]
        padded = F.pad(x, (sx, sx, sy, sy))
        views = [x]
        for dy, dx in SHIFT_DIRECTIONS.values():
            top, left = sy - dy * sy, sx - dx * sx
            views.append(padded[..., top : top + height, left : left + width])
        return torch.cat(views, dim=1)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``P([x, s1..s4])``: the flattened patches before the LayerNorm, ``(B, N, patch_dim)``."""
        return self._patches(self.shifted(self._pad(x))).flatten(1, 2)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if self.img_size is not None:
            if self.strict_img_size and (height, width) != self.img_size:
                raise ValueError(
                    f"ShiftedPatchEmbed: input size ({height}, {width}) does not match the model's {self.img_size}"
                )
            if not self.strict_img_size and not self.dynamic_img_pad and (height % ph or width % pw):
                raise ValueError(
                    f"ShiftedPatchEmbed: input size ({height}, {width}) is not a multiple of the patch "
                    f"size {self.patch_size}"
                )
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - width % pw) % pw, 0, (ph - height % ph) % ph))
        return x

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C', H, W)`` -> ``(B, H/p, W/p, p * p * C')``, each patch flattened row, column, channel."""
        batch, channels, height, width = x.shape
        ph, pw = self.patch_size
        gh, gw = height // ph, width // pw
        x = x[..., : gh * ph, : gw * pw].reshape(batch, channels, gh, ph, gw, pw)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, gh, gw, ph * pw * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._patches(self.shifted(self._pad(x)))  # (B, gh, gw, patch_dim)
        x = self.norm(self.proj(self.patch_norm(x)))  # (B, gh, gw, embed_dim)
        if self.output_fmt == "NLC":
            return x.flatten(1, 2)
        return x if self.output_fmt == "NHWC" else x.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ LSA
class LocalitySelfAttention(nn.Module):
    """Locality Self-Attention: a drop-in for timm's ``Attention`` (same constructor, same submodule names).

    Paper, Eq. 4-5: ``softmax(M(q k^T) / tau) v`` with

    - a learnable temperature: here the softmax *scale* ``self.scale`` (= ``1 / tau``), one scalar
      ``nn.Parameter`` per layer initialised to ``head_dim ** -0.5``, i.e. ``tau = sqrt(d_k)`` as in the
      paper, so at initialisation the logits equal a plain ViT's. Why learnable: a small-data ViT's
      attention stays nearly uniform; training can lower ``tau`` to sharpen it. The paper learns ``tau``
      itself; learning its inverse gives the same function with a different gradient scale (some public
      implementations learn one value per head, or its logarithm);
    - diagonal masking: each token's logit to itself is ``-inf`` before the softmax, so its self weight is
      exactly 0 and attention goes to the *other* tokens (the class token included). With a single token
      there is nothing else to attend to and the mask is skipped.

    :meth:`attention_probs` returns the post-softmax weights forward uses (before attention dropout), for
    attention maps. Keyword arguments timm's ``Block`` passes (``qk_norm``, ``scale_norm``, ``gated``,
    ``norm_layer``, ``device``, ``dtype``) act as in timm's ``Attention``; ``depth`` (the block index timm
    gives some attention layers) is accepted and unused. ``is_causal=True`` is refused:
    with the diagonal masked the first token would attend to nothing. A checkpoint of a plain ViT lacks
    ``scale``: :func:`use_locality_attention` converts a loaded plain ViT instead.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable] = None,
        depth: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ConfigError(f"LocalitySelfAttention: dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ConfigError("LocalitySelfAttention: qk_norm/scale_norm need a norm_layer")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        # timm's flag (TIMM_FUSED_ATTN): F.scaled_dot_product_attention with the mask and scale passed in
        self.fused_attn = _use_fused_attn()
        # Submodules in timm's order and names: a plain ViT's weights map one to one, and with the same seed
        # the initial weights are those of the plain ViT.
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.scale = nn.Parameter(torch.full((), head_dim**-0.5, **dd))  # 1 / tau, learnable

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _bias(self, tokens: int, like: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Additive logit bias: ``-inf`` on the diagonal, plus the caller's mask (bool: True = may attend)."""
        bias = attn_mask
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device)
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        if tokens < 2:
            return bias
        eye = torch.eye(tokens, dtype=torch.bool, device=like.device)
        diagonal = torch.zeros((tokens, tokens), dtype=like.dtype, device=like.device).masked_fill(eye, float("-inf"))
        return diagonal if bias is None else bias + diagonal

    def _refuse_causal(self, is_causal: bool) -> None:
        if is_causal:
            raise ConfigError(
                "LocalitySelfAttention does not take is_causal=True: with each token's attention to "
                "itself masked, the first token would attend to nothing"
            )

    def attention_probs(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Post-softmax attention weights ``(B, heads, N, N)`` of input tokens ``x`` ``(B, N, dim)``; the
        diagonal is exactly 0. The weights :meth:`forward` applies (before attention dropout)."""
        self._refuse_causal(is_causal)
        q, k, _ = self._qkv(x)
        return self._probs(q, k, attn_mask)

    def _probs(self, q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        logits = (q * self.scale) @ k.transpose(-2, -1)
        bias = self._bias(q.shape[-2], logits, attn_mask)
        return (logits if bias is None else logits + bias).softmax(dim=-1)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        self._refuse_causal(is_causal)
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        if self.fused_attn:
            # the learnable scale goes into q (SDPA's `scale` takes a float only), so SDPA scales by 1
            x = F.scaled_dot_product_attention(
                q * self.scale,
                k,
                v,
                attn_mask=self._bias(tokens, q, attn_mask),
                dropout_p=self.attn_drop.p if self.training else 0.0,
                scale=1.0,
            )
        else:
            x = self.attn_drop(self._probs(q, k, attn_mask)) @ v
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "LocalitySelfAttention":
        """An LSA that reuses ``attn``'s (a timm ``Attention``, e.g. with loaded weights) submodules; the
        temperature starts at ``attn.scale``, so before training the only change is the diagonal mask."""
        lsa = cls.__new__(cls)
        nn.Module.__init__(lsa)
        lsa.num_heads, lsa.head_dim, lsa.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        lsa.fused_attn = bool(getattr(attn, "fused_attn", _use_fused_attn()))
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(lsa, name, getattr(attn, name))
        lsa.gate = getattr(attn, "gate", None)
        weight = attn.qkv.weight
        lsa.scale = nn.Parameter(torch.full((), float(attn.scale), dtype=weight.dtype, device=weight.device))
        return lsa


def _use_fused_attn() -> bool:
    try:  # timm is there whenever a timm ViT is built; a bare LSA without timm computes the weights itself
        from timm.layers import use_fused_attn
    except ImportError:
        return False
    return bool(use_fused_attn())


# ------------------------------------------------------------------------------------ model level
def _timm_module(name: str) -> str:
    import timm.models

    try:
        return timm.models.model_entrypoint(name).__module__
    except RuntimeError:
        return "not a timm model"


def locality_kwargs(name: str, *, spt: bool, lsa: bool, weights: str, kwargs: dict) -> dict:
    """The timm constructor kwargs that switch SPT/LSA on for model ``name`` (``{}`` when both are off).

    Refused with a :class:`ConfigError`: a model that is not a timm ViT/DeiT (:data:`VIT_MODULES`), SPT
    with pretrained weights (no checkpoint has its patch embedding), and ``kwargs`` that already set the
    layer. With pretrained weights LSA is not passed here: the plain ViT is loaded, then converted
    (:func:`use_locality_attention`).
    """
    if not (spt or lsa):
        return {}
    asked = " and ".join(f"model.vit.{k}" for k, on in (("spt", spt), ("lsa", lsa)) if on)
    where = "a MONAI net" if name.startswith("monai:") else _timm_module(name)
    if where not in VIT_MODULES:
        raise ConfigError(
            f"{asked} (spt/lsa) {'need' if spt and lsa else 'needs'} a timm Vision Transformer (vit_*/deit_* models such as "
            f"vit_tiny_patch16_224, deit_tiny_patch16_224, deit_small_patch16_224; their img_size and "
            f"patch_size can be set in model.kwargs); {name!r} is not one ({where})"
        )
    if spt and weights != "none":
        raise ConfigError(
            f"model.vit.spt with model.weights={weights!r}: SPT replaces the patch embedding "
            "(a LayerNorm and a linear layer over 5 shifted copies of each patch), which no "
            "pretrained checkpoint holds; train from scratch (model.weights: none, as the paper "
            "does) or start from a run that used SPT (model.weights: run:<run>)"
        )
    layers = {"embed_layer": ShiftedPatchEmbed} if spt else {}
    if lsa and weights == "none":
        layers["attn_layer"] = LocalitySelfAttention
    clash = sorted(set(layers) & set(kwargs))
    if clash:
        raise ConfigError(f"model.kwargs sets {', '.join(clash)}, which {asked} sets too; remove it from model.kwargs")
    return layers


def use_locality_attention(model: nn.Module) -> list[str]:
    """Replace every transformer block's ``attn`` (timm ``Attention``) by a :class:`LocalitySelfAttention`
    that keeps its weights (:meth:`LocalitySelfAttention.from_attention`); returns the module names."""
    from timm.layers.attention import Attention

    done = []
    for name, block in list(model.named_modules()):  # a list: blocks are changed on the way
        attn = getattr(block, "attn", None)
        if type(attn) is Attention:  # subclasses (rotary, ...) compute differently: left alone
            block.attn = LocalitySelfAttention.from_attention(attn)
            done.append(f"{name}.attn" if name else "attn")
    return done


def check_locality(model: nn.Module, name: str, *, spt: bool, lsa: bool) -> None:
    """Raise a :class:`ConfigError` when the built ``model`` did not take the layers (e.g. timm ViTs whose
    blocks have no replaceable attention, such as the parallel-block ones)."""
    if spt and not isinstance(getattr(model, "patch_embed", None), ShiftedPatchEmbed):
        raise ConfigError(
            f"model.vit.spt: {name!r} did not take the shifted patch embedding "
            f"(its patch_embed is {type(getattr(model, 'patch_embed', None)).__name__})"
        )
    if lsa:
        blocks = list(getattr(model, "blocks", []))
        kinds = sorted(
            {
                f"{type(b).__name__}.attn: {type(b.attn).__name__}"
                if hasattr(b, "attn")
                else f"{type(b).__name__} without one attn"
                for b in blocks
                if not isinstance(getattr(b, "attn", None), LocalitySelfAttention)
            }
        )
        if not blocks or kinds:
            raise ConfigError(
                f"model.vit.lsa: {name!r} has blocks whose attention LSA cannot replace "
                f"({'; '.join(kinds) or 'no blocks'}); use a plain vit_*/deit_* model such as "
                "vit_tiny_patch16_224"
            )
