"""Training engine: resume equivalence, NaN stop, non-finite weights never checkpointed, best checkpoint and the
tie-break of its metric, accumulation, and the devices a machine has."""

import math

import pytest
import torch
from torch import nn

from medtricks.errors import ConfigError
from medtricks.train import NonFiniteLossError, fit
from medtricks.train.checkpoint import load_checkpoint
from medtricks.tricks.base import Trick


def test_resume_after_kill_reaches_same_weights(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path)
    full = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=ev,
        checkpoint_dir=tmp_path / "full",
    )
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # "killed" after 2 epochs: a fresh process builds everything again and resumes from last.pt
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path)
    cfg.epochs = 2
    fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=ev,
        checkpoint_dir=tmp_path / "killed",
    )
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path)
    resumed = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=ev,
        checkpoint_dir=tmp_path / "killed",
        resume=True,
    )
    assert resumed.resumed_from_epoch == 1
    assert resumed.steps == full.steps
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert [h["val/acc"] for h in resumed.history] == [h["val/acc"] for h in full.history]
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.optimizer.param_groups[0]["lr"])


def test_checkpoint_holds_full_state_and_best(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=2)
    result = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=ev,
        checkpoint_dir=tmp_path,
    )
    state = load_checkpoint(tmp_path / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "tricks", "rng", "epoch", "step"} <= set(state)
    assert state["epoch"] == 1 and state["step"] == result.steps == 2 * len(train)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["value"] == result.best_value == max(h["val/acc"] for h in result.history)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=3)

    class ExplodesInEpochTwo(nn.Module):
        calls = 0

        def forward(self, logits, targets):
            self.calls += 1
            loss = nn.functional.cross_entropy(logits, targets)
            return loss * float("nan") if self.calls > len(train) else loss

    with pytest.raises(NonFiniteLossError, match="epoch 2") as info:
        fit(
            model,
            train,
            val,
            optimizer=opt,
            scheduler=sched,
            loss_fn=ExplodesInEpochTwo(),
            cfg=cfg,
            evaluate_fn=ev,
            checkpoint_dir=tmp_path,
        )
    assert "last.pt" in str(info.value)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0


def test_gradient_accumulation_counts_updates(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=1, accumulate=2)
    result = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=ev,
        checkpoint_dir=tmp_path,
    )
    assert result.steps == math.ceil(len(train) / 2)


def test_unknown_best_metric_is_named(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=1)
    cfg.best_metric = "val/auroc"
    with pytest.raises(KeyError, match="val/auroc"):
        fit(
            model,
            train,
            val,
            optimizer=opt,
            scheduler=sched,
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
            evaluate_fn=ev,
            checkpoint_dir=tmp_path,
        )


def test_undefined_best_metric_keeps_latest_until_defined(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=3)
    values = iter([float("nan"), 0.4, float("nan")])

    def evaluate_fn(m):  # e.g. AUROC on a validation split that lacks a class in epoch 1
        return {"val/acc": next(values)}

    with pytest.warns(RuntimeWarning, match="undefined|nan"):
        result = fit(
            model,
            train,
            val,
            optimizer=opt,
            scheduler=sched,
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
            evaluate_fn=evaluate_fn,
            checkpoint_dir=tmp_path,
        )
    assert result.best_epoch == 2 and result.best_value == 0.4
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


# ---- item 7: weights, not only the loss
class _Explode(Trick):
    name = "explode"

    def on_step_end(self, model, step):
        with torch.no_grad():
            next(model.parameters()).fill_(math.inf)


def test_non_finite_weights_are_never_checkpointed(engine_setup, tmp_path):
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=2)
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


# ---- item 12: ties of the selection metric
def _scripted(values):
    """An evaluate_fn that returns the next (val/auroc, val/loss) pair at each call."""
    calls = iter(values)

    def evaluate_fn(model):
        auroc, loss = next(calls)
        return {"val/auroc": auroc, "val/loss": loss}

    return evaluate_fn


@pytest.mark.parametrize("tiebreak, expected", [("val/loss", 2), (None, 1)])
def test_a_tie_of_the_selection_metric_is_broken_by_the_declared_metric(engine_setup, tmp_path, tiebreak, expected):
    model, train, val, opt, sched, cfg, _ = engine_setup(tmp_path, epochs=3)
    cfg.best_metric, cfg.best_tiebreak, cfg.best_tiebreak_mode, cfg.max_steps_per_epoch = (
        "val/auroc",
        tiebreak,
        "min",
        1,
    )
    result = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted([(1.0, 0.5), (1.0, 0.3), (1.0, 0.4)]),
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert result.best_epoch == expected
    assert torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)["epoch"] == expected - 1


def test_the_tie_break_state_is_in_the_checkpoint_and_a_resume_keeps_it(engine_setup, tmp_path):
    values = [(0.9, 0.9), (1.0, 0.5), (1.0, 0.3), (1.0, 0.4), (1.0, 0.35)]
    model, train, val, opt, sched, cfg, _ = engine_setup(tmp_path, epochs=5)
    cfg.best_metric, cfg.best_tiebreak, cfg.max_steps_per_epoch = "val/auroc", "val/loss", 1
    full = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted(values),
        checkpoint_dir=tmp_path / "full",
    )
    # killed after epoch 3, resumed by a fresh process
    model, train, val, opt, sched, cfg, _ = engine_setup(tmp_path, epochs=3)
    cfg.best_metric, cfg.best_tiebreak, cfg.max_steps_per_epoch = "val/auroc", "val/loss", 1
    fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted(values[:3]),
        checkpoint_dir=tmp_path / "killed",
    )
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert (state["best_epoch"], state["best_tiebreak"], state["best_tiebreak_value"]) == (3, "val/loss", 0.3)
    model, train, val, opt, sched, cfg, _ = engine_setup(tmp_path, epochs=5)
    cfg.best_metric, cfg.best_tiebreak, cfg.max_steps_per_epoch = "val/auroc", "val/loss", 1
    resumed = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted(values[3:]),
        checkpoint_dir=tmp_path / "killed",
        resume=True,
    )
    assert full.best_epoch == resumed.best_epoch == 3
    assert resumed.best_tiebreak_value == full.best_tiebreak_value == 0.3


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    from medtricks.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:7")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
