"""Everything that works on a *finished* run (orchestration, like :mod:`medtricks.run`, which trains one).

- :mod:`~medtricks.posthoc.load` — load a run (folder, model file or run id) as a model with its recipe.
- :mod:`~medtricks.posthoc.evaluation` — ``medtricks evaluate``: metrics with CIs on any card's data.
- :mod:`~medtricks.posthoc.decision` — the operating point, prior shift and site profile a binary run decides by.
- :mod:`~medtricks.posthoc.tta` — flip test-time augmentation, opt-in by name.
- :mod:`~medtricks.posthoc.overlap` — evaluation images and patients the run trained or selected on.
- :mod:`~medtricks.posthoc.store` — the run's files and the run store its results are logged to.
- :mod:`~medtricks.posthoc.auditing` — ``medtricks audit``: adversarial, corruption and shortcut audits.
- :mod:`~medtricks.posthoc.predict` — ``medtricks predict``: image files in, a predictions table out.
- :mod:`~medtricks.posthoc.export` — ``medtricks export``: ONNX, TorchScript or an MLflow model.
- :mod:`~medtricks.posthoc.ensemble` — ``medtricks ensemble``: several runs averaged on the same images.
- :mod:`~medtricks.posthoc.representations` — ``medtricks cka``: which layers fine-tuning moved.
- :mod:`~medtricks.posthoc.attention` — ``medtricks attention``: a ViT's attention maps and distances.

The names below are re-exported for ``from medtricks.posthoc import evaluate_trained``; code inside
medtricks imports them from the module that defines them.
"""

from __future__ import annotations

from medtricks.evaluate.drop import PerformanceDrop, performance_drop, unpaired_bootstrap_delta
from medtricks.posthoc.auditing import (
    AuditReport,
    audit_model,
    audit_trained,
    log_audit,
    log_shortcut,
    parse_eps,
    shortcut_audit_model,
)
from medtricks.posthoc.decision import DecisionRule, load_operating_point, resolve_decision_rule
from medtricks.posthoc.evaluation import (
    EvaluationReport,
    eval_dataset,
    evaluate_trained,
    image_set_digest,
    log_evaluation,
    summarize_predictions,
)
from medtricks.posthoc.overlap import SplitOverlap, split_overlap
from medtricks.posthoc.store import posthoc_store, start_posthoc_run
from medtricks.posthoc.tta import TTA_MODES, FlipTTA, flip_tta_warning, resolve_tta
from medtricks.rundir import PREDICTIONS_EVAL_FILE

__all__ = [
    "EvaluationReport",
    "evaluate_trained",
    "FlipTTA",
    "eval_dataset",
    "AuditReport",
    "audit_trained",
    "audit_model",
    "log_audit",
    "parse_eps",
    "DecisionRule",
    "resolve_decision_rule",
    "load_operating_point",
    "unpaired_bootstrap_delta",
    "performance_drop",
    "PerformanceDrop",
    "summarize_predictions",
    "log_evaluation",
    "image_set_digest",
    "PREDICTIONS_EVAL_FILE",
    "posthoc_store",
    "resolve_tta",
    "flip_tta_warning",
    "TTA_MODES",
    "SplitOverlap",
    "split_overlap",
    "shortcut_audit_model",
    "log_shortcut",
    "start_posthoc_run",
]
