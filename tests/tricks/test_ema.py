"""tricks.ema (issue 15 item 14): the EMA copy is made on the training device, trains, and resumes exactly."""

import pytest
import torch
from torch import nn

from medtricks.run import run_recipe
from medtricks.train import fit


# ---- item 14: EMA is made on the training device, trains, and resumes exactly
def test_ema_trains_and_resumes_exactly(tiny_recipe, killed_then_resumed, tmp_path, monkeypatch):
    full = run_recipe(tiny_recipe(tmp_path, "tricks.ema=true", "tricks.ema_decay=0.5"), quiet=True)
    state = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["tricks"]) == {"ema"}
    recipe = tiny_recipe(
        tmp_path, "tricks.ema=true", "tricks.ema_decay=0.5", f"experiment.output_dir={tmp_path / 'r2'}"
    )
    resumed = killed_then_resumed(monkeypatch, recipe)
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)


def test_ema_copy_is_made_after_the_model_moves(engine_setup, tmp_path):
    from medtricks.tricks.ema import Ema

    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=1)
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
