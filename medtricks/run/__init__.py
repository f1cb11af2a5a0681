"""One run: build everything a Recipe describes, fit, evaluate, log. The only place (with the CLI)
that knows every box of the data flow; the pieces, by concern:

- :mod:`medtricks.run.prepare` -- device, data, model, tricks, loaders, optimizer, loss (before any file is written);
- :mod:`medtricks.run.resume` -- which run folder to continue and what refuses a resume;
- :mod:`medtricks.run.inputs` -- what the run logs before training;
- :mod:`medtricks.run.finish` -- the best checkpoint evaluated, audited and saved with its model card.

This module runs them in order (and, under torchrun, the other processes' share of the training)::

    from medtricks import load_recipe, run_recipe
    result = run_recipe(load_recipe("recipes/quickstart.yaml"))
    print(result.metrics.table())
"""

from __future__ import annotations

import subprocess
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import matplotlib.pyplot as plt

import medtricks
from medtricks.console import epoch_reporter, say as console_say, where_to_look
from medtricks.data import redact_paths
from medtricks.errors import MedtricksError
from medtricks.evaluate import compute_metrics
from medtricks.evaluate.resizer_plots import resizer_comparison_figure
from medtricks.logged_params import tricks_summary
from medtricks.posthoc.load import TrainedModel, build_model, load_trained  # noqa: F401 - re-exported
from medtricks.recipe import Recipe, dump_recipe
from medtricks.rundir import RunDir
from medtricks.run.finish import audit, final_evaluation, save_model
from medtricks.run.inputs import log_inputs
from medtricks.run.prepare import PreparedRun, prepare_run, run_device
from medtricks.run.resume import check_resume_data, resume_target
from medtricks.run.seed_spread import FAMILY_TAG, recipe_family, say_seed_spread
from medtricks.tracking import LocalStore, RunStore, check_store, create_store
from medtricks.train import distributed, fit, predict
from medtricks.train.checkpoint import load_checkpoint
from medtricks.train.engine import evaluation_model
from medtricks.train.frozen_cache import with_fused_frozen_norms
from medtricks.train.loaders import make_train_loader  # noqa: F401 - re-exported (its home before train/loaders.py)
from medtricks.train.progressive import ProgressiveLoader
from medtricks.tricks.base import find_trick, registered_tricks

__all__ = [
    "RunResult",
    "run_recipe",
    "find_resumable_run_dir",
    "make_train_loader",
    "TrainedModel",
    "load_trained",
    "build_model",
]


@dataclass
class RunResult:
    """What :func:`run_recipe` returns. A trick's report of what it changed is ``report(name)``; the 0.x
    attribute ``gamma_report`` still answers ``report("bn_gamma")``, with a ``DeprecationWarning``, through that
    trick's ``deprecated_result_attribute`` (so the run itself names no trick)."""

    run_dir: Path
    run_id: Optional[str]
    metrics: Any  # MetricsResult of the best checkpoint on the validation split
    test_metrics: Any = None
    history: list[dict] = field(default_factory=list)
    best_epoch: Optional[int] = None
    # trick name -> what it reported about what it did (its ``report``); None on a torchrun process other than rank 0
    trick_reports: Optional[dict[str, Any]] = field(default_factory=dict)
    tracker: Optional[RunStore] = None

    def report(self, trick: str) -> Any:
        """What trick ``trick`` reported about what it did (``result.report("bn_gamma")``: the layers whose γ the
        strategy set); the trick's empty report (``Trick.empty_report``) when it did not act or changed nothing."""
        if self.trick_reports is None:  # a torchrun follower reports nothing
            return None
        found = self.trick_reports.get(trick)
        if found:
            return found
        cls = find_trick(trick)
        return cls.empty_report() if cls is not None else found

    def __getattr__(self, attribute: str) -> Any:
        # Attributes that read a trick's report before RunResult.report(name) (0.x: gamma_report), deprecated.
        if not attribute.startswith("_"):
            for cls in registered_tricks():
                if cls.deprecated_result_attribute == attribute:
                    warnings.warn(
                        f"RunResult.{attribute} is deprecated: use RunResult.report({cls.name!r})",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    return self.report(cls.name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")


def find_resumable_run_dir(recipe: Recipe) -> Optional[Path]:
    """The newest run folder of this experiment that did not finish (has a last.pt), if any."""
    run = RunDir.find_resumable(recipe.experiment.output_dir, recipe.experiment.name)
    return run.path if run else None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------- run
def run_recipe(
    recipe: Recipe,
    *,
    resume: Optional[str] = None,
    tracker: Optional[RunStore] = None,
    parent_run_id: Optional[str] = None,
    extra_tags: Optional[dict[str, str]] = None,
    quiet: bool = False,
) -> RunResult:
    """Train, evaluate and log one recipe. ``resume``: None, ``"auto"`` or a run folder path.

    With ``resume="auto"`` the newest unfinished run folder of the experiment is continued (same
    MLflow run); when there is none a new run starts.

    Under torchrun (``torchrun --nproc-per-node N -m medtricks run RECIPE``) every process calls this
    inside one process group: rank 0 makes the run folder, logs, checkpoints, validates and prints, and
    returns the full result; the others train their slice of the data in step with it and return a
    result without metrics.
    """
    with distributed.process_group(run_device(recipe)), warnings.catch_warnings():
        if not distributed.is_main():
            warnings.simplefilter("ignore")  # rank 0 says it once
        return _run_recipe(
            recipe, resume=resume, tracker=tracker, parent_run_id=parent_run_id, extra_tags=extra_tags, quiet=quiet
        )


def _run_recipe(recipe: Recipe, **kwargs) -> RunResult:
    # The run folder's lock (rank 0), from choosing the folder until the run ends: a second process on it
    # (two `--resume auto` at once) fails at once instead of training the same epochs again.
    with ExitStack() as held:
        return _run_held(recipe, held, **kwargs)


def _run_held(recipe: Recipe, held: ExitStack, *, resume, tracker, parent_run_id, extra_tags, quiet) -> RunResult:
    main = distributed.is_main()
    say = (lambda *a: None) if quiet or not main else console_say  # tqdm.write: lines stay above a progress bar
    # torchrun: every process checks (a refusal stops them all alike); nothing is written before prepare_run's barrier
    run = resume_target(recipe, resume, say, held if main else None)
    resuming = run is not None
    # Everything that can fail on the recipe or the data fails here, before a run folder or a tracked run exists.
    if tracker is None:  # an unknown or unreachable tracking URI: one line, in seconds
        check_store(recipe.tracking.backend, recipe.tracking.uri)
    prep = prepare_run(recipe)
    if resuming:  # before anything is written: a refused resume leaves recipe.yaml, split_manifest.csv as they were
        check_resume_data(run, recipe, prep)
    if main and run is None:
        run = RunDir.create(recipe.experiment.output_dir, recipe.experiment.name)
        held.enter_context(run.locked())
    if distributed.world_size() > 1:  # torchrun: rank 0 made (or chose) the run folder; the others train into it
        path, resuming = distributed.broadcast((str(run.path), resuming) if main else None)
        if not main:
            return _follow(RunDir(path), resuming, prep)
    run.recipe.write_text(dump_recipe(recipe))
    state = run.read_state()

    # Tracking first: an unreachable server fails here, before any training.
    tracker = tracker or create_store(recipe.tracking.backend, recipe.tracking.uri, root=recipe.experiment.output_dir)
    run_name = recipe.tracking.run_name or f"{recipe.experiment.name}-{run.short_id}"
    # medtricks.role: train (ablation children: ablation_child, from extra_tags); variant: the recipe's
    # experiment name unless an ablation names the variant. Post-hoc runs carry medtricks.kind instead.
    tags = {
        "medtricks.version": medtricks.__version__,
        "tricks": tricks_summary(recipe),
        "run_dir": str(run.path),
        "medtricks.role": "train",
        "variant": recipe.experiment.name,
        FAMILY_TAG: recipe_family(recipe),  # its other seeds: the decision rule's spread (seed_spread.py)
        **recipe.experiment.tags,
        **(extra_tags or {}),
    }
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    run_id = tracker.start(
        experiment=recipe.tracking.experiment or recipe.experiment.name,
        run_name=run_name,
        tags=tags,
        resume_run_id=state.get("run_id") if resuming else None,
        parent_run_id=parent_run_id,
    )
    try:
        world = distributed.world_size()  # kept (when > 1) so a resume can refuse another process count
        run.write_state(
            status="running",
            run_id=run_id,
            experiment=recipe.experiment.name,
            tracking="ok",
            **({"world_size": world} if world > 1 else {}),
        )
        # The seed spread searches the run store: only for a run someone reads, not a quiet one or an
        # ablation child (the ablation's own table is the spread over its seeds).
        spread = not quiet and tags["medtricks.role"] == "train"
        result = _run(recipe, run, tracker, resuming, say, prep, seed_spread=spread)
    except BaseException as err:
        # Logged and stored with data paths hashed (file names hold patient IDs); the traceback keeps them.
        message = redact_paths(f"{type(err).__name__}: {err}", recipe.data.root)
        try:
            run.write_state(status="failed", error=message)
        except OSError as state_err:  # full disk: raise the run's own error, not this one
            warnings.warn(f"could not record the failure in {run.state_file}: {state_err}", RuntimeWarning)
        finally:  # a full disk must not leave the tracked run RUNNING
            _end_tracking(run, tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", error=message)
        raise
    try:
        run.write_state(status="finished")
    except BaseException as err:  # e.g. disk full: the tracked run ends FAILED, not stuck RUNNING
        _end_tracking(run, tracker, "FAILED", error=f"could not write {run.state_file}: {type(err).__name__}: {err}")
        raise
    _end_tracking(run, tracker, "FINISHED")
    result.run_id = run_id
    say(
        where_to_look(
            run_id,
            run.path,
            experiment=recipe.tracking.experiment or recipe.experiment.name,
            mlflow_uri=None if isinstance(tracker, LocalStore) else getattr(tracker, "uri", None),
            runs_dir=getattr(tracker, "root", None) or recipe.experiment.output_dir
            if isinstance(tracker, LocalStore)
            else None,
        )
    )
    return result


def _end_tracking(run: RunDir, tracker: RunStore, status: str, error: Optional[str] = None) -> None:
    """End the tracked run (always); a store that could not send everything marks state.json degraded."""
    try:
        if error:
            tracker.set_tags({"medtricks.error": error[:5000]})
    finally:
        tracker.end(status)
    if getattr(tracker, "degraded", False):
        try:  # the store's warning already named the spool file and the replay command
            run.write_state(tracking="degraded", unsent=str(tracker.unsent_path))
        except OSError:
            pass


def _run(
    recipe: Recipe, run: RunDir, tracker: RunStore, resuming: bool, say, prep: PreparedRun, *, seed_spread: bool = True
) -> RunResult:
    device, amp_dtype, classes, bundle, tricks = prep.device, prep.amp_dtype, prep.classes, prep.bundle, prep.tricks
    model, data_config, info, opt, val_loader = prep.model, prep.data_config, prep.info, prep.opt, prep.val_loader
    log_inputs(
        recipe,
        run,
        tracker,
        say,
        bundle=bundle,
        tricks=tricks,
        frozen=prep.frozen,
        opt=opt,
        device=device,
        amp_dtype=amp_dtype,
        classes=classes,
        data_config=data_config,
        info=info,
    )

    if prep.cached is not None:
        tracker.log_params(prep.cached.params())
        say(
            f"frozen prefix cached: training from {prep.cached.split.cut} on; "
            f"{recipe.train.cache_frozen.views} view(s) per image, {prep.cached.megabytes:.0f} MB in memory"
        )
    if isinstance(prep.train_loader, ProgressiveLoader):
        tracker.log_params(
            {
                "resolved.progressive_sizes": ",".join(map(str, prep.train_loader.sizes)),
                "resolved.progressive_batches": ",".join(map(str, prep.train_loader.batches)),
            }
        )
        say(
            "progressive resizing: image size by epoch "
            + ", ".join(map(str, prep.train_loader.sizes))
            + "; batch "
            + ", ".join(map(str, prep.train_loader.batches))
        )

    def evaluate_fn(eval_model) -> dict[str, float]:
        # cache_frozen: val_loader yields cached prefix features, so the rest of eval_model (or EMA's copy) runs
        module = prep.cached.eval_module(eval_model) if prep.cached is not None else eval_model
        targets, probs, loss = predict(
            module, val_loader, device=device, amp_dtype=amp_dtype, channels_last=recipe.train.channels_last
        )
        values = compute_metrics(targets, probs, classes, n_bootstrap=0).values
        return {**{f"val/{k}": float(v) for k, v in values.items() if k != "n"}, "val/loss": loss}

    # A resumed run replays the updates after its last checkpoint, and the engine hands the checkpointed
    # epoch over again (it may have died before logging it): log each step and each epoch once.
    logged = _last_logged_step(tracker) if resuming else 0
    logged_epoch = _last_logged_step(tracker, "epoch") if resuming else 0

    def log_step(step: int, metrics: dict) -> None:
        if step > logged:
            tracker.log_metrics(metrics, step=step)

    report_epoch = epoch_reporter(
        lambda step, m: tracker.log_metrics(m, step=step),
        say,
        epochs=recipe.train.epochs,
        best_metric=recipe.train.best_metric,
        lr=lambda: opt.optimizer.param_groups[0]["lr"],
    )

    def log_epoch(step: int, metrics: dict) -> None:
        if step > logged_epoch:
            report_epoch(step, metrics)

    world = distributed.world_size()
    parallel = (
        f" x {world} processes (global batch {recipe.train.batch_size * world}, validation on rank 0)"
        if world > 1
        else ""
    )
    say(
        f"training {info.get('name', recipe.model.name)} on {len(bundle.train)} images "
        f"({len(bundle.val)} val), {recipe.train.epochs} epochs, device {device}{parallel}; run folder {run.path}"
    )
    timings = prep.timings
    started = time.perf_counter()
    fit_result = fit(
        model,
        prep.train_loader,
        val_loader,
        optimizer=opt.optimizer,
        scheduler=opt.scheduler,
        loss_fn=prep.loss_fn,
        cfg=prep.engine_cfg,
        evaluate_fn=evaluate_fn,
        checkpoint_dir=run.checkpoints,
        tricks=tricks,
        on_step=log_step,
        on_epoch=log_epoch,
        resume=resuming,
        checkpoint_extra={"data_fingerprint": prep.data_fingerprint},
        train_module=prep.cached.train_module if prep.cached is not None else None,
    )

    # ---- the best checkpoint: evaluated with CIs on val and test, audited, saved with its model card
    timings["training"], started = time.perf_counter() - started, time.perf_counter()
    if fit_result.compile_report:
        tracker.set_tags({"compile": fit_result.compile_report.get("reason", "")[:250]})
    eval_model = evaluation_model(model, tricks)
    eval_model.load_state_dict(load_checkpoint(fit_result.best_checkpoint, map_location=device)["model"])
    final = final_evaluation(
        recipe,
        run,
        tracker,
        say,
        with_fused_frozen_norms(eval_model),
        bundle,
        classes,
        device,
        amp_dtype,
        step=fit_result.steps,
        best_epoch=fit_result.best_epoch,
        tricks=tricks,
    )
    timings["final_evaluation"], started = time.perf_counter() - started, time.perf_counter()
    audit(recipe, tracker, say, eval_model, bundle.val, classes, data_config, device)
    timings["audit"], started = time.perf_counter() - started, time.perf_counter()
    if recipe.eval.plots and recipe.model.resizer.enabled:
        images = torch.stack([bundle.val[i][0] for i in range(min(4, len(bundle.val)))])
        tracker.log_figure(resizer_comparison_figure(model.resizer, images.to(device)), "plots/resizer.png")
    plt.close("all")
    save_model(recipe, run, tracker, eval_model, classes, info, data_config, fit_result, final)
    timings["saving"] = time.perf_counter() - started
    # Where the run's time went (a resumed run: this process's share), so a slow phase is visible in the MLflow UI.
    tracker.log_metrics({f"time/{phase}_s": seconds for phase, seconds in timings.items()}, step=fit_result.steps)
    say("time: " + ", ".join(f"{phase.replace('_', ' ')} {seconds:.0f} s" for phase, seconds in timings.items()))
    tracker.set_tags({"best_epoch": str(fit_result.best_epoch)})
    if seed_spread:
        say_seed_spread(recipe, tracker, say, final, classes)
    return RunResult(
        run_dir=run.path,
        run_id=None,
        metrics=final.by_split.get("val", {}),
        test_metrics=final.by_split.get("test"),
        history=fit_result.history,
        best_epoch=fit_result.best_epoch,
        tracker=tracker,
        trick_reports={t.name: t.report for t in tricks if t.report is not None},
    )


def _follow(run: RunDir, resuming: bool, prep: PreparedRun) -> RunResult:
    """A torchrun process other than rank 0: trains its slice of every epoch in step with rank 0 (DDP
    averages the gradients; rank 0 validates and broadcasts the metrics); writes, logs and prints nothing."""
    opt = prep.opt
    fit_result = fit(
        prep.model,
        prep.train_loader,
        prep.val_loader,
        optimizer=opt.optimizer,
        scheduler=opt.scheduler,
        loss_fn=prep.loss_fn,
        cfg=prep.engine_cfg,
        evaluate_fn=lambda model: {},  # rank 0 validates
        checkpoint_dir=run.checkpoints,
        tricks=prep.tricks,
        resume=resuming,
    )
    return RunResult(
        run_dir=run.path,
        run_id=None,
        metrics=None,
        history=fit_result.history,
        best_epoch=fit_result.best_epoch,
        trick_reports=None,
    )


# ------------------------------------------------------------------------------- run pieces
def _last_logged_step(tracker: RunStore, key: str = "train/loss") -> int:
    """The last training step at which this run already logged ``key`` (0 when the store cannot say)."""
    try:
        return max((step for step, _ in tracker.metric_history(tracker.run_id, key)), default=0)
    except MedtricksError:  # an in-memory store of a new process knows nothing of the earlier one
        return 0
