"""Optimizer parameter groups: no-bias-decay, layer-wise LR decay and per-module LR multipliers."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from medtricks.errors import ConfigError

__all__ = ["build_param_groups", "build_optimizer", "is_no_decay_param"]


def is_no_decay_param(name: str, param: torch.Tensor) -> bool:
    """Bias and every normalization parameter (1-D tensors) are exempt under no-bias-decay.

    Same rule as timm's ``param_groups_weight_decay``: all 1-D parameters (BN/GN/LN γ and β, biases)
    plus anything named ``*.bias``.
    """
    return param.ndim <= 1 or name.endswith(".bias")


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    no_bias_decay: bool = False,
    layer_decay: Optional[float] = None,
    stage_of: Optional[Callable[[nn.Module], dict[str, int]]] = None,
    lr_mults: Optional[dict[str, float]] = None,
) -> list[dict]:
    """Group trainable parameters by (weight decay, LR scale).

    timm's ``param_groups_weight_decay`` / ``param_groups_layer_decay`` each cover one of these;
    recipes combine no-bias-decay with layer decay and a resizer LR multiplier, so the grouping is
    done here in one pass. ``lr_scale`` is honoured by timm's schedulers.

    - ``no_bias_decay``: biases and norm parameters get ``weight_decay=0``.
    - ``layer_decay``: parameter in stage ``s`` of ``S`` gets LR scale ``layer_decay ** (S - s)``
      (``stage_of(model)`` maps parameter names to stages, 0 = stem, ``S`` = head).
    - ``lr_mults``: ``{"resizer.": 2.0}`` multiplies the LR of parameters whose name starts so.
    """
    stages = stage_of(model) if (layer_decay is not None and stage_of is not None) else {}
    last_stage = max(stages.values()) if stages else 0
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if (no_bias_decay and is_no_decay_param(name, param)) else weight_decay
        scale = 1.0
        if stages:
            scale *= layer_decay ** (last_stage - stages.get(name, last_stage))
        for prefix, mult in (lr_mults or {}).items():
            if name.startswith(prefix):
                scale *= mult
        key = (decay, round(scale, 12))
        group = groups.setdefault(key, {"params": [], "param_names": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ConfigError("the model has no trainable parameters (is everything frozen?)")
    return list(groups.values())


def build_optimizer(
    param_groups: list[dict], *, name: str, lr: float, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """``sgd`` (heavy-ball momentum), ``nesterov`` (the paper's NAG) or ``adamw``."""
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups]
    for group in groups:
        # The base LR; the scheduler multiplies by group["lr_scale"] (timm convention).
        group["lr"] = lr
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "nesterov")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ConfigError(f"optim.name must be 'sgd', 'nesterov' or 'adamw', got {name!r}")
