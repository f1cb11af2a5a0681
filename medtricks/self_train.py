"""Noisy Student self-training (Xie et al., CVPR 2020): ``medtricks self-train RECIPE --rounds N``.

Round 0 trains the *teacher* on the labelled images only (the recipe as given, with
``tricks.pseudo_label`` off). Every later round ``k`` trains a *noised student* on the labelled images
plus the unlabelled pool pseudo-labelled by round ``k-1``'s model, then promotes it to the next
round's teacher. A round is an ordinary ``medtricks run`` of a recipe with a few keys overridden
(:func:`round_overrides`):

- ``tricks.pseudo_label.enabled=true`` and ``tricks.pseudo_label.teacher=<round k-1's run folder>``:
  as in the paper, the teacher is not noised: it labels each unlabelled image *clean* -- the run's
  evaluation transform (pre-resize, center crop, normalisation; no augmentation) -- in eval mode (no
  dropout, no stochastic depth), while the student trains on the *augmented* view of the same image
  (:mod:`medtricks.tricks.pseudo_label`; the run logs ``pseudo_label.teacher_input: clean``). Images
  whose top probability reaches ``tricks.pseudo_label.threshold`` join the loss (hard arg-max labels,
  or the teacher's probabilities with ``tricks.pseudo_label.soft=true``; ``weighting: confidence``
  weighs each by the teacher's top probability; the recipe's ``threshold``/``soft``/``weighting``/
  ``weight``/``weight_ramp`` are used as they are). The teacher labels online, batch by batch; with a
  frozen eval-mode teacher and a deterministic clean view that gives the labels of the paper's one
  pass over the pool, at the cost of one teacher forward per unlabelled batch;
- the noise (:class:`NoiseConfig`; the paper's values by default): ``model.drop_rate`` (dropout
  before the classifier, 0.5), ``model.kwargs.drop_path_rate`` (stochastic depth, 0.2; only where
  the timm model takes it — ResNets, EfficientNets, ConvNeXts, ViTs — else left out with a note),
  and a stronger augmentation preset (``data.augment=cxr_shift``: wider crops, gamma, CLAHE, blur,
  noise, downscaling);
- optionally a bigger student architecture (``NoiseConfig.student`` → ``model.name``; the student
  should be equal or larger: a smaller one is allowed with a warning).

The labelled/unlabelled split is the recipe's (``data.label_fraction`` / ``data.label_count`` /
``data.unlabeled``): every round sees the same labelled images and the same pool, and the same
validation split.

Where this still differs from Noisy Student (Xie et al. 2020):

- the student is the teacher's architecture unless ``NoiseConfig.student`` names a larger one (the paper
  grows it every iteration, EfficientNet-B7 → L2), and each student starts from the recipe's weights
  (ImageNet, ...), not from scratch nor from the teacher;
- no data balancing: the paper keeps (duplicating or dropping) the same number of pseudo-labelled images
  per class; here the pool is used as it comes, filtered by the threshold (and weighted by confidence
  with ``weighting: confidence``);
- the recipe's defaults, not the paper's: hard labels (``soft: false``; the paper's default is soft,
  ``--set tricks.pseudo_label.soft=true``), a 0.95 threshold (the paper's filter is 0.3), an
  unlabelled batch of ``train.batch_size`` (the paper's is several times the labelled one), and the
  noise is an X-ray augmentation preset (``cxr_shift``), not RandAugment;
- the paper's iterations: it runs three teacher → student iterations on JFT's 300 M unlabelled images,
  with long schedules; ``--rounds`` sets how many here, each an ordinary run of the recipe's length.

Tracking: one parent run (role ``self_train_parent``) and one child run per round (role
``self_train_child``, tag ``round``), in MLflow or, with ``tracking.backend: none``, in the local run
store inside the self-training folder ``<output_dir>/<name>/self-train-<id>/``. The id hashes the
recipe and the noise (not the number of rounds: ``--rounds 3`` after ``--rounds 2`` adds a round).
``self_train_state.json`` in that folder records every finished round; re-running the same command
skips them and continues an interrupted round from its last checkpoint (``run_recipe(...,
resume="auto")`` inside the round's own folder).

At the end: a table (round, model, teacher, val AUROC and accuracy with their bootstrap CIs, test
metrics when the recipe has a test split, the share of pseudo-labels kept) printed and logged, and a
plot of the metrics per round (``self_train/rounds.png`` on the parent).

Example::

    from medtricks.recipe import load_recipe
    from medtricks.self_train import NoiseConfig, run_self_train

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["data.label_fraction=0.1"])
    result = run_self_train(recipe, rounds=2, noise=NoiseConfig(drop_rate=0.3))
    print(result.markdown())
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from medtricks._atomic import atomic_path
from medtricks.data import redact_paths
from medtricks.data.transforms import PRESETS as AUGMENT_PRESETS
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import fmt_mean_ci, fmt_num, is_finite, markdown_table
from medtricks.logged_params import run_params
from medtricks.models.model_names import resolve_model_name
from medtricks.recipe import Recipe, apply_overrides, recipe_digest, recipe_from_dict
from medtricks.rundir import RunDir, best_key, ci_keys
from medtricks.run import run_recipe  # looked up at call time: tests wrap medtricks.self_train.run_recipe
from medtricks.tracking import RunNotFoundError, check_store, create_store

__all__ = [
    "NoiseConfig",
    "RoundPlan",
    "SelfTrainResult",
    "run_self_train",
    "plan_rounds",
    "round_overrides",
    "round_recipe",
    "self_train_id",
    "check_unlabeled_pool",
    "supports_drop_path",
    "plot_rounds",
    "STATE_FILE",
]

STATE_FILE = "self_train_state.json"
# Keys that do not change what is trained: out of the self-training id (as in ablations).
_NOT_IDENTITY = (("tracking",), ("train", "progress"), ("ablation",))
_METRICS = ("auroc", "accuracy")


# ------------------------------------------------------------------------------------------ noise
@dataclass(frozen=True)
class NoiseConfig:
    """The student's noise and size (rounds >= 1). Defaults follow Noisy Student (Xie et al. 2020):
    dropout 0.5 before the classifier, stochastic depth 0.2 (survival 0.8), a strong augmentation.

    Attributes:
        drop_rate: ``model.drop_rate`` of every student (0 leaves the recipe's value).
        drop_path_rate: ``model.kwargs.drop_path_rate`` (stochastic depth) where the timm model takes it
            (0 leaves the recipe's value).
        augment: ``data.augment`` of every student, one of :data:`medtricks.data.transforms.PRESETS`;
            ``None`` keeps the recipe's preset. Default ``cxr_shift`` (the strongest X-ray preset;
            paper_baseline is ImageNet's, with horizontal flips).
        student: ``model.name`` of every student (an equal or larger model); ``None`` = the recipe's model.
    """

    drop_rate: float = 0.5
    drop_path_rate: float = 0.2
    augment: Optional[str] = "cxr_shift"
    student: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("drop_rate", "drop_path_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"self-train noise {key} must be a number in [0, 1), got {value!r}")
        if self.augment is not None and self.augment not in AUGMENT_PRESETS:
            raise ConfigError(
                f"self-train noise augment must be one of {', '.join(AUGMENT_PRESETS)} "
                f"(or keep: the recipe's data.augment), got {self.augment!r}"
            )
        if self.student is not None and (not isinstance(self.student, str) or not self.student.strip()):
            raise ConfigError(f"self-train student must be a model name (model.name), got {self.student!r}")


def supports_drop_path(model_name: str) -> bool:
    """Whether the timm model takes ``drop_path_rate`` (stochastic depth); built on the meta device, so
    nothing is allocated or downloaded. MONAI nets: False."""
    name = resolve_model_name(model_name)
    if name.startswith("monai:"):
        return False
    import timm
    import torch

    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=2, drop_path_rate=0.1)
    except TypeError:
        return False
    return True


def _param_count(model_name: str, in_chans: int) -> Optional[int]:
    name = resolve_model_name(model_name)
    if name.startswith("monai:"):
        return None
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=2, in_chans=in_chans)
    except Exception:  # noqa: BLE001 - only a size check: the run itself reports a model that cannot be built
        return None
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- planning
def check_unlabeled_pool(recipe: Recipe) -> None:
    """A :class:`ConfigError` naming the keys when the recipe leaves no unlabelled images."""
    data = recipe.data
    partial = (data.label_fraction is not None and data.label_fraction < 1.0) or data.label_count is not None
    if not partial and data.unlabeled is None:
        raise ConfigError(
            "self-training needs an unlabelled pool for the students' pseudo-labels, and this recipe has none: "
            f"data.label_fraction is {data.label_fraction!r}, data.label_count is {data.label_count!r} and "
            "data.unlabeled is null. Set data.label_fraction below 1 (e.g. --set data.label_fraction=0.1), "
            "data.label_count, or data.unlabeled: {root: FOLDER_OF_UNLABELLED_IMAGES}"
        )


@dataclass
class RoundPlan:
    """What one round trains: its index, the round whose model labels its pool (None for round 0) and
    the recipe overrides (the teacher's run folder is added when that round has finished)."""

    index: int
    teacher_round: Optional[int]
    overrides: list[str]
    notes: list[str] = field(default_factory=list)


def round_overrides(round_index: int, noise: NoiseConfig, *, drop_path: bool = True) -> list[str]:
    """The ``--set`` overrides of a round (without the teacher): round 0 has pseudo-labels off; every
    student has them on, plus the noise and its model. ``drop_path``: whether the student's model takes
    stochastic depth (see :func:`supports_drop_path`)."""
    if round_index < 0:
        raise ConfigError(f"round index must be >= 0, got {round_index}")
    if round_index == 0:
        return ["tricks.pseudo_label.enabled=false", "tricks.pseudo_label.teacher=null"]
    out = ["tricks.pseudo_label.enabled=true"]
    if noise.student:
        out.append(f"model.name={noise.student}")
    if noise.drop_rate:
        out.append(f"model.drop_rate={noise.drop_rate:g}")
    if noise.drop_path_rate and drop_path:
        out.append(f"model.kwargs.drop_path_rate={noise.drop_path_rate:g}")
    if noise.augment is not None:
        out.append(f"data.augment={noise.augment}")
    return out


def plan_rounds(
    recipe: Recipe, rounds: int, noise: Optional[NoiseConfig] = None, *, drop_path: Optional[bool] = None
) -> list[RoundPlan]:
    """Rounds ``0..rounds``: the teacher, then ``rounds`` noised students, each labelled by the round before.

    ``drop_path``: whether the student model takes stochastic depth; ``None`` asks timm
    (:func:`supports_drop_path`).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1 (student rounds after the teacher), got {rounds!r}")
    noise = noise or NoiseConfig()
    check_unlabeled_pool(recipe)
    student = noise.student or recipe.model.name
    notes = []
    if drop_path is None:
        drop_path = bool(noise.drop_path_rate) and supports_drop_path(student)
        if noise.drop_path_rate and not drop_path:
            notes.append(f"{student} takes no drop_path_rate: the students get no stochastic depth")
    if noise.drop_rate and student.startswith("monai:"):
        raise ConfigError(
            f"self-train noise drop_rate={noise.drop_rate:g}: MONAI model {student} takes no "
            "model.drop_rate; pass drop_rate 0 (--drop-rate 0) and set its own dropout via model.kwargs"
        )
    plans = [RoundPlan(0, None, round_overrides(0, noise))]
    for k in range(1, rounds + 1):
        plans.append(RoundPlan(k, k - 1, round_overrides(k, noise, drop_path=drop_path), list(notes)))
    return plans


# What the students' teacher labels (tricks.pseudo_label): part of the id, so that a self-training folder
# whose rounds were labelled from the augmented view (before the teacher saw clean images) is never continued.
TEACHER_INPUT = "clean"


def self_train_id(recipe: Recipe, noise: NoiseConfig) -> str:
    """A short stable id of (recipe, noise, the teacher's input): the same self-training gets the same
    folder and parent run."""
    return recipe_digest(recipe, ignore=_NOT_IDENTITY, noise=asdict(noise), teacher_input=TEACHER_INPUT)


def round_recipe(
    base: Recipe, plan: RoundPlan, *, teacher: Optional[str], out_dir: str | Path, tracking_uri: Optional[str] = None
) -> Recipe:
    """The recipe of one round: its overrides, its teacher's run folder, its own output folder
    (``<out_dir>/round<k>``, so ``resume="auto"`` can only continue that round's own run)."""
    if plan.teacher_round is not None and not teacher:
        raise ConfigError(f"round {plan.index} needs the run folder of round {plan.teacher_round} as its teacher")
    data = apply_overrides(base.model_dump(mode="json"), plan.overrides)
    if teacher:  # set as a string, not parsed as YAML: a folder name may hold ':' or '#'
        data["tricks"]["pseudo_label"]["teacher"] = str(teacher)
    data["experiment"]["output_dir"] = str(Path(out_dir) / f"round{plan.index}")
    data["tracking"]["run_name"] = f"{base.experiment.name} round {plan.index}" + (
        " (teacher)" if plan.index == 0 else " (student)"
    )
    if tracking_uri is not None:
        data["tracking"]["uri"] = tracking_uri
    return recipe_from_dict(data, source=f"self-train round {plan.index}")


# ----------------------------------------------------------------------------------------- result
_COLUMNS = [
    "round",
    "model",
    "teacher_round",
    "val_auroc",
    "val_auroc_ci_low",
    "val_auroc_ci_high",
    "val_accuracy",
    "val_accuracy_ci_low",
    "val_accuracy_ci_high",
    "test_auroc",
    "test_auroc_ci_low",
    "test_auroc_ci_high",
    "test_accuracy",
    "test_accuracy_ci_low",
    "test_accuracy_ci_high",
    "pseudo_kept",
    "run_id",
    "run_dir",
    "ran",
]


@dataclass
class SelfTrainResult:
    """What :func:`run_self_train` returns: ``table`` has one row per round (columns ``round``, ``model``,
    ``teacher_round``, ``val_auroc`` / ``val_accuracy`` with ``_ci_low`` / ``_ci_high``, the same for
    ``test_`` when the recipe has a test split, ``pseudo_kept``, ``run_id``, ``run_dir``, ``ran``: False
    for a round finished by an earlier call)."""

    table: pd.DataFrame
    self_train_id: str
    rounds: int
    parent_run_id: Optional[str] = None
    output_dir: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    @property
    def final_run_dir(self) -> Optional[str]:
        """The last round's run folder (the promoted student)."""
        return None if self.table.empty else str(self.table["run_dir"].iloc[-1])

    def markdown(self) -> str:
        """The table as Markdown with a title and notes (what ``medtricks self-train`` prints)."""
        has_test = self.table["test_auroc"].map(is_finite).any() if len(self.table) else False
        header = ["round", "model", "teacher", "val AUROC [CI]", "val accuracy [CI]"]
        if has_test:
            header += ["test AUROC [CI]", "test accuracy [CI]"]
        header += ["pseudo kept"]
        rows = []
        for r in self.table.itertuples():
            row = [
                r.round,
                r.model,
                "-" if r.teacher_round is None or not is_finite(r.teacher_round) else f"round {int(r.teacher_round)}",
                fmt_mean_ci(r.val_auroc, r.val_auroc_ci_low, r.val_auroc_ci_high),
                fmt_mean_ci(r.val_accuracy, r.val_accuracy_ci_low, r.val_accuracy_ci_high),
            ]
            if has_test:
                row += [
                    fmt_mean_ci(r.test_auroc, r.test_auroc_ci_low, r.test_auroc_ci_high),
                    fmt_mean_ci(r.test_accuracy, r.test_accuracy_ci_low, r.test_accuracy_ci_high),
                ]
            row += [fmt_num(r.pseudo_kept, 3)]
            rows.append(row)
        notes = list(self.notes)
        notes.append(
            "val: the split that also chose each round's checkpoint, not held out"
            + ("" if has_test else "; set data.test_fraction for held-out numbers")
        )
        notes.append("pseudo kept: share of unlabelled images above tricks.pseudo_label.threshold in the last epoch")
        title = f"Noisy Student self-training {self.self_train_id} ({self.rounds} student round(s))"
        return "\n".join([f"### {title}", "", markdown_table(header, rows), "", *[f"- {n}" for n in notes]])


def plot_rounds(table: pd.DataFrame):
    """Val (and test, when present) AUROC and accuracy per round, with their CIs: a matplotlib Figure
    on the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 + 0.4 * len(table), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rounds = table["round"].astype(int).tolist()
    styles = {"val": "-", "test": "--"}
    for split in ("val", "test"):
        for metric, marker in zip(_METRICS, ("o", "s")):
            col = f"{split}_{metric}"
            values = pd.to_numeric(table[col], errors="coerce")
            if not values.map(is_finite).any():
                continue
            low = pd.to_numeric(table[f"{col}_ci_low"], errors="coerce")
            high = pd.to_numeric(table[f"{col}_ci_high"], errors="coerce")
            err = [(values - low).clip(lower=0).fillna(0).tolist(), (high - values).clip(lower=0).fillna(0).tolist()]
            ax.errorbar(
                rounds,
                values.tolist(),
                yerr=err,
                marker=marker,
                linestyle=styles[split],
                capsize=3,
                label=f"{split} {metric}",
            )
    ax.set_xticks(rounds)
    ax.set_xticklabels(["0\n(teacher)" if r == 0 else str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("metric (best checkpoint)")
    ax.set_title("Noisy Student: metrics per round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ state
def _read_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / STATE_FILE
    if not path.is_file():
        return {"rounds": {}}
    state = json.loads(path.read_text())
    state.setdefault("rounds", {})
    return state


def _write_state(out_dir: Path, state: dict[str, Any]) -> None:
    with atomic_path(out_dir / STATE_FILE) as tmp:
        tmp.write_text(json.dumps(state, indent=2))


def _row_from_result(result, plan: RoundPlan, model: str) -> dict[str, Any]:
    row: dict[str, Any] = {"round": plan.index, "model": model, "teacher_round": plan.teacher_round}
    for split, metrics in (("val", result.metrics), ("test", result.test_metrics)):
        values = dict(getattr(metrics, "values", {}) or {})
        ci = dict(getattr(metrics, "ci", {}) or {})
        for name in _METRICS:
            low, high = ci.get(name, (math.nan, math.nan))
            row[f"{split}_{name}"] = float(values.get(name, math.nan))
            row[f"{split}_{name}_ci_low"], row[f"{split}_{name}_ci_high"] = float(low), float(high)
    kept = [h.get("train/pseudo_kept") for h in (result.history or []) if h.get("train/pseudo_kept") is not None]
    row["pseudo_kept"] = float(kept[-1]) if kept else math.nan
    row["run_id"], row["run_dir"] = result.run_id, str(Path(result.run_dir).resolve())
    return row


def _row_from_record(record, plan: RoundPlan, model: str, run_dir: Path) -> dict[str, Any]:
    """A round that finished while its state entry was not written: its numbers from the run store."""
    row: dict[str, Any] = {"round": plan.index, "model": model, "teacher_round": plan.teacher_round}
    for split in ("val", "test"):
        for name in _METRICS:
            key = best_key(split, name)
            low, high = ci_keys(key)
            row[f"{split}_{name}"] = record.metrics.get(key, math.nan)
            row[f"{split}_{name}_ci_low"] = record.metrics.get(low, math.nan)
            row[f"{split}_{name}_ci_high"] = record.metrics.get(high, math.nan)
    row["pseudo_kept"] = record.metrics.get("train/pseudo_kept", math.nan)
    row["run_id"], row["run_dir"] = record.run_id, str(run_dir.resolve())
    return row


def _finished_run_of_round(round_out: Path, experiment: str) -> Optional[RunDir]:
    base = RunDir.experiment_dir(round_out, experiment)
    if not base.is_dir():
        return None
    finished = [RunDir(p) for p in sorted(base.iterdir()) if p.is_dir() and RunDir(p).is_finished()]
    return finished[-1] if finished else None


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# ------------------------------------------------------------------------------------------- main
def run_self_train(
    recipe: Recipe,
    rounds: int = 1,
    *,
    noise: Optional[NoiseConfig] = None,
    tracking_uri: Optional[str] = None,
    quiet: bool = False,
) -> SelfTrainResult:
    """Noisy Student: train the teacher (round 0), then ``rounds`` noised students, each pseudo-labelling
    the unlabelled pool with the round before; see the module docstring.

    Args:
        recipe: the base recipe; it must leave an unlabelled pool (``data.label_fraction`` < 1,
            ``data.label_count`` or ``data.unlabeled``).
        rounds: student rounds after the teacher (``--rounds``): ``rounds + 1`` runs in all.
        noise: the students' noise and model (:class:`NoiseConfig`; default: its documented defaults).
        tracking_uri: MLflow URI of parent and children (default: the recipe's, then
            ``$MLFLOW_TRACKING_URI``); with ``tracking.backend: none`` the local run store in the
            self-training folder.
        quiet: no printing.

    Re-running the same call skips the rounds that finished and resumes an interrupted one.
    """
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    noise = noise or NoiseConfig()
    plans = plan_rounds(recipe, rounds, noise)
    notes = list(plans[-1].notes)
    student = noise.student or recipe.model.name
    if noise.student and noise.student != recipe.model.name:
        teacher_n, student_n = (
            _param_count(recipe.model.name, recipe.model.in_chans),
            _param_count(noise.student, recipe.model.in_chans),
        )
        if teacher_n and student_n and student_n < teacher_n:
            message = (
                f"the student {noise.student} ({student_n:,} parameters) is smaller than the teacher "
                f"{recipe.model.name} ({teacher_n:,}): Noisy Student wants an equal or larger student"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            notes.append(message)
    sid = self_train_id(recipe, noise)
    experiment = recipe.tracking.experiment or recipe.experiment.name
    uri = tracking_uri or recipe.tracking.uri
    check_store(recipe.tracking.backend, uri)  # an unreachable tracking URI: one line, before the folder exists
    out_dir = RunDir.experiment_dir(recipe.experiment.output_dir, recipe.experiment.name) / f"self-train-{sid}"
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(out_dir)
    state.update({"self_train_id": sid, "noise": asdict(noise)})

    # ---- the parent run (re-opened when this self-training ran before); backend none: this folder's store
    parent = create_store(recipe.tracking.backend, uri, root=out_dir)
    previous = state.get("parent_run_id")
    if previous and not parent.has_run(previous):
        previous = None
    tags = {
        "medtricks.role": "self_train_parent",
        "medtricks.self_train_id": sid,
        "self_train.rounds": str(rounds),
        "self_train.dir": str(out_dir),
        "run_dir": str(out_dir),
    }
    parent_id = parent.start(
        experiment=experiment,
        run_name=f"self-train {recipe.experiment.name} {sid[:6]}",
        tags=tags,
        resume_run_id=previous,
    )
    if previous:
        parent.set_tags(tags)
    state["parent_run_id"] = parent_id
    _write_state(out_dir, state)
    base_params = {
        k: v
        for k, v in run_params(recipe).items()
        if not k.startswith(("tracking.", "ablation.")) and k != "train.progress"
    }
    parent.log_params(
        {
            **base_params,
            "self_train.id": sid,
            "self_train.student": student,
            "self_train.teacher_input": TEACHER_INPUT,
            **{
                f"self_train.noise.{k}": ("keep" if v is None else v)
                for k, v in asdict(noise).items()
                if k != "student"
            },
        }
    )

    try:
        done = sum(1 for p in plans if (state["rounds"].get(str(p.index)) or {}).get("status") == "finished")
        say(
            f"self-train {sid}: round 0 (teacher) + {rounds} noised student round(s); {done} already finished"
            + (f"; parent run {parent_id} in experiment {experiment!r} ({parent.describe()})" if parent_id else "")
        )
        for plan in plans:
            say(
                f"  round {plan.index}: {' '.join(plan.overrides)}"
                + (
                    f" tricks.pseudo_label.teacher=<round {plan.teacher_round}>"
                    if plan.teacher_round is not None
                    else ""
                )
            )
        for note in notes:
            say(f"  note: {note}")
        rows: list[dict[str, Any]] = []
        for plan in plans:
            model = student if plan.index > 0 else recipe.model.name
            saved = state["rounds"].get(str(plan.index)) or {}
            if saved.get("status") == "finished" and RunDir(saved["run_dir"]).is_finished():
                say(f"round {plan.index}: finished before ({saved['run_dir']}), skipped")
                rows.append({**saved["row"], "ran": False})
                continue
            teacher = rows[-1]["run_dir"] if rows else None
            child = round_recipe(recipe, plan, teacher=teacher, out_dir=out_dir, tracking_uri=tracking_uri)
            adopted = _finished_run_of_round(Path(child.experiment.output_dir), child.experiment.name)
            row = None
            if adopted is not None:  # finished, but killed before the state file was written
                run_id = adopted.read_state().get("run_id")
                try:
                    store = create_store(child.tracking.backend, child.tracking.uri, root=child.experiment.output_dir)
                    row = {**_row_from_record(store.get_run(run_id), plan, model, adopted.path), "ran": False}
                    say(f"round {plan.index}: finished before ({adopted.path}), skipped")
                except (RunNotFoundError, KeyError):
                    row = None
            if row is None:
                say(
                    f"round {plan.index}"
                    + (
                        " (teacher, labelled images only)"
                        if plan.index == 0
                        else f" (noised student, pseudo-labels from round {plan.teacher_round})"
                    )
                )
                child_tags = {
                    "medtricks.role": "self_train_child",
                    "medtricks.self_train_id": sid,
                    "round": str(plan.index),
                    "teacher_round": str(plan.teacher_round) if plan.teacher_round is not None else "none",
                    "round_overrides": " ".join(plan.overrides),
                }
                result = run_recipe(child, resume="auto", parent_run_id=parent_id, extra_tags=child_tags, quiet=quiet)
                row = {**_row_from_result(result, plan, model), "ran": True}
                step_metrics = {
                    f"self_train/{k}": float(row[k])
                    for k in ("val_auroc", "val_accuracy", "test_auroc", "test_accuracy", "pseudo_kept")
                    if is_finite(row.get(k))
                }
                parent.log_metrics(step_metrics, step=plan.index)
            state["rounds"][str(plan.index)] = {
                "status": "finished",
                "run_dir": row["run_dir"],
                "run_id": row["run_id"],
                "row": _json_safe({k: v for k, v in row.items() if k != "ran"}),
            }
            _write_state(out_dir, state)
            rows.append(row)

        table = pd.DataFrame(rows, columns=_COLUMNS)
        result = SelfTrainResult(
            table=table, self_train_id=sid, rounds=rounds, parent_run_id=parent_id, output_dir=out_dir, notes=notes
        )
        _write_outputs(result, parent, say)
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        parent.set_tags(
            {
                "self_train.status": "interrupted" if interrupted else "error",
                "medtricks.error": redact_paths(f"{type(err).__name__}: {err}", recipe.data.root)[:5000],
            }
        )
        parent.end("KILLED" if interrupted else "FAILED")
        raise
    return result


def _write_outputs(result: SelfTrainResult, parent, say) -> None:
    """Markdown, CSV and the per-round plot into the self-training folder and onto the parent run."""
    out = result.output_dir
    md = result.markdown()
    (out / "self_train_table.md").write_text(md + "\n")
    result.table.to_csv(out / "self_train_rounds.csv", index=False)
    files = [out / "self_train_table.md", out / "self_train_rounds.csv"]
    fig = plot_rounds(result.table)
    fig.savefig(out / "rounds.png", dpi=120)
    files.append(out / "rounds.png")
    say("")
    say(md)
    say(f"table, CSV and plot: {out}")
    say(f"final student (promoted): {result.final_run_dir}")
    for path in files:
        parent.log_artifact(path, "self_train")
    final = result.table.iloc[-1]
    parent.set_tags(
        {
            "self_train.status": "complete",
            "self_train.final_run_dir": str(final["run_dir"]),
            "self_train.final_run_id": str(final["run_id"]),
        }
    )
    parent.end("FINISHED")
