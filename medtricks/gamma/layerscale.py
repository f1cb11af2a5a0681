"""LayerScale-γ strategies: the transformer analogue of the BN-γ strategies.

A LayerScale (CaiT, Touvron et al. 2021) multiplies each residual branch of a transformer block by a
learnable per-channel vector γ: ``x = x + γ1 * attn(norm1(x))``, ``x = x + γ2 * mlp(norm2(x))``.
γ=0 makes the block the identity, exactly (no β to worry about, unlike BatchNorm), and γ=1 is a
block without LayerScale. As with :mod:`medtricks.gamma.bn`, the strategies act on the
*built and loaded* model, in place, and may target only late blocks.

Where γ lives (found by structure, not by model name):

* timm blocks with ``ls1``/``ls2`` children (``vit_*``, ``deit3_*``, ``hiera``, ``maxvit``'s
  transformer blocks, ...): a :class:`timm.layers.LayerScale` when the model was built with
  ``init_values``, an ``nn.Identity`` otherwise;
* timm blocks with ``gamma_1``/``gamma_2`` parameters (CaiT's self- and class-attention blocks,
  BEiT, EVA): a parameter, or ``None`` without LayerScale.

``ls1``/``gamma_1`` is the attention branch (``branch="attn"``), ``ls2``/``gamma_2`` the MLP branch
(``branch="mlp"``). Blocks are numbered in model order over the whole network (CaiT's two
class-attention blocks come after its 24 self-attention blocks).

Selectors (each given selector narrows the set): ``blocks`` (positions among those blocks, negative
counts from the end), ``last_n_blocks``, ``names`` (fnmatch patterns on the γ holders' names such as
``blocks.11.ls2`` or ``blocks_token_only.1.gamma_1``) and ``branch`` (``both``, ``attn``, ``mlp``).

"Late", in the named strategies, means the last ⌈n/4⌉ blocks (3 of ViT-Tiny's 12 -- as ResNet-50's
``layer4`` is 3 of its 16 blocks) unless ``blocks``, ``last_n_blocks`` or ``names`` is given.

A model without LayerScale (``init_values=None``) is an error that names it -- unless
``insert=True``: then an ``nn.Identity`` ``ls1``/``ls2`` of a *selected* block is replaced by a
:class:`timm.layers.LayerScale` holding the value to set (unselected blocks stay without one). The
model's state dict then has extra ``<block>.ls1.gamma`` tensors; :func:`insert_layerscale_for_state`
adds the same modules before such a state dict is loaded (``medtricks.posthoc.load.load_trained`` calls it).
Only ``ls1``/``ls2`` blocks whose LayerScale acts on the last dimension (ViT-style) can be inserted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from medtricks.errors import ConfigError, ConfigTypeError
from medtricks.gamma.config import (
    BRANCHES,
    LAYERSCALE_WHERE,
    STRATEGIES,
    LayerScalePlan,
    _as_branch,
    _as_float,
    _as_int_list,
    _as_last_n,
    _as_patterns,
    _bad,
    check_layerscale_config,
)
from medtricks.gamma.report import GammaNoEffectWarning, GammaReport

__all__ = [
    "STRATEGIES",
    "BRANCHES",
    "LayerScaleSite",
    "LayerScaleReport",
    "LayerScalePlan",
    "find_layerscale",
    "apply_layerscale_gamma",
    "apply_layerscale_strategy",
    "check_layerscale_config",
    "insert_layerscale_for_state",
]

_HOLDERS = (("ls1", "ls2"), ("gamma_1", "gamma_2"))  # (attn, mlp) attribute names


class LayerScaleReport(GammaReport):
    """A :class:`~medtricks.gamma.bn.GammaReport` of LayerScale γ's (``stage`` is the
    position of the block's container, ``block`` the block's position over the whole model; β
    columns are always empty: LayerScale has none)."""

    shown_columns = ("name", "stage", "block", "old_gamma_mean", "new_gamma")

    def merged(self, other: "GammaReport", *, strategy: Optional[str] = None) -> "LayerScaleReport":
        merged = super().merged(other, strategy=strategy)
        return LayerScaleReport(merged.rows, strategy=merged.strategy)


@dataclass(frozen=True, eq=False)
class LayerScaleSite:
    """One residual branch of a transformer block and its LayerScale γ (if any).

    Attributes:
        name: qualified name of the γ holder: ``blocks.3.ls1`` (a module) or ``blocks.3.gamma_1``.
        block_name: qualified name of the block (``blocks.3``).
        block: position of the block among the model's transformer blocks (model order, from 0).
        stage: position of the block's container among the containers holding blocks.
        branch: ``attn`` (``ls1``/``gamma_1``) or ``mlp`` (``ls2``/``gamma_2``).
        attr: the attribute name on the block (``ls1``, ``ls2``, ``gamma_1``, ``gamma_2``).
        module: the block module.
    """

    name: str
    block_name: str
    block: int
    stage: int
    branch: str
    attr: str
    module: nn.Module = field(repr=False)

    @property
    def gamma(self) -> Optional[torch.Tensor]:
        """The γ tensor, or ``None`` where the branch has no LayerScale."""
        holder = getattr(self.module, self.attr, None)
        if isinstance(holder, torch.Tensor):
            return holder
        gamma = getattr(holder, "gamma", None)
        return gamma if isinstance(gamma, torch.Tensor) else None


def _model_label(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = getattr(model, "medtricks_info", {}).get("name") or (
        cfg.get("architecture") if isinstance(cfg, Mapping) else None
    )
    return f"{name} ({type(model).__name__})" if name else type(model).__name__


def find_layerscale(model: nn.Module) -> list[LayerScaleSite]:
    """Every residual branch of every transformer block of ``model`` that can hold a LayerScale γ,
    in model order (two per block). ``site.gamma is None`` where the model has no LayerScale.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, init_values=1e-5)
        >>> [(s.name, s.block, s.branch) for s in find_layerscale(m)]
        [('blocks.0.ls1', 0, 'attn'), ('blocks.0.ls2', 0, 'mlp'), ('blocks.1.ls1', 1, 'attn'), ('blocks.1.ls2', 1, 'mlp')]
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    sites: list[LayerScaleSite] = []
    blocks: list[str] = []
    stages: dict[str, int] = {}
    for name, module in model.named_modules():
        if any(name.startswith(b + ".") or not b for b in blocks):
            continue  # nested inside a block already found: the outermost wins
        for attn_attr, mlp_attr in _HOLDERS:
            if not (hasattr(module, attn_attr) and hasattr(module, mlp_attr)):
                continue
            if attn_attr == "gamma_1" and not all(
                getattr(module, a) is None or isinstance(getattr(module, a), torch.Tensor) for a in _HOLDERS[1]
            ):
                continue
            if attn_attr == "ls1" and not all(isinstance(getattr(module, a), nn.Module) for a in _HOLDERS[0]):
                continue
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            stage = stages.setdefault(parent, len(stages))
            for attr, branch in ((attn_attr, "attn"), (mlp_attr, "mlp")):
                prefix = f"{name}." if name else ""
                sites.append(LayerScaleSite(f"{prefix}{attr}", name, len(blocks), stage, branch, attr, module))
            blocks.append(name)
            break
    return sites


# ------------------------------------------------------------------------------------- selection
def _late_n(n_blocks: int) -> int:
    return max(1, math.ceil(n_blocks / 4))


def _select(
    sites: Sequence[LayerScaleSite],
    *,
    blocks: Optional[list[int]],
    last_n_blocks: Optional[int],
    names: Optional[list[str]],
    branch: str,
    where: str,
    label: str,
    stacklevel: int,
) -> list[LayerScaleSite]:
    n_blocks = len({s.block for s in sites})
    chosen = [s for s in sites if branch == "both" or s.branch == branch]
    if blocks is not None:
        keep = set()
        for b in blocks:
            if not -n_blocks <= b < n_blocks:
                raise _bad(
                    where,
                    "blocks",
                    blocks,
                    f"block positions -{n_blocks}..{n_blocks - 1} (the model has "
                    f"{n_blocks} transformer blocks); {b} is out of range",
                )
            keep.add(b % n_blocks)
        chosen = [s for s in chosen if s.block in keep]
    if last_n_blocks is not None:
        if last_n_blocks > n_blocks:
            raise _bad(where, "last_n_blocks", last_n_blocks, f"at most {n_blocks} (the model's transformer blocks)")
        chosen = [s for s in chosen if s.block >= n_blocks - last_n_blocks]
    if names is not None:
        for pattern in names:
            if not any(fnmatchcase(s.name, pattern) for s in chosen):
                warnings.warn(
                    f"{label}: names pattern {pattern!r} matches no LayerScale site among the selected "
                    f"blocks (sites are named like {sites[-1].name!r})",
                    GammaNoEffectWarning,
                    stacklevel=stacklevel,
                )
        chosen = [s for s in chosen if any(fnmatchcase(s.name, p) for p in names)]
    if not chosen:
        described = (
            ", ".join(
                f"{k}={v!r}"
                for k, v in (("blocks", blocks), ("last_n_blocks", last_n_blocks), ("names", names))
                if v is not None
            )
            or "every block"
        )
        warnings.warn(
            f"{label}: the selection ({described}, branch={branch!r}) matched no LayerScale; nothing "
            f"changed. The model has {n_blocks} transformer blocks",
            GammaNoEffectWarning,
            stacklevel=stacklevel,
        )
    return chosen


def _require_sites(model: nn.Module, sites: Sequence[LayerScaleSite], label: str) -> None:
    if not sites:
        raise ConfigError(
            f"{label}: {_model_label(model)} has no transformer block with LayerScale slots (ls1/ls2 or "
            "gamma_1/gamma_2); LayerScale-gamma strategies are for timm ViTs (vit_*, deit*, cait_*, ...). "
            "For a CNN use tricks.bn_gamma"
        )


def _check_present(model: nn.Module, chosen: Sequence[LayerScaleSite], insert: bool, label: str) -> None:
    absent = [s for s in chosen if s.gamma is None]
    if not absent:
        return
    if insert:
        bad = [s.name for s in absent if s.attr not in ("ls1", "ls2")]
        if bad:
            raise ConfigError(
                f"{label}: insert=True can add LayerScale only where a block has ls1/ls2 modules; "
                f"{', '.join(bad[:4])} are gamma_1/gamma_2 = None (build the model with init_values)"
            )
        return
    shown = ", ".join(s.name for s in absent[:4]) + (", ..." if len(absent) > 4 else "")
    raise ConfigError(
        f"{label}: {_model_label(model)} has no LayerScale at {shown} ({len(absent)} of the selected branches: "
        "nn.Identity or None, i.e. built with init_values=None). Use a model built with LayerScale "
        "(model.kwargs: {init_values: 1.0e-5} for a model trained from scratch, or pretrained deit3_*/cait_*), "
        "or insert=True (recipe: insert: true) to add timm LayerScale modules holding the value set here"
    )


def _make_layerscale(dim: int, value: float, like: nn.Module) -> nn.Module:
    from timm.layers import LayerScale  # timm is only needed when a LayerScale is inserted

    ref = next(like.parameters(), None)
    layer = LayerScale(dim, init_values=value)
    return layer.to(device=ref.device, dtype=ref.dtype) if ref is not None else layer


def _branch_dim(site: LayerScaleSite) -> int:
    norm = getattr(site.module, "norm1" if site.branch == "attn" else "norm2", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return int(weight.shape[0])
    raise ConfigError(
        f"cannot insert a LayerScale at {site.name}: its block has no "
        f"{'norm1' if site.branch == 'attn' else 'norm2'} with a 1-D weight to take the width from"
    )


def _set(
    model: nn.Module, chosen: Sequence[LayerScaleSite], value: float, strategy: str, insert: bool, label: str
) -> LayerScaleReport:
    _check_present(model, chosen, insert, label)
    rows = []
    with torch.no_grad():
        for site in chosen:
            gamma = site.gamma
            if gamma is None:  # insert=True (checked above)
                setattr(site.module, site.attr, _make_layerscale(_branch_dim(site), value, site.module))
                old = None
            else:
                old = float(gamma.detach().float().mean())
                gamma.fill_(value)
            rows.append(
                {
                    "name": site.name,
                    "stage": site.stage,
                    "block": site.block,
                    "old_gamma_mean": old,
                    "new_gamma": value,
                    "old_beta_mean": None,
                    "new_beta": None,
                }
            )
    return LayerScaleReport(rows, strategy=strategy)


# ------------------------------------------------------------------------------------ public API
def apply_layerscale_gamma(
    model: nn.Module,
    value: float,
    *,
    blocks: int | Sequence[int] | None = None,
    last_n_blocks: int | None = None,
    names: str | Sequence[str] | None = None,
    branch: str = "both",
    insert: bool = False,
) -> LayerScaleReport:
    """Set the LayerScale γ of the chosen transformer blocks to ``value``, in place.

    With no selector it acts on every block; ``blocks`` (positions over the model's blocks, negative
    from the end), ``last_n_blocks`` and ``names`` (fnmatch on ``blocks.3.ls1``-style names) narrow
    the set, ``branch`` picks ``attn``, ``mlp`` or ``both``. A selection that matches nothing warns
    with :class:`GammaNoEffectWarning`; a selected branch without LayerScale is a ``ConfigError``
    naming the model, unless ``insert=True`` (then a :class:`timm.layers.LayerScale` holding
    ``value`` is inserted; see the module docstring).

    Returns:
        a :class:`LayerScaleReport` (one row per γ set: name, stage, block, old γ mean -- empty for
        an inserted one -- and new γ).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, init_values=1e-5)
        >>> apply_layerscale_gamma(m, 0.0, last_n_blocks=1).names
        ['blocks.3.ls1', 'blocks.3.ls2']
        >>> float(m.blocks[3].ls2.gamma.detach().abs().sum())
        0.0
    """
    where = "apply_layerscale_gamma: "
    value = _as_float(value, where, "value")
    if not isinstance(insert, bool):
        raise _bad(where, "insert", insert, "True or False")
    sites = find_layerscale(model)
    _require_sites(model, sites, "apply_layerscale_gamma")
    chosen = _select(
        sites,
        blocks=_as_int_list(blocks, where, "blocks"),
        last_n_blocks=_as_last_n(last_n_blocks, where),
        names=_as_patterns(names, where, "names"),
        branch=_as_branch(branch, where),
        where=where,
        label="apply_layerscale_gamma",
        stacklevel=3,
    )
    return _set(model, chosen, value, "apply_layerscale_gamma", insert, "apply_layerscale_gamma")


def apply_layerscale_strategy(model: nn.Module, config: Mapping[str, Any]) -> LayerScaleReport:
    """Apply the recipe section ``tricks.layerscale_gamma`` (a plain dict) to ``model`` in place.

    The strategies read as in ``tricks.bn_gamma``: ``zero_all`` (γ=0 everywhere), ``zero_late``,
    ``one_late``, ``zero_late_one_rest`` (γ=0 late, γ=1 on every other block) and ``rules``; "late"
    is the last ⌈n/4⌉ blocks unless ``blocks``/``last_n_blocks``/``names`` say otherwise.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=8, init_values=1e-5)
        >>> print(apply_layerscale_strategy(m, {"strategy": "zero_late"}).summary())
        zero_late: 4 layers; gamma=0 x4 (blocks.6.ls1, blocks.6.ls2, ...)
    """
    plan = check_layerscale_config(config)
    if plan.strategy == "none":
        return LayerScaleReport([], strategy="none")
    label = f"tricks.layerscale_gamma ({plan.strategy})"
    sites = find_layerscale(model)
    _require_sites(model, sites, label)

    def pick(selectors: Mapping[str, Any], branch: str, where: str, label_: str) -> list[LayerScaleSite]:
        return _select(sites, **selectors, branch=branch, where=where, label=label_, stacklevel=4)

    def put(chosen, value):
        return _set(model, chosen, value, plan.strategy, plan.insert, label)

    if plan.strategy == "zero_all":
        return put(pick(plan.selectors, plan.branch, LAYERSCALE_WHERE, label), 0.0)
    if plan.strategy in ("zero_late", "one_late", "zero_late_one_rest"):
        late_sel = dict(plan.selectors)
        if all(v is None for v in late_sel.values()):
            late_sel["last_n_blocks"] = _late_n(len({s.block for s in sites}))
        late = pick(late_sel, plan.branch, LAYERSCALE_WHERE, label)
        if plan.strategy != "zero_late_one_rest":
            return put(late, 0.0 if plan.strategy == "zero_late" else 1.0)
        late_names = {s.name for s in late}
        rest = [
            s
            for s in pick({k: None for k in plan.selectors}, plan.branch, LAYERSCALE_WHERE, label)
            if s.name not in late_names
        ]
        report = put(rest, 1.0).merged(put(late, 0.0))
        order = {s.name: i for i, s in enumerate(sites)}
        report.rows.sort(key=lambda row: order[row["name"]])
        return report
    report = LayerScaleReport([], strategy="rules")
    for i, rule in enumerate(plan.rules):
        chosen = pick(rule.selectors, rule.branch, rule.where, f"tricks.layerscale_gamma rules[{i}]")
        report = report.merged(put(chosen, rule.value))
    return report


def insert_layerscale_for_state(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Before loading ``state_dict`` into ``model``: insert a :class:`timm.layers.LayerScale` wherever
    the state dict has ``<block>.ls1.gamma`` / ``<block>.ls2.gamma`` and the model an ``nn.Identity``
    there (a model whose LayerScale was inserted by ``insert=True``). Returns the inserted names."""
    inserted = []
    for key, tensor in state_dict.items():
        if not (key.endswith(".ls1.gamma") or key.endswith(".ls2.gamma")) or not isinstance(tensor, torch.Tensor):
            continue
        holder = key[: -len(".gamma")]
        block_name, attr = holder.rsplit(".", 1)
        try:
            block = model.get_submodule(block_name)
        except AttributeError:
            continue
        if isinstance(getattr(block, attr, None), nn.Identity) and tensor.ndim == 1:
            setattr(block, attr, _make_layerscale(int(tensor.shape[0]), 1.0, block))
            inserted.append(holder)
    return inserted
