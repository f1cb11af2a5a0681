"""``tricks.reinit_late``: forget the pretrained weights of the last stages (Transfusion-style partial reuse; the
keys: :mod:`medtricks.tricks.keys.reinit_late`).

Raghu et al. (NeurIPS 2019, "Transfusion") found on chest X-rays that reusing only the lower pretrained
layers and re-initialising the upper ones keeps most of ImageNet transfer's benefit; Zhang et al. (ICLR
2021) saw re-initialising top layers help with few samples. This trick re-draws every weight and BN
statistic of the chosen stages *after the pretrained load*, with timm's own initialisation for the
model family (see :mod:`medtricks.models.reinit`), so three runs can be compared:

* keep everything (``none``), * zero γ late (``bn_gamma=zero_late``), * forget late (``reinit_late``).

Recipe::

    tricks:
      reinit_late:
        stages: 1              # the last N stages that have residual blocks ("late" as in bn_gamma's
                               # zero_late: layer4 of a ResNet, blocks.5 of EfficientNet-Lite0), or
                               # stage/module names: [layer3, layer4], [blocks.5, blocks.6, conv_head, bn2]
        zero_init_last: false  # true: also zero the last BN γ of each re-drawn block (timm's from-scratch default)

``ablate --tricks reinit_late`` (1 stage) or ``reinit_late=2``. The draws come from a generator derived
from ``experiment.seed`` (same seed, same re-initialisation; independent of what other tricks draw).

Python::

    from medtricks.tricks.reinit_late import reinit_late
    report = reinit_late(model, stages=1, seed=0)
    print(report)            # one row per re-drawn module: name, stage, type, old/new weight std
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Union

from torch import nn

from medtricks.errors import ConfigError
from medtricks.gamma.blocks import scan_model
from medtricks.models.reinit import derive_seed, reinit_modules
from medtricks.tricks.base import ReportsWhatItChanged
from medtricks.tricks.keys.reinit_late import ReinitLateConfig, ReinitLateKeys

__all__ = ["ReinitLateConfig", "ReinitReport", "ReinitLate", "reinit_late", "late_stage_names"]

REPORT_COLUMNS = ("name", "stage", "type", "tensors", "old_weight_std", "new_weight_std")


class ReinitReport:
    """What :func:`reinit_late` re-drew: one row per module that holds tensors of its own."""

    def __init__(self, rows: list[dict[str, Any]], *, stages: list[str], family: str, seed: int) -> None:
        self.rows, self.stages, self.family, self.seed = rows, stages, family, seed

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def modules(self) -> list[str]:
        return [r["name"] for r in self.rows]

    def summary(self) -> str:
        n = sum(r["tensors"] for r in self.rows)
        return (
            f"reinit_late ({self.family} init): {', '.join(self.stages)}; {len(self.rows)} modules, "
            f"{n} tensors re-drawn"
        )[:250]

    def __str__(self) -> str:
        lines = [self.summary(), "  ".join(f"{c:>14}" if i else f"{c:<28}" for i, c in enumerate(REPORT_COLUMNS))]
        for r in self.rows:
            cells = [
                f"{r['name']:<28}",
                f"{r['stage']:>14}",
                f"{r['type']:>14}",
                f"{r['tensors']:>14}",
                *(
                    f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{'-':>14}"
                    for c in ("old_weight_std", "new_weight_std")
                ),
            ]
            lines.append("  ".join(cells))
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        return path


def late_stage_names(model: nn.Module, stages: Union[int, list[str]]) -> list[str]:
    """Qualified names of the modules ``stages`` selects: the last N stages with residual blocks, or names."""

    scan = scan_model(model)
    known = ", ".join(s.name for s in scan.stages if s.name) or "(none found)"
    if isinstance(stages, bool) or not isinstance(stages, (int, list)):
        raise ConfigError(f"tricks.reinit_late.stages must be a count or a list of stage names, got {stages!r}")
    if isinstance(stages, int):
        residual = scan.residual_stages
        if stages < 1 or stages > len(residual):
            raise ConfigError(
                f"tricks.reinit_late.stages={stages}: the model has {len(residual)} stage(s) with "
                f"residual blocks ({', '.join(s.name for s in residual)}); give 1..{len(residual)}"
            )
        return [s.name for s in residual[-stages:]]
    modules = dict(model.named_modules())
    missing = [n for n in stages if n not in modules or not n]
    if missing:
        raise ConfigError(
            f"tricks.reinit_late.stages names {missing}, not modules of this model; its stages are "
            f"{known} (any qualified module name, e.g. conv_head, also works)"
        )
    return list(stages)


def _own_tensors(module: nn.Module) -> list[tuple[str, Any]]:
    return [
        *module.named_parameters(recurse=False),
        *((n, b) for n, b in module.named_buffers(recurse=False) if b is not None and b.is_floating_point()),
    ]


def _std(module: nn.Module) -> float:
    weight = getattr(module, "weight", None)
    if weight is None or not hasattr(weight, "numel") or weight.numel() < 2:
        return math.nan
    return float(weight.detach().float().std())


def reinit_late(
    model: nn.Module, stages: Union[int, list[str]] = 1, *, seed: int = 0, zero_init_last: bool = False
) -> ReinitReport:
    """Re-initialise the chosen stages of ``model`` in place with timm's initialisation for its family.

    Args:
        model: a built model whose pretrained weights are loaded (a timm/medtricks model, possibly
            wrapped, e.g. behind a learnable resizer).
        stages: the last N stages that have residual blocks (as bn_gamma's ``zero_late`` counts them), or
            a list of stage / module names (``["layer4"]``, ``["blocks.5", "blocks.6", "conv_head"]``).
        seed: the run's seed; the draws use ``derive_seed(seed, "reinit_late")`` and leave the global RNG as it was.
        zero_init_last: also zero the last BN γ of each re-drawn residual block (timm ResNet's from-scratch default).

    Returns:
        A :class:`ReinitReport` naming every module re-drawn (and the init family used).

    Example::

        >>> from medtricks.models import create_model
        >>> m = create_model("resnet18", weights="none")
        >>> reinit_late(m, 1).stages
        ['layer4']
    """
    names = late_stage_names(model, stages)
    before: dict[str, float] = {}
    rows_modules: list[tuple[str, str, nn.Module]] = []
    for stage in names:
        root = model.get_submodule(stage)
        for sub, module in root.named_modules():
            if _own_tensors(module):
                full = f"{stage}.{sub}" if sub else stage
                rows_modules.append((full, stage, module))
                before[full] = _std(module)
    family = reinit_modules(model, names, seed=derive_seed(seed, "reinit_late"), zero_init_last=zero_init_last)
    rows = [
        {
            "name": full,
            "stage": stage,
            "type": type(module).__name__,
            "tensors": len(_own_tensors(module)),
            "old_weight_std": before[full],
            "new_weight_std": _std(module),
        }
        for full, stage, module in rows_modules
    ]
    return ReinitReport(rows, stages=names, family=family, seed=seed)


class ReinitLate(ReportsWhatItChanged, ReinitLateKeys):
    """Re-draws the chosen stages when the model is built and reports every module it re-drew."""

    keep_empty_report = True  # logged and stored even when it lists nothing, as before

    def on_model(self, model):
        cfg = self.config.reinit_late
        self.report = reinit_late(
            model, cfg.stages, seed=self.recipe.experiment.seed, zero_init_last=cfg.zero_init_last
        )
