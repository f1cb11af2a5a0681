"""Find the residual blocks of a CNN and the norm layers that end their residual branches.

This is the "where" half of the BN-gamma strategies (:mod:`medtricks.gamma.bn` is the
"what"). A small registry maps block classes to the norm layer that ends their residual branch;
built-in entries cover timm ResNet/ResNeXt/SE-ResNet/ResNet-D, timm EfficientNet/MobileNet blocks,
timm RegNet, torchvision ResNet and MONAI ResNet. Users add their own block types with
:func:`register_residual_block`.

Stages follow the model's own structure: a stage is a container module that holds registered
blocks (``layer4`` in a ResNet, ``blocks.5`` in an EfficientNet, ``s4`` in a RegNet), numbered in
model order from 0. A block counts as *residual* only when it actually adds a skip connection
(timm's ``has_skip``), so EfficientNet-Lite0's ``blocks.6.0`` is a block of stage 6 but not a
residual one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from medtricks.errors import ConfigError, ConfigTypeError, UnknownKeyError

__all__ = [
    "ResidualNorm",
    "find_residual_norms",
    "find_stages",
    "register_residual_block",
    "unregister_residual_block",
    "is_norm_layer",
]

# Attribute names that hold a block's shortcut path. Norms inside them are *not* on the residual
# branch: zeroing the shortcut's BN would cut the identity path, the opposite of the trick.
DEFAULT_SHORTCUT_NAMES: tuple[str, ...] = ("downsample", "shortcut")


@dataclass(frozen=True)
class _BlockSpec:
    last_norm: str | Callable[[nn.Module], nn.Module]
    has_skip: Callable[[nn.Module], bool] | None
    shortcut: tuple[str, ...]


# Keyed by class; lookups walk the MRO so subclasses (timm's CondConvResidual) inherit an entry.
_REGISTRY: dict[type, _BlockSpec] = {}


def _timm_has_skip(block: nn.Module) -> bool:
    # timm >= 0.9 uses `has_skip`; older releases called it `has_residual`.
    return bool(getattr(block, "has_skip", getattr(block, "has_residual", False)))


def _has_downsample_path(block: nn.Module) -> bool:
    # timm RegNet: `downsample` is None when the block has no shortcut, nn.Identity otherwise.
    return getattr(block, "downsample", None) is not None


def _uir_last_norm(block: nn.Module) -> nn.Module:
    # MobileNetV4 UniversalInvertedResidual: optional trailing depthwise conv after the projection.
    dw_end = getattr(block, "dw_end", None)
    if dw_end is not None and hasattr(dw_end, "bn"):
        return dw_end.bn
    return block.pw_proj.bn


# Built-in entries as (module, class name): resolved only once that module is already imported,
# so this file never imports timm/torchvision/MONAI itself (a model holding such a block has
# necessarily imported its module).
_BUILTINS: list[tuple[str, str, _BlockSpec]] = [
    ("timm.models.resnet", "BasicBlock", _BlockSpec("bn2", None, DEFAULT_SHORTCUT_NAMES)),
    ("timm.models.resnet", "Bottleneck", _BlockSpec("bn3", None, DEFAULT_SHORTCUT_NAMES)),
    ("timm.models.regnet", "Bottleneck", _BlockSpec("conv3.bn", _has_downsample_path, DEFAULT_SHORTCUT_NAMES)),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv", _BlockSpec("bn2", _timm_has_skip, ())),
    ("timm.models._efficientnet_blocks", "InvertedResidual", _BlockSpec("bn3", _timm_has_skip, ())),
    ("timm.models._efficientnet_blocks", "EdgeResidual", _BlockSpec("bn2", _timm_has_skip, ())),
    ("timm.models._efficientnet_blocks", "ConvBnAct", _BlockSpec("bn1", _timm_has_skip, ())),
    ("timm.models._efficientnet_blocks", "UniversalInvertedResidual", _BlockSpec(_uir_last_norm, _timm_has_skip, ())),
    ("torchvision.models.resnet", "BasicBlock", _BlockSpec("bn2", None, DEFAULT_SHORTCUT_NAMES)),
    ("torchvision.models.resnet", "Bottleneck", _BlockSpec("bn3", None, DEFAULT_SHORTCUT_NAMES)),
    ("monai.networks.nets.resnet", "ResNetBlock", _BlockSpec("bn2", None, DEFAULT_SHORTCUT_NAMES)),
    ("monai.networks.nets.resnet", "ResNetBottleneck", _BlockSpec("bn3", None, DEFAULT_SHORTCUT_NAMES)),
]
_resolved_builtins: set[tuple[str, str]] = set()


def _resolve_builtins() -> None:
    for module_name, class_name, spec in _BUILTINS:
        key = (module_name, class_name)
        if key in _resolved_builtins or module_name not in sys.modules:
            continue
        cls = getattr(sys.modules[module_name], class_name, None)
        if isinstance(cls, type):
            _REGISTRY.setdefault(cls, spec)  # a user's registration of the same class wins
        _resolved_builtins.add(key)


def register_residual_block(
    block_type: type,
    last_norm: str | Callable[[nn.Module], nn.Module],
    *,
    has_skip: Callable[[nn.Module], bool] | None = None,
    shortcut: Sequence[str] = DEFAULT_SHORTCUT_NAMES,
) -> None:
    """Teach :func:`find_residual_norms` a new residual block type (replaces any earlier entry).

    Args:
        block_type: the block class (subclasses are matched too, unless registered themselves).
        last_norm: dotted attribute path of the norm that ends the residual branch (``"bn3"``,
            ``"conv3.bn"``), or a callable ``block -> norm module``.
        has_skip: callable ``block -> bool`` telling whether this instance really adds a skip
            connection; ``None`` means every instance is residual.
        shortcut: attribute names of the shortcut path; norms inside them are not part of the
            residual branch (not touched by ``which="all"``).

    Example:
        >>> class MyBlock(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        ...     def forward(self, x):
        ...         return x + self.norm(self.conv(x))
        >>> register_residual_block(MyBlock, "norm")
        >>> [r.last_norm_name for r in find_residual_norms(nn.Sequential(nn.Sequential(MyBlock())))]
        ['0.0.norm']
        >>> unregister_residual_block(MyBlock)
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise ConfigTypeError(f"register_residual_block: block_type must be an nn.Module subclass, got {block_type!r}")
    if not (isinstance(last_norm, str) and last_norm) and not callable(last_norm):
        raise ConfigTypeError(
            "register_residual_block: last_norm must be a dotted attribute path such as 'bn3' "
            f"or a callable block -> norm module, got {last_norm!r}"
        )
    if has_skip is not None and not callable(has_skip):
        raise ConfigTypeError(
            f"register_residual_block: has_skip must be a callable block -> bool or None, got {has_skip!r}"
        )
    if isinstance(shortcut, str) or not all(isinstance(s, str) for s in shortcut):
        raise ConfigTypeError(f"register_residual_block: shortcut must be a list of attribute names, got {shortcut!r}")
    _resolve_builtins()  # so that a later lazy resolution cannot shadow this entry
    _REGISTRY[block_type] = _BlockSpec(last_norm, has_skip, tuple(shortcut))


def unregister_residual_block(block_type: type) -> None:
    """Remove a block type from the registry (``KeyError`` if it was not registered)."""
    _resolve_builtins()
    if block_type not in _REGISTRY:
        raise UnknownKeyError(f"{block_type!r} is not a registered residual block type")
    del _REGISTRY[block_type]


def _lookup(cls: type) -> _BlockSpec | None:
    for base in cls.__mro__:
        spec = _REGISTRY.get(base)
        if spec is not None:
            return spec
    return None


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalisation layers whose ``weight`` is the γ scale (BatchNorm, GroupNorm, ...)."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        return True
    # torchvision/timm FrozenBatchNorm2d keep γ/β as buffers and subclass nothing of the above.
    return "BatchNorm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor)


@dataclass(frozen=True, eq=False)
class ResidualNorm:
    """One residual block and the norm layers on its residual branch.

    Attributes:
        name: qualified block name, e.g. ``"layer4.1"``.
        stage: the model's stage index (position of the stage container, from 0).
        block: position of the block inside its stage container.
        global_block: index among all residual blocks of the model, in model order.
        stage_name: qualified name of the stage container, e.g. ``"layer4"``.
        last_norm_name: qualified name of the norm that ends the residual branch.
        last_norm: that norm module.
        norms: every norm on the residual branch (qualified name -> module, model order);
            norms on the shortcut (``downsample``) are excluded.
        module: the block module itself.
    """

    name: str
    stage: int
    block: int
    global_block: int
    stage_name: str
    last_norm_name: str
    last_norm: nn.Module = field(repr=False)
    norms: dict[str, nn.Module] = field(repr=False)
    module: nn.Module = field(repr=False)


@dataclass
class _Block:
    """Any registered block (residual or not), for stage discovery."""

    name: str
    module: nn.Module
    spec: _BlockSpec
    residual: bool
    stage: int = -1
    block: int = -1


@dataclass
class _Stage:
    index: int
    name: str
    blocks: list[_Block]

    @property
    def residual_blocks(self) -> list[_Block]:
        return [b for b in self.blocks if b.residual]


@dataclass
class ModelScan:
    """Everything the selection logic needs: stages, residual norms, every norm of the model."""

    stages: list[_Stage]
    residual: list[ResidualNorm]
    norms: dict[str, nn.Module]  # every norm layer of the model, qualified name -> module
    norm_owner: dict[str, _Block]  # norm name -> innermost registered block holding it

    @property
    def residual_stages(self) -> list[_Stage]:
        return [s for s in self.stages if s.residual_blocks]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _resolve_last_norm(block: _Block) -> tuple[str, nn.Module]:
    spec = block.spec
    where = f"block '{block.name}' ({type(block.module).__name__})"
    if isinstance(spec.last_norm, str):
        try:
            norm = block.module.get_submodule(spec.last_norm)
        except AttributeError as err:
            raise ConfigError(
                f"{where}: registered last_norm '{spec.last_norm}' does not exist ({err}); "
                "fix it with register_residual_block"
            ) from None
    else:
        norm = spec.last_norm(block.module)
    for sub_name, sub in block.module.named_modules():
        if sub is norm:
            break
    else:
        raise ConfigError(
            f"{where}: the registered last_norm returned {type(norm).__name__}, not a submodule of the block"
        )
    if not is_norm_layer(norm):
        raise ConfigError(
            f"{where}: the registered last norm '{sub_name}' is a {type(norm).__name__}, not a norm layer"
        )
    return _join(block.name, sub_name), norm


def _branch_norms(block: _Block) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    skip = tuple(s + "." for s in block.spec.shortcut)
    for sub_name, sub in block.module.named_modules():
        if not sub_name or sub_name in block.spec.shortcut or sub_name.startswith(skip):
            continue
        if is_norm_layer(sub):
            out[_join(block.name, sub_name)] = sub
    return out


def scan_model(model: nn.Module) -> ModelScan:
    """Walk ``model`` once: registered blocks, their stages, residual norms and all norm layers."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _resolve_builtins()
    blocks: list[_Block] = []
    norms: dict[str, nn.Module] = {}
    norm_owner: dict[str, _Block] = {}
    for name, module in model.named_modules():
        owner = next((b for b in reversed(blocks) if name.startswith(b.name + ".") or not b.name), None)
        if is_norm_layer(module):
            norms[name] = module
            if owner is not None:
                norm_owner[name] = owner
        spec = _lookup(type(module))
        if spec is None or owner is not None:
            continue  # not a block, or nested inside one (the outermost registered block wins)
        residual = True if spec.has_skip is None else bool(spec.has_skip(module))
        blocks.append(_Block(name, module, spec, residual))

    # Stages: the containers holding blocks, in model order; a block's index is its position there.
    stages: dict[str, _Stage] = {}
    for blk in blocks:
        parent = _parent(blk.name)
        stage = stages.setdefault(parent, _Stage(len(stages), parent, []))
        container = model.get_submodule(parent) if parent else model
        child = blk.name.rsplit(".", 1)[-1]
        blk.stage = stage.index
        # The model itself may be a registered block (name ""): then it is block 0 of stage 0.
        blk.block = [n for n, _ in container.named_children()].index(child) if blk.name else 0
        stage.blocks.append(blk)

    residual: list[ResidualNorm] = []
    for blk in blocks:
        if not blk.residual:
            continue
        last_name, last = _resolve_last_norm(blk)
        branch = _branch_norms(blk)
        branch.setdefault(last_name, last)
        residual.append(
            ResidualNorm(
                name=blk.name,
                stage=blk.stage,
                block=blk.block,
                global_block=len(residual),
                stage_name=_parent(blk.name),
                last_norm_name=last_name,
                last_norm=last,
                norms=branch,
                module=blk.module,
            )
        )
    return ModelScan(list(stages.values()), residual, norms, norm_owner)


def find_residual_norms(model: nn.Module) -> list[ResidualNorm]:
    """List every residual block of ``model`` with the norm layer(s) on its residual branch.

    Blocks are found through the registry (see :func:`register_residual_block`); blocks without a
    skip connection (timm ``has_skip=False``) are not residual and are left out.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False)
        >>> last = find_residual_norms(m)[-1]
        >>> (last.name, last.stage, last.block, last.last_norm_name)
        ('layer4.1', 3, 1, 'layer4.1.bn2')
    """
    return scan_model(model).residual


def find_stages(model: nn.Module) -> list[str]:
    """Qualified names of the stage containers of ``model`` (the modules that hold its registered blocks,
    residual or not), in model order: ``layer1`` .. ``layer4`` for a ResNet, ``blocks.0`` .. ``blocks.6``
    for an EfficientNet; a model that is itself one block has none. The output of each is what
    ``medtricks cka --granularity stage`` and ``medtricks attention`` read of a CNN.

    Example:
        >>> import timm
        >>> find_stages(timm.create_model("resnet18", pretrained=False))
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    return [stage.name for stage in scan_model(model).stages if stage.name]


def iter_stage_lines(scan: ModelScan) -> Iterator[str]:
    """Human-readable lines describing the stages (used by ``gamma_preview``)."""
    for stage in scan.stages:
        n_res, n_all = len(stage.residual_blocks), len(stage.blocks)
        note = "" if n_res else "  (no skip: not residual)"
        yield f"stage {stage.index}  {stage.name or '<root>'}: {n_res}/{n_all} blocks residual{note}"
