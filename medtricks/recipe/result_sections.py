"""The recipe sections that say what happens around the trained model: ``eval`` (the final evaluation and its
threshold), ``tracking`` (where the run is logged), ``audit`` (robustness and shortcut audits) and
``ablation`` (``medtricks ablate``'s study). Every name is importable from :mod:`medtricks.recipe.sections`."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from medtricks._defaults import DEFAULT_METRIC
from medtricks._schema import Section
from medtricks.audit.attack_names import check_attack_name
from medtricks.errors import ConfigError
from medtricks.recipe.setup_sections import SEED_LIMIT

_Section = Section  # every recipe section: unknown keys and booleans-for-numbers are errors


class EvalConfig(_Section):
    """The final evaluation of the best checkpoint: intervals, plots, the decision threshold."""

    n_bootstrap: int = Field(
        1000, ge=0, description="bootstrap resamples for the metrics' confidence intervals; 0: no intervals"
    )
    ci: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of every interval, 0 < x < 1")
    plots: bool = Field(True, description="log the plots (confusion matrix, ROC, reliability, LR schedule)")
    threshold: Literal["youden", "sensitivity", "none"] = Field(
        "youden",
        description="binary models: the decision threshold chosen on validation and stored with the "
        "model: youden (max sensitivity + specificity - 1), sensitivity (reach target_sensitivity) or none (the "
        "arg-max class)",
    )
    target_sensitivity: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="threshold: sensitivity: the sensitivity to reach on validation, 0 < x <= 1"
    )

    @model_validator(mode="after")
    def _target_needs_method(self) -> "EvalConfig":
        if self.threshold == "sensitivity" and self.target_sensitivity is None:
            raise ConfigError("eval.threshold is 'sensitivity' but eval.target_sensitivity is not set (e.g. 0.95)")
        return self


class TrackingConfig(_Section):
    """Where the run is logged: MLflow, or a local run store inside the run folders."""

    backend: Literal["mlflow", "none"] = Field(
        "mlflow", description="mlflow, or none (a local run store of plain files in each run folder)"
    )
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI; null: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`"
    )
    experiment: Optional[str] = Field(None, description="MLflow experiment; null: experiment.name")
    run_name: Optional[str] = Field(None, description="MLflow run name; null: experiment.name and a short id")
    log_model: bool = Field(
        True, description="log the trained model (model/ and the servable mlflow_model/) as artifacts"
    )


class AuditConfig(_Section):
    """Audits of the best checkpoint on the validation split after training: adversarial attacks, image
    corruptions, and the shortcut audit."""

    enabled: bool = Field(False, description="run the robustness audit (attacks and corruptions) after training")
    attacks: list[str] = Field(
        default_factory=lambda: ["fgsm", "pgd_linf"],
        description="attacks: any of fgsm, "
        "pgd_linf, pgd_l2, apgd_ce, apgd_square, square, transfer (transfer needs surrogate)",
    )
    eps: list[float] = Field(
        default_factory=lambda: [0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255],
        description="attack budgets, in units of the [0, 1] pixel range (1/255 = one grey level)",
    )
    pgd_steps: int = Field(10, ge=1, description="iterations of the PGD attacks")
    corruptions: list[str] = Field(
        default_factory=lambda: ["all"], description="image corruptions: all, or names from medtricks.audit.corruptions"
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        description="corruption severities, distinct integers 0..5 (0: the clean image)",
    )
    n: int = Field(500, ge=1, description="validation images audited")
    surrogate: Optional[str] = Field(
        None, description="transfer attack: the run (folder or id) whose model crafts the attacks"
    )
    target_class: Optional[Union[int, str]] = Field(
        None, description="a class name or index: targeted attacks toward it; null: untargeted"
    )
    n_bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the audit's intervals; 0: none")
    square_queries: int = Field(1000, ge=1, description="the Square attack's query budget (standard AutoAttack: 5000)")
    masking_checks: bool = Field(True, description="gradient-masking checks when pgd_linf (untargeted) runs")
    shortcut: bool = Field(
        False, description="run the shortcut audit (lungs hidden / lungs only, border, Grad-CAM) after training"
    )
    shortcut_border: float = Field(
        0.08, gt=0.0, lt=0.5, description="shortcut audit: width of the blanked frame, as a fraction of the image side"
    )

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, value):
        return [check_attack_name(name) for name in value]  # a typo or a renamed attack fails before training


class AblationConfig(_Section):
    """``medtricks ablate``: the tricks to compare, the seeds, the table's metric and where the children train.
    The command line's options win over these keys; ``medtricks run`` ignores the section."""

    tricks: list[str] = Field(
        default_factory=list,
        description="trick specs to ablate, e.g. [warmup, "
        "bn_gamma=zero_late] (the ablate names in the recipe reference's tricks table)",
    )
    seeds: Union[int, list[int]] = Field(
        5, description="seeds per variant: a count (experiment.seed, +1, ...) or a list of distinct seeds"
    )
    mode: Literal["cumulative", "one_at_a_time", "grid"] = Field(
        "cumulative",
        description="cumulative (add the tricks one by one), one_at_a_time (each alone on the base) "
        "or grid (every combination)",
    )
    metric: str = Field(
        DEFAULT_METRIC, description="the table's metric, `val/<name>` or `test/<name>` (the best checkpoint's value)"
    )
    jobs: int = Field(1, ge=1, description="children trained at once by the local executor")
    test: Literal["t", "wilcoxon"] = Field("t", description="the seed-level paired test vs the baseline")
    # so the intervals cover which patients land in the test split, not only the training noise
    resplit: bool = Field(
        False,
        description="repeated hold-out: each seed also draws its own patient-level split (data.split_seed = seed)",
    )
    # Where the children train (medtricks/ablation/executors.py): not part of what is trained.
    executor: Literal["local", "ray"] = Field(
        "local", description="where the children train: local (this machine) or ray (one Ray task each)"
    )
    address: Optional[str] = Field(
        None,
        description="ray: null starts a local Ray, auto joins this machine's "
        "cluster, `ray://host:10001` connects a client",
    )
    cpus_per_run: float = Field(1.0, ge=0, description="ray: CPUs (and torch threads) per child")
    gpus_per_run: float = Field(0.0, ge=0, description="ray: GPUs per child (fractions share a GPU)")
    retries: int = Field(
        2, ge=0, description="ray: restarts of a child whose worker died (it resumes from its checkpoint)"
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ConfigError("ablation.seeds must be >= 1 (a count) or a list of seeds")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ConfigError("ablation.seeds as a list must be non-empty and without repeats")
        if isinstance(value, list) and any(not 0 <= seed < SEED_LIMIT for seed in value):
            raise ConfigError(f"ablation.seeds: every seed must be 0 <= seed < 2**32 ({SEED_LIMIT}), got {value}")
        return value
