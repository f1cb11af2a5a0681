"""The recipe's sections: one pydantic model per section, each key with its type, default, bounds and meaning.

The ``description`` of every field is what the generated recipe reference (docs/gen_pages.py) shows as the
key's meaning, so it says what the key does, its unit, and its allowed values where the type does not. The
``tricks:`` section is not here: each trick owns its keys (medtricks/tricks/), and :class:`~medtricks.recipe.
Recipe` assembles them from the trick registry.

The sections by concern: :mod:`~medtricks.recipe.setup_sections` (``experiment``, ``data``, ``model``: what
trains, on which images, from which weights), :mod:`~medtricks.recipe.training_sections` (``optim``,
``schedule``, ``train``: how it trains) and :mod:`~medtricks.recipe.result_sections` (``eval``, ``tracking``,
``audit``, ``ablation``: what is measured, logged and compared). Every name is importable from here.
"""

from __future__ import annotations

from medtricks.recipe.result_sections import AblationConfig, AuditConfig, EvalConfig, TrackingConfig
from medtricks.recipe.setup_sections import (
    RUN_WEIGHTS_PREFIX,
    SEED_LIMIT,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    ResizerConfig,
    SynthConfig,
    UnlabeledConfig,
    VitConfig,
    check_run_name,
    check_weights_spec,
)
from medtricks.recipe.training_sections import (
    CacheFrozenConfig,
    OptimConfig,
    ProgressiveResizeConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "SEED_LIMIT",
    "RUN_WEIGHTS_PREFIX",
    "check_run_name",
    "check_weights_spec",
    "ExperimentConfig",
    "SynthConfig",
    "UnlabeledConfig",
    "DataConfig",
    "ResizerConfig",
    "VitConfig",
    "ModelConfig",
    "OptimConfig",
    "ProgressiveResizeConfig",
    "ScheduleConfig",
    "CacheFrozenConfig",
    "TrainConfig",
    "EvalConfig",
    "TrackingConfig",
    "AuditConfig",
    "AblationConfig",
]
