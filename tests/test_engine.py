"""Training engine: resume equivalence, NaN stop, best checkpoint, accumulation."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medtricks.train import EngineConfig, NonFiniteLossError, fit, predict
from medtricks.train.checkpoint import load_checkpoint
from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.train.schedules import build_scheduler


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    x[y == 1] += 0.5
    return TensorDataset(x, y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _setup(tmp_path, epochs=4, lr=0.1, seed=0, accumulate=1):
    model = _model(seed)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(_data(), batch_size=8, shuffle=True, generator=generator)
    val = DataLoader(_data(24, seed=1), batch_size=8)
    opt = build_optimizer(build_param_groups(model, weight_decay=1e-4, no_bias_decay=True), name="nesterov", lr=lr)
    cfg = EngineConfig(
        epochs=epochs,
        device=torch.device("cpu"),
        seed=seed,
        best_metric="val/acc",
        progress=False,
        log_every=1,
        accumulate=accumulate,
    )
    updates = math.ceil(len(train) / accumulate)
    sched = build_scheduler(
        opt, name="cosine", epochs=epochs, steps_per_epoch=updates, warmup_epochs=1 if epochs > 1 else 0
    )

    def evaluate_fn(m):
        targets, probs, loss = predict(m, val)
        return {"val/acc": float((probs.argmax(1) == targets).mean()), "val/loss": loss}

    return model, train, val, opt, sched, cfg, evaluate_fn


def test_resume_after_kill_reaches_same_weights(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path)
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
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path)
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
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path)
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


def test_checkpoint_holds_full_state_and_best(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=2)
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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=3)

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


def test_gradient_accumulation_counts_updates(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=1, accumulate=2)
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


def test_unknown_best_metric_is_named(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=1)
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


def test_undefined_best_metric_keeps_latest_until_defined(tmp_path):
    model, train, val, opt, sched, cfg, ev = _setup(tmp_path, epochs=3)
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
