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

The pieces, by concern: :mod:`medtricks.self_train_plan` (the noise, the round plan, each round's recipe,
the id), :mod:`medtricks.self_train_state` (what the folder remembers, so a re-run skips finished rounds) and
:mod:`medtricks.self_train_result` (the table, the plot and the files). This module runs the rounds under one
parent run.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from medtricks.data import redact_paths
from medtricks.evaluate.markdown import is_finite
from medtricks.logged_params import run_params
from medtricks.recipe import Recipe
from medtricks.rundir import RunDir
from medtricks.run import run_recipe  # looked up at call time: tests wrap medtricks.self_train.run_recipe
from medtricks.self_train_plan import _NOT_IDENTITY  # noqa: F401 - re-exported
from medtricks.self_train_plan import (
    TEACHER_INPUT,
    NoiseConfig,
    RoundPlan,
    _param_count,
    check_unlabeled_pool,
    plan_rounds,
    round_overrides,
    round_recipe,
    self_train_id,
    supports_drop_path,
)
from medtricks.self_train_result import _METRICS  # noqa: F401 - re-exported
from medtricks.self_train_result import _COLUMNS, SelfTrainResult, _write_outputs, plot_rounds
from medtricks.self_train_state import _json_safe, _read_state, _row_from_record, _row_from_result, _write_state
from medtricks.self_train_state import STATE_FILE, _finished_run_of_round
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
