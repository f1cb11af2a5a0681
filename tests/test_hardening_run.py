"""Issue 15, items 4, 5, 7, 14, 20: resume refuses what it cannot honour, bad runs fail before they
exist, non-finite weights are never checkpointed, EMA trains (and resumes), frozen zero-gamma warns."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import medtricks.run
from medtricks.errors import ConfigError, MedtricksError
from medtricks.recipe import RecipeError, load_recipe
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.train import NonFiniteLossError, fit
from medtricks.tricks.base import Trick

from test_engine import _setup

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.synth.n=48",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=0",
    "train.progress=false",
    "train.log_every=1",
    "schedule.warmup_epochs=0.5",
    "eval.plots=false",
    "tracking.backend=none",
    "tracking.log_model=false",
]


def _tiny(tmp_path, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[*TINY, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}", *extra],
    )


def _killed(monkeypatch, *, at_step=None, after_epoch=None, before_logging_epoch=None):
    """Make the next run die (KeyboardInterrupt) after a given logged step or finished epoch, or after
    an epoch's checkpoint but before its metrics are logged (``before_logging_epoch``)."""
    real_fit = medtricks.run.fit

    def dying_fit(*args, on_step=None, on_epoch=None, **kwargs):
        def step_then_die(step, metrics):
            on_step(step, metrics)
            if at_step is not None and step == at_step:
                raise KeyboardInterrupt

        def epoch_then_die(step, metrics):
            if metrics["epoch"] == before_logging_epoch:
                raise KeyboardInterrupt
            on_epoch(step, metrics)
            if after_epoch is not None and metrics["epoch"] == after_epoch:
                raise KeyboardInterrupt

        return real_fit(*args, on_step=step_then_die, on_epoch=epoch_then_die, **kwargs)

    monkeypatch.setattr(medtricks.run, "fit", dying_fit)
    return real_fit


def killed_then_resumed(monkeypatch, recipe, **where):
    """Run ``recipe``, kill it (after its first epoch, or where ``where`` says: the options of ``_killed``),
    then resume it (``--resume auto``): the resumed result."""
    real_fit = _killed(monkeypatch, **(where or {"after_epoch": 1}))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    return run_recipe(recipe, resume="auto", quiet=True)


def _runs(tmp_path):
    base = tmp_path / "runs"
    return sorted(p for p in base.rglob("state.json")) if base.exists() else []


# ---- item 4: resume
def test_resume_refuses_a_changed_recipe_and_keeps_the_stored_one(tmp_path, monkeypatch):
    recipe = _tiny(tmp_path)
    real_fit = _killed(monkeypatch, after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    unfinished = find_resumable_run_dir(recipe)
    stored = (unfinished / "recipe.yaml").read_text()
    changed = _tiny(tmp_path, "optim.lr=0.004")
    with pytest.raises(ConfigError, match=r"optim.lr: 0.4 -> 0.004.*undo these changes, or run without --resume"):
        run_recipe(changed, resume="auto", quiet=True)
    with pytest.raises(ConfigError, match="optim.lr"):
        run_recipe(changed, resume=str(unfinished), quiet=True)
    assert (unfinished / "recipe.yaml").read_text() == stored  # nothing rewritten
    # What does not change training may differ: the run resumes and finishes.
    result = run_recipe(_tiny(tmp_path, "eval.n_bootstrap=10", "train.log_every=2"), resume="auto", quiet=True)
    assert result.run_dir == unfinished and json.loads((unfinished / "state.json").read_text())["status"] == "finished"


def test_resume_of_a_finished_run_refuses_and_leaves_it_finished(tmp_path):
    result = run_recipe(_tiny(tmp_path, "train.epochs=1", "schedule.warmup_epochs=0"), quiet=True)
    with pytest.raises(ConfigError, match="already finished"):
        run_recipe(
            _tiny(tmp_path, "train.epochs=1", "schedule.warmup_epochs=0"), resume=str(result.run_dir), quiet=True
        )
    assert json.loads((result.run_dir / "state.json").read_text())["status"] == "finished"


def test_steps_replayed_after_a_resume_are_logged_once(tmp_path, monkeypatch):
    recipe = _tiny(tmp_path)  # 48 phantoms: 41 train images, 3 updates per epoch at batch 16
    # killed mid epoch 2: step 4 is logged, the epoch is not checkpointed
    result = killed_then_resumed(monkeypatch, recipe, at_step=4)
    store = result.tracker
    steps = [step for step, _ in store.metric_history(store.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # step 4 was replayed after the resume, and logged once


def test_an_epoch_checkpointed_but_not_logged_is_logged_once_after_the_resume(tmp_path, monkeypatch):
    """Killed after epoch 1's checkpoint but before its metrics reached the store (kill -9, a lost Ray
    worker): the resumed run logs epoch 1 from the checkpoint, and every epoch exactly once."""
    recipe = _tiny(tmp_path, "train.epochs=3")
    # killed with last.pt of epoch 1 on disk but its metrics not logged
    result = killed_then_resumed(monkeypatch, recipe, before_logging_epoch=1)
    store = result.tracker
    epochs = [value for _, value in store.metric_history(store.run_id, "epoch")]
    assert epochs == [1.0, 2.0, 3.0], epochs
    assert len(store.metric_history(store.run_id, "val/auroc")) == 3
    # and a resume after a logged epoch does not log it twice (the replay is skipped)
    recipe2 = _tiny(tmp_path, "train.epochs=3", f"experiment.output_dir={tmp_path / 'runs2'}")
    again = killed_then_resumed(monkeypatch, recipe2)
    assert [v for _, v in again.tracker.metric_history(again.tracker.run_id, "epoch")] == [1.0, 2.0, 3.0]


# ---- item 5: fail before a run folder or tracked run exists
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["data.card=no-such-card"], MedtricksError, "no-such-card"),
        (
            ["data.synth=null", "data.root=/no/such/folder"],
            MedtricksError,
            "data.root '/no/such/folder' does not exist",
        ),
        (["schedule.warmup_epochs=2"], RecipeError, "warmup_epochs=2 must be less than train.epochs=2"),
        (["train.best_metric=val/aucroc"], ConfigError, "did you mean 'val/auroc'"),
        (["train.batch_size=64"], ConfigError, r"train.batch_size=64 is larger than the training split \(41 images\)"),
    ],
)
def test_bad_runs_fail_before_any_run_folder(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run_recipe(_tiny(tmp_path, *overrides), quiet=True)
    assert _runs(tmp_path) == []


# ---- item 7: weights, not only the loss
class _Explode(Trick):
    name = "explode"

    def on_step_end(self, model, step):
        with torch.no_grad():
            next(model.parameters()).fill_(math.inf)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=2)
    cfg.max_steps_per_epoch = 1
    explode = _Explode.__new__(_Explode)  # no recipe needed for an engine-level trick
    with pytest.raises(NonFiniteLossError, match="weights became non-finite at epoch 1"):
        fit(
            model,
            train,
            val,
            optimizer=opt,
            scheduler=sched,
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
            evaluate_fn=lambda m: {"val/acc": 0.5},
            checkpoint_dir=tmp_path / "ckpt",
            tricks=[explode],
        )
    assert not (tmp_path / "ckpt" / "last.pt").exists()


# ---- item 14: EMA is made on the training device, trains, and resumes exactly
def test_ema_trains_and_resumes_exactly(tmp_path, monkeypatch):
    full = run_recipe(_tiny(tmp_path, "tricks.ema=true", "tricks.ema_decay=0.5"), quiet=True)
    state = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["tricks"]) == {"ema"}
    recipe = _tiny(tmp_path, "tricks.ema=true", "tricks.ema_decay=0.5", f"experiment.output_dir={tmp_path / 'r2'}")
    resumed = killed_then_resumed(monkeypatch, recipe)
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)


def test_ema_copy_is_made_after_the_model_moves(tmp_path):
    from medtricks.tricks.ema import Ema

    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=1)
    ema = Ema.__new__(Ema)
    ema.config = type("C", (), {"ema_decay": 0.9})()
    seen = {}
    real_on_fit_start = Ema.on_fit_start

    def spy(self, m):
        seen["device"] = next(m.parameters()).device  # what fit() moved the model to
        real_on_fit_start(self, m)

    Ema.on_fit_start = spy
    try:
        fit(
            model,
            train,
            val,
            optimizer=opt,
            scheduler=sched,
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
            evaluate_fn=ev,
            checkpoint_dir=tmp_path / "ckpt",
            tricks=[ema],
        )
    finally:
        Ema.on_fit_start = real_on_fit_start
    assert seen["device"] == cfg.device
    assert next(ema.ema.module.parameters()).device == next(model.parameters()).device


# ---- item 20: freezing a block whose gamma is 0
def test_freezing_zero_gamma_blocks_warns(tmp_path):
    recipe = _tiny(tmp_path, "tricks.bn_gamma.strategy=zero_late", "model.freeze=all_but_head")
    with pytest.warns(RuntimeWarning, match="can never learn"):
        medtricks.run.prepare.prepare_run(recipe)
