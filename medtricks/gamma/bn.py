"""BN-gamma strategies: set γ (and β) of the norm layers that end chosen residual branches.

He et al. (2019) initialise γ=0 in the last BatchNorm of *every* residual block so each block
starts as the identity. timm's ``zero_init_last`` and torchvision's ``zero_init_residual`` do this
at construction, and loading pretrained weights overwrites it. Here the strategies are applied to
an already-built (and loaded) model, in place, and may target only *late* blocks, or set γ=1.

Selection rules (each given selector narrows the set):

* ``stages``: the model's stage numbers (``layer1`` = 0 in a ResNet, ``blocks.5`` = 5 in an
  EfficientNet). Negative indices count back over the stages that contain at least one residual
  block, so ``stages=[-1]`` is the last *residual* stage (``blocks.5`` on EfficientNet-Lite0, whose
  ``blocks.6`` has no skip). This is also what "late" means in the named strategies.
* ``blocks``: positions inside each selected stage; negative indices count back over that stage's
  residual blocks.
* ``last_n_blocks``: the last N residual blocks of the whole network.
* ``names``: fnmatch patterns on qualified norm-layer names. Alone, they match *any* norm layer of
  the model (e.g. a DenseNet's); with other selectors they filter the norms those select.
* ``which``: ``"last"`` = the norm ending each selected residual branch; ``"all"`` = every norm on
  the branch (shortcut/``downsample`` norms are never touched).

Named strategies (recipe ``tricks.bn_gamma``): ``none``, ``zero_all`` (the paper), ``zero_late``,
``one_late``, ``zero_late_one_rest`` and ``rules`` (an ordered list; later rules override earlier
ones). Wherever a strategy sets γ=0 it also sets β=0 unless ``beta`` says otherwise (``keep`` or a
number): a pretrained β is not zero, so γ=0 alone would leave a constant offset on the branch.
"""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medtricks.errors import ConfigError, ResourceError
from medtricks.gamma.config import (
    _KEEP,
    STRATEGIES,
    GammaPlan,
    _as_beta,
    _as_float,
    _as_int_list,
    _as_last_n,
    _as_patterns,
    _as_which,
    _bad,
    check_gamma_config,
)
from medtricks.gamma.blocks import (
    ModelScan,
    ResidualNorm,
    find_residual_norms,
    iter_stage_lines,
    register_residual_block,
    scan_model,
    unregister_residual_block,
)
from medtricks.gamma.report import GammaNoEffectWarning, GammaReport

__all__ = [
    "STRATEGIES",
    "GammaNoEffectWarning",
    "GammaReport",
    "ResidualNorm",
    "apply_bn_gamma",
    "apply_gamma_strategy",
    "check_gamma_config",
    "GammaPlan",
    "find_residual_norms",
    "gamma_preview",
    "register_residual_block",
    "unregister_residual_block",
]


def _stage_indices(scan: ModelScan, stages: list[int], where: str) -> set[int]:
    n_all, residual = len(scan.stages), scan.residual_stages
    chosen: set[int] = set()
    for s in stages:
        if s >= 0:
            if s >= n_all:
                names = ", ".join(f"{st.index}={st.name or '<root>'}" for st in scan.stages)
                raise _bad(where, "stages", stages, f"stage numbers 0..{n_all - 1} ({names}); {s} is out of range")
            chosen.add(s)
        else:
            if -s > len(residual):
                raise _bad(
                    where,
                    "stages",
                    stages,
                    f"negative indices down to -{len(residual)} (the model has {len(residual)} stages with "
                    f"residual blocks); {s} is out of range",
                )
            chosen.add(residual[s].index)
    return chosen


def _block_keys(scan: ModelScan, stage_idx: set[int] | None, blocks: list[int], where: str) -> set[tuple[int, int]]:
    stages = [st for st in scan.stages if stage_idx is None or st.index in stage_idx]
    keys: set[tuple[int, int]] = set()
    for b in blocks:
        hit = False
        for st in stages:
            if b >= 0:
                if any(blk.block == b for blk in st.blocks):
                    keys.add((st.index, b))
                    hit = True
            elif -b <= len(st.residual_blocks):
                keys.add((st.index, st.residual_blocks[b].block))
                hit = True
        if not hit:
            sizes = ", ".join(
                f"stage {st.index}: {len(st.blocks)} blocks ({len(st.residual_blocks)} residual)" for st in stages
            )
            raise _bad(
                where, "blocks", blocks, f"block positions that exist in the selected stages ({sizes}); {b} does not"
            )
    return keys


def _select(
    scan: ModelScan,
    *,
    stages: list[int] | None,
    blocks: list[int] | None,
    last_n_blocks: int | None,
    names: list[str] | None,
    which: str,
    where: str,
    label: str,
    restrict_to: Sequence[ResidualNorm] | None = None,
    stacklevel: int = 3,
) -> dict[str, nn.Module]:
    """Norm layers picked by the selectors, in model order (empty -> a GammaNoEffectWarning)."""
    structural = stages is not None or blocks is not None or last_n_blocks is not None
    described = (
        ", ".join(
            f"{k}={v!r}"
            for k, v in (("stages", stages), ("blocks", blocks), ("last_n_blocks", last_n_blocks), ("names", names))
            if v is not None
        )
        or "every residual block"
    )
    if structural or names is None:
        described += f", which={which!r}"
    if not scan.residual and (structural or names is None):
        warnings.warn(
            f"{label}: the model has no residual block that medtricks knows (found {len(scan.norms)} norm "
            "layers); nothing changed. Register its block type with register_residual_block(...) or "
            "select norm layers with names=[...].",
            GammaNoEffectWarning,
            stacklevel=stacklevel,
        )
        return {}

    chosen_blocks = list(scan.residual if restrict_to is None else restrict_to)
    stage_idx = _stage_indices(scan, stages, where) if stages is not None else None
    if stage_idx is not None:
        chosen_blocks = [r for r in chosen_blocks if r.stage in stage_idx]
    if blocks is not None:
        keys = _block_keys(scan, stage_idx, blocks, where)
        chosen_blocks = [r for r in chosen_blocks if (r.stage, r.block) in keys]
    if last_n_blocks is not None:
        if last_n_blocks > len(scan.residual):
            raise _bad(
                where, "last_n_blocks", last_n_blocks, f"at most {len(scan.residual)} (the model's residual blocks)"
            )
        last = {r.global_block for r in scan.residual[-last_n_blocks:]}
        chosen_blocks = [r for r in chosen_blocks if r.global_block in last]

    if structural or names is None:
        candidates: dict[str, nn.Module] = {}
        for r in chosen_blocks:
            candidates.update({r.last_norm_name: r.last_norm} if which == "last" else r.norms)
    else:
        candidates = dict(scan.norms)  # names alone may pick any norm of the model (e.g. DenseNet)

    if names is not None:
        for pattern in names:
            if not any(fnmatchcase(n, pattern) for n in candidates):
                warnings.warn(
                    f"{label}: names pattern {pattern!r} matches no norm layer"
                    + (" among the blocks selected by the other selectors" if structural else " of the model"),
                    GammaNoEffectWarning,
                    stacklevel=stacklevel,
                )
        candidates = {n: m for n, m in candidates.items() if any(fnmatchcase(n, p) for p in names)}

    if not candidates:
        stage_list = "; ".join(iter_stage_lines(scan))
        warnings.warn(
            f"{label}: the selection ({described}) matched no layer; nothing changed. Model stages: {stage_list}",
            GammaNoEffectWarning,
            stacklevel=stacklevel,
        )
    order = {n: i for i, n in enumerate(scan.norms)}
    return dict(sorted(candidates.items(), key=lambda kv: order.get(kv[0], len(order))))


def _set_norms(
    scan: ModelScan, selected: Mapping[str, nn.Module], value: float, beta: float | None, strategy: str
) -> GammaReport:
    """Set γ (and β) of ``selected`` in place; checks every layer before changing any."""
    for name, norm in selected.items():
        if not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise ConfigError(
                f"norm layer '{name}' ({type(norm).__name__}) has no affine weight (gamma) to set; "
                "build the model with affine norm layers or leave this layer out of the selection"
            )
        if beta is not None and not isinstance(getattr(norm, "bias", None), torch.Tensor):
            raise ConfigError(
                f"norm layer '{name}' ({type(norm).__name__}) has no bias (beta); use beta=None to keep it"
            )
    rows = []
    with torch.no_grad():
        for name, norm in selected.items():
            owner = scan.norm_owner.get(name)
            bias = getattr(norm, "bias", None)
            rows.append(
                {
                    "name": name,
                    "stage": owner.stage if owner is not None else None,
                    "block": owner.block if owner is not None else None,
                    "old_gamma_mean": float(norm.weight.detach().float().mean()),
                    "new_gamma": value,
                    "old_beta_mean": float(bias.detach().float().mean()) if isinstance(bias, torch.Tensor) else None,
                    "new_beta": beta,
                }
            )
            norm.weight.fill_(value)
            if beta is not None:
                bias.fill_(beta)
    return GammaReport(rows, strategy=strategy)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def apply_bn_gamma(
    model: nn.Module,
    value: float,
    *,
    stages: int | Sequence[int] | None = None,
    blocks: int | Sequence[int] | None = None,
    last_n_blocks: int | None = None,
    which: str = "last",
    names: str | Sequence[str] | None = None,
    beta: float | str | None = None,
) -> GammaReport:
    """Set γ of the chosen residual-branch norm layers to ``value``, in place.

    With no selector it acts on every residual block. Selectors narrow the set (see the module
    docstring): ``stages`` (negative = counted over residual stages), ``blocks`` (positions in a
    stage), ``last_n_blocks``, ``names`` (fnmatch patterns; alone they may pick any norm layer).
    ``which="last"`` sets the norm ending each residual branch, ``"all"`` every norm on it.
    ``beta``: ``None`` (default) follows the strategies' rule -- β=0 wherever γ becomes 0, so the
    block starts as the identity as He et al. intend; otherwise β is kept -- ``"keep"`` keeps β, a
    number sets it. A selection that matches nothing leaves the model unchanged and warns with
    :class:`GammaNoEffectWarning`.

    Returns:
        a :class:`GammaReport` with one row per layer set (name, stage, block, old γ mean, new γ,
        old β mean, new β).

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False)
        >>> report = apply_bn_gamma(m, 0.0, stages=[-1])
        >>> report.names
        ['layer4.0.bn2', 'layer4.1.bn2']
        >>> float(m.layer4[1].bn2.weight.detach().abs().sum())
        0.0
    """
    where = "apply_bn_gamma: "
    value = _as_float(value, where, "value")
    beta_v = _as_beta(beta, where)
    scan = scan_model(model)
    selected = _select(
        scan,
        stages=_as_int_list(stages, where, "stages"),
        blocks=_as_int_list(blocks, where, "blocks"),
        last_n_blocks=_as_last_n(last_n_blocks, where),
        names=_as_patterns(names, where, "names"),
        which=_as_which(which, where),
        where=where,
        label="apply_bn_gamma",
        stacklevel=3,  # warn in _select -> apply_bn_gamma -> caller
    )
    return _set_norms(scan, selected, value, _beta_for(value, beta_v), "apply_bn_gamma")


def _beta_for(value: float, setting: float | str | None) -> float | None:
    """Strategy default: β=0 wherever γ is set to 0 (block(x)=0 at start), otherwise keep."""
    if setting == _KEEP:
        return None
    if setting is None:
        return 0.0 if value == 0.0 else None
    return float(setting)


def apply_gamma_strategy(model: nn.Module, config: Mapping[str, Any]) -> GammaReport:
    """Apply the recipe section ``tricks.bn_gamma`` (a plain dict) to ``model`` in place.

    Keys: ``strategy`` (one of :data:`STRATEGIES`; defaults to ``rules`` when ``rules`` is given,
    else ``none``), ``stages``, ``blocks``, ``last_n_blocks``, ``names``, ``which``, ``beta``
    (null = strategy default: β=0 where γ becomes 0, else kept; ``keep``; or a number) and
    ``rules`` (list of dicts with ``value`` and the same selectors, applied in order).
    "late" means ``stages: [-1]`` -- the last stage with a residual block -- unless ``stages``,
    ``last_n_blocks`` or ``names`` is given. ``zero_late_one_rest`` sets γ=1 on every other
    residual-branch norm (same ``which``).

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False)
        >>> print(apply_gamma_strategy(m, {"strategy": "zero_late"}).summary())
        zero_late: 2 layers; gamma=0 beta=0 x2 (layer4.0.bn2, layer4.1.bn2)
        >>> r = apply_gamma_strategy(m, {"rules": [{"stages": [-1], "value": 0.0},
        ...                                        {"stages": [-2], "value": 1.0}]})
        >>> len(r)
        4
    """
    plan = check_gamma_config(config)
    strategy, sel, which, beta, where = plan.strategy, plan.selectors, plan.which, plan.beta, plan.where
    if strategy == "none":
        return GammaReport([], strategy="none")

    scan = scan_model(model)
    label = f"tricks.bn_gamma ({strategy})"

    def pick(selectors: Mapping[str, Any], which_: str, where_: str, label_: str, **kw: Any) -> dict[str, nn.Module]:
        # stacklevel: _select -> pick -> apply_gamma_strategy -> caller
        return _select(scan, **selectors, which=which_, where=where_, label=label_, stacklevel=4, **kw)

    if strategy == "zero_all":
        return _set_norms(scan, pick(sel, which, where, label), 0.0, _beta_for(0.0, beta), strategy)

    if strategy in ("zero_late", "one_late", "zero_late_one_rest"):
        late_sel = dict(sel)
        if sel["stages"] is None and sel["last_n_blocks"] is None and sel["names"] is None:
            late_sel["stages"] = [-1]
        late = pick(late_sel, which, where, label)
        if strategy != "zero_late_one_rest":
            value = 0.0 if strategy == "zero_late" else 1.0
            return _set_norms(scan, late, value, _beta_for(value, beta), strategy)
        rest_all = pick({k: None for k in sel}, which, where, label)
        rest = {n: m for n, m in rest_all.items() if n not in late}
        report = _set_norms(scan, rest, 1.0, _beta_for(1.0, beta), strategy)
        report = report.merged(_set_norms(scan, late, 0.0, _beta_for(0.0, beta), strategy))
        order = {n: i for i, n in enumerate(scan.norms)}
        report.rows.sort(key=lambda row: order[row["name"]])
        return report

    # strategy == "rules": applied in order, the report shows the net effect per layer.
    report = GammaReport([], strategy="rules")
    for i, rule in enumerate(plan.rules):
        chosen = pick(rule.selectors, rule.which, rule.where, f"tricks.bn_gamma rules[{i}]")
        report = report.merged(_set_norms(scan, chosen, rule.value, _beta_for(rule.value, rule.beta), "rules"))
    return report


def _build_model(model_name: str, weights: str, in_chans: int, num_classes: int) -> tuple[nn.Module, str]:
    try:  # here, not at the top: without medtricks.models the preview falls back to bare timm (tested)
        from medtricks.models import create_model
    except ImportError as err:
        if err.name not in ("medtricks.models", "medtricks"):
            raise  # medtricks.models exists but is broken: do not hide it
        create_model = None
    if create_model is not None:
        model = create_model(model_name, weights=weights, num_classes=num_classes, in_chans=in_chans)
        return model, "medtricks.models.create_model"
    if weights not in (None, "none"):
        raise ResourceError(
            f"gamma_preview: weights={weights!r} needs medtricks.models.create_model, which is not "
            "available; use weights='none' to inspect the architecture only"
        )
    import timm  # fallback for bare timm names only

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return model, "timm.create_model (medtricks.models unavailable)"


def gamma_preview(
    model_name: str,
    *,
    weights: str = "none",
    strategy: str = "zero_late",
    stages: Sequence[int] | None = None,
    last_n_blocks: int | None = None,
    names: Sequence[str] | None = None,
    which: str = "last",
    in_chans: int = 3,
    num_classes: int = 2,
    blocks: Sequence[int] | None = None,
) -> str:
    """Text for ``medtricks gamma MODEL``: the model's stages and what ``strategy`` would change.

    Builds the model (no training), applies the strategy to that throw-away copy and returns the
    stage list, the report table and the one-line summary. No-effect warnings are included in
    the text instead of being emitted.

    Example:
        >>> print(gamma_preview("resnet18", strategy="zero_late"))  # doctest: +SKIP
    """
    if strategy == "rules":
        raise ConfigError("gamma_preview: strategy 'rules' needs a recipe; preview a named strategy instead")
    model, built_with = _build_model(model_name, weights, in_chans, num_classes)
    model.eval()
    config = {
        "strategy": strategy,
        "stages": stages,
        "blocks": blocks,
        "last_n_blocks": last_n_blocks,
        "names": names,
        "which": which,
    }
    scan = scan_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GammaNoEffectWarning)
        report = apply_gamma_strategy(model, config)
    touched = {row["stage"] for row in report.rows}
    lines = [
        f"medtricks gamma: {model_name} (weights={weights}, built with {built_with})",
        f"strategy={strategy}, which={which}"
        + "".join(
            f", {k}={v}"
            for k, v in (("stages", stages), ("blocks", blocks), ("last_n_blocks", last_n_blocks), ("names", names))
            if v is not None
        ),
        "",
        "Stages (non-negative indices = these numbers; negative indices and 'late' count back over "
        "the stages that have residual blocks):",
    ]
    lines += [
        f"  {line}{'   <- changed' if st.index in touched else ''}"
        for st, line in zip(scan.stages, iter_stage_lines(scan))
    ]
    if not scan.stages:
        lines.append("  (no known residual block types in this model)")
    lines += ["", f"Would change {len(report)} norm layers:", str(report), "", f"summary: {report.summary()}"]
    if weights in (None, "none"):
        lines.append(
            "note: weights=none shows random-init values (timm ResNets already start with gamma=0 "
            "in each block's last BN); pass --weights to see the loaded ones"
        )
    lines += [f"warning: {w.message}" for w in caught if issubclass(w.category, GammaNoEffectWarning)]
    return "\n".join(lines)
