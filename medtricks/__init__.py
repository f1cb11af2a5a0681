"""medtricks: bag-of-tricks fine-tuning of pretrained CNNs on chest X-rays.

Public API (imported lazily, so ``import medtricks`` is cheap)::

    from medtricks import load_recipe, run_recipe
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["optim.lr=0.05"])
    result = run_recipe(recipe)

    from medtricks import create_model, apply_bn_gamma
    model = create_model("resnet18", weights="none", num_classes=2, in_chans=1)
    print(apply_bn_gamma(model, 0.0, stages=[-1], beta=0.0))

The package in layers, top to bottom (docs/architecture.md has the table; tests/docs/test_import_graph.py
keeps the line between the orchestration and the rest): ``cli`` → the orchestration (``run``,
``self_train``, ``ablation``, ``deploy``, ``posthoc``: everything that works on a finished run) → the
building blocks (``recipe``, ``data``, ``models``, ``gamma``, ``tricks``, ``train``, ``evaluate``,
``audit``, ``tracking``, ``rundir``) → the foundations (``errors``, ``_defaults``, ``_atomic``, ...).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # recipes and runs
    "Recipe": "medtricks.recipe",
    "RecipeError": "medtricks.recipe",
    "load_recipe": "medtricks.recipe",
    "run_recipe": "medtricks.run",
    "load_trained": "medtricks.posthoc.load",
    "evaluate_trained": "medtricks.posthoc.evaluation",
    "export_model": "medtricks.posthoc.export",
    "RunResult": "medtricks.run",
    # data
    "load_card": "medtricks.data",
    "read_image": "medtricks.data",
    "build_manifest": "medtricks.data",
    "build_datasets": "medtricks.data",
    "synthesize_phantoms": "medtricks.data",
    # models
    "create_model": "medtricks.models",
    "get_data_config": "medtricks.models",
    "freeze_model": "medtricks.models",
    "LearnableResizer": "medtricks.models",
    "ResizerModel": "medtricks.models",
    "ShiftedPatchEmbed": "medtricks.models",
    "LocalitySelfAttention": "medtricks.models",
    # the γ library and the builders the engine takes
    "find_residual_norms": "medtricks.gamma.bn",
    "apply_bn_gamma": "medtricks.gamma.bn",
    "apply_gamma_strategy": "medtricks.gamma.bn",
    "register_residual_block": "medtricks.gamma.bn",
    "GammaReport": "medtricks.gamma.bn",
    "apply_layerscale_gamma": "medtricks.gamma.layerscale",
    "apply_layerscale_strategy": "medtricks.gamma.layerscale",
    "find_layerscale": "medtricks.gamma.layerscale",
    "build_scheduler": "medtricks.train.schedules",
    "build_param_groups": "medtricks.train.param_groups",
    # training and evaluation
    "fit": "medtricks.train",
    "predict": "medtricks.train",
    "compute_metrics": "medtricks.evaluate",
    "MetricsResult": "medtricks.evaluate",
    "linear_cka": "medtricks.evaluate.cka",
    "minibatch_cka": "medtricks.evaluate.cka",
    "cka_trained": "medtricks.posthoc.representations",
    "attention_maps": "medtricks.posthoc.attention",
    "mean_ci": "medtricks.evaluate",
    "paired_comparison": "medtricks.evaluate",
    "OperatingPoint": "medtricks.evaluate",
    "select_threshold": "medtricks.evaluate",
    "prior_shift": "medtricks.evaluate",
    "probs_at_threshold": "medtricks.evaluate",
    "ensemble_runs": "medtricks.posthoc.ensemble",
    "class_weights": "medtricks.tricks.class_balance",
    # robustness audits
    "run_audit": "medtricks.audit",
    "AuditResult": "medtricks.audit",
    "list_corruptions": "medtricks.audit",
    "audit_trained": "medtricks.posthoc.auditing",
    "predict_images": "medtricks.posthoc.predict",
    # ablations
    "run_ablation": "medtricks.ablation",
    "make_variants": "medtricks.ablation",
    "compare_runs": "medtricks.ablation",
    # few labels: Noisy Student self-training (issue 17)
    "run_self_train": "medtricks.self_train",
    "NoiseConfig": "medtricks.self_train",
    # tricks as plug-ins
    "Trick": "medtricks.tricks.base",
    "TrickContext": "medtricks.tricks.base",
    "AblationName": "medtricks.tricks.base",
    "register_trick": "medtricks.tricks.base",
    "registered_tricks": "medtricks.tricks.base",
    # run folders and run stores
    "RunDir": "medtricks.rundir",
    "create_store": "medtricks.tracking",
    "find_run": "medtricks.tracking",
    "RunStore": "medtricks.tracking",
    "LocalStore": "medtricks.tracking",
    "RunRecord": "medtricks.tracking",
    # errors
    "MedtricksError": "medtricks.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medtricks' has no attribute {name!r}")


def __dir__():
    return __all__
