"""Issue 17, item 3: pseudo-labelling as a trick -- the threshold on hand-made logits, the masked loss,
the ramp, the seeded unlabelled stream, the kept share per epoch, a real run and an exact resume."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import medtricks.run
import medtricks.tricks.pseudo_label as pl_mod
from medtricks.errors import ConfigError
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.train.engine import seed_epoch
from medtricks.tricks.base import TrickContext
from medtricks.tricks.distill import Teacher
from medtricks.tricks.pseudo_label import PseudoLabel, PseudoLabelConfig, pseudo_label_loss, pseudo_targets

from test_hardening_run import _killed, _tiny

MEAN, STD = (0.0,), (1.0,)


def _pool(n=12):
    # image i is constant c_i: the labeller below is confident where |c_i| is large
    values = torch.linspace(-3, 3, n)
    return TensorDataset(values.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone(), torch.full((n,), -1))


class _ByValue(nn.Module):
    """logits (c, -c) for an image of constant value c (a 'teacher' whose confidence we know)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = x.mean(dim=(1, 2, 3))
        return torch.stack([c, -c], dim=1) + 0 * self.dummy


def _trick(pool=None, extras=None, **cfg):
    config = PseudoLabelConfig(enabled=True, **cfg)
    recipe = SimpleNamespace(tricks=SimpleNamespace(pseudo_label=config), train=SimpleNamespace(batch_size=4),
                             data=SimpleNamespace(num_workers=0))
    ctx = TrickContext(recipe=recipe, classes=["a", "b"], device=torch.device("cpu"), mean=MEAN, std=STD,
                       extras={"unlabeled": _pool() if pool is None else pool, **(extras or {})})
    return PseudoLabel(recipe, ctx)


def test_pseudo_labels_respect_the_threshold():
    logits = torch.tensor([[3.0, 0.0],    # p = 0.9526: kept at 0.95
                           [2.9, 0.0],    # p = 0.9478: not kept
                           [0.0, 4.0],    # p = 0.982 for class 1: kept
                           [0.1, 0.0]])   # p = 0.525: not kept
    targets, kept = pseudo_targets(logits, 0.95)
    assert kept.tolist() == [True, False, True, False] and targets.tolist() == [0, 0, 1, 0]
    soft, kept_soft = pseudo_targets(logits, 0.95, soft=True)
    assert torch.allclose(soft, F.softmax(logits, 1)) and torch.equal(kept_soft, kept)
    assert pseudo_targets(logits, 0.0)[1].all() and not pseudo_targets(logits, 1.0)[1].any()
    # the masked loss: mean over the whole unlabelled batch, masked images count 0
    student = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    loss = pseudo_label_loss(student, targets, kept)
    by_hand = (F.cross_entropy(student[0:1], torch.tensor([0])) + F.cross_entropy(student[2:3], torch.tensor([1]))) / 4
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    soft_loss = pseudo_label_loss(student, soft, kept)
    by_hand_soft = -(soft[[0, 2]] * F.log_softmax(student[[0, 2]], 1)).sum() / 4
    assert soft_loss.item() == pytest.approx(by_hand_soft.item(), rel=1e-6)


def test_the_trick_adds_the_masked_term_of_the_teacher_labels_and_logs_the_kept_share(monkeypatch):
    teacher = Teacher(_ByValue(), mean=MEAN, std=STD, in_chans=1, image_size=4, student_mean=MEAN, student_std=STD)
    monkeypatch.setattr(pl_mod, "teacher_for", lambda recipe, ctx, ref, **kw: teacher)
    trick = _trick(teacher="run", threshold=0.99, weight=2.0)  # p >= 0.99 <=> |2c| >= 4.6 <=> |c| >= 2.3
    seen = []
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    real_forward = student.forward

    def spy(x):
        seen.append(x)
        return real_forward(x)

    student.forward = spy
    torch.manual_seed(0)
    images = torch.zeros(4, 1, 4, 4)
    loss = trick.extra_loss(student, images, torch.zeros(4, dtype=torch.long), None)
    (batch,) = seen
    c = batch.mean(dim=(1, 2, 3))
    kept = c.abs() >= 2.3 - 1e-6
    target = (c < 0).long()
    expected = 2.0 * (F.cross_entropy(real_forward(batch), target, reduction="none") * kept).sum() / 4
    if kept.any():
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    else:
        assert loss is None
    for _ in range(2):
        trick.extra_loss(student, images, None, None)
    metrics = {}
    trick.on_epoch_end(0, metrics)
    # 12 images, c in linspace(-3, 3, 12): |c| >= 2.3 for 4 of them; 3 batches of 4 = one pass
    assert metrics["train/pseudo_kept"] == pytest.approx(4 / 12)
    assert metrics["train/pseudo_weight"] == 2.0


def test_the_current_model_labels_in_eval_mode_and_trains_on():
    trick = _trick(threshold=0.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.Dropout(0.5))
    modes = []
    model[1].register_forward_hook(lambda m, i, o: modes.append((model.training, torch.is_grad_enabled())))
    model.train()
    loss = trick.extra_loss(model, torch.zeros(4, 1, 4, 4), None, None)
    assert modes == [(False, False), (True, True)] and model.training
    loss.backward()
    assert model[1].weight.grad is not None


def test_the_weight_ramps_over_epochs_of_updates():
    trick = _trick(weight=3.0, weight_ramp=2.0, extras={"updates_per_epoch": 5})
    assert trick.current_weight() == 0.0
    trick.after_step(None, 5)
    assert trick.current_weight() == pytest.approx(1.5)
    trick.after_step(None, 40)
    assert trick.current_weight() == 3.0
    resumed = _trick(weight=3.0, weight_ramp=2.0, extras={"updates_per_epoch": 5})
    resumed.load_state_dict(trick.state_dict())
    assert resumed.current_weight() == 3.0
    assert _trick(weight=0.5).current_weight() == 0.5


def test_the_unlabelled_stream_is_seeded_per_epoch():
    def draws(trick, epoch):
        seed_epoch(7, epoch)
        out = [trick._next_batch("cpu").flatten(1)[:, 0] for _ in range(2)]
        trick.on_epoch_end(epoch, {})
        return torch.cat(out)

    a, b = _trick(), _trick()
    first = draws(a, 0)
    second = draws(a, 1)
    assert torch.equal(draws(b, 0), first)
    assert torch.equal(draws(_trick(), 1), second)  # a resumed run at epoch 1 draws the same images
    assert not torch.equal(first, second)


def test_without_unlabelled_images_it_says_what_to_set():
    with pytest.raises(ConfigError, match="data.label_fraction.*data.unlabeled"):
        _trick(pool=TensorDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0)))


PL = ["data.label_fraction=0.4", "tricks.pseudo_label.enabled=true", "tricks.pseudo_label.threshold=0.5",
      "tricks.pseudo_label.weight_ramp=1", "tricks.pseudo_label.batch_size=8"]


@pytest.mark.slow
def test_a_run_with_pseudo_labels_logs_the_kept_share(tmp_path):
    result = run_recipe(_tiny(tmp_path, *PL), quiet=True)
    assert all(0.0 <= h["train/pseudo_kept"] <= 1.0 for h in result.history)
    assert result.history[-1]["train/pseudo_weight"] == 1.0
    params = json.loads((result.run_dir / "state.json").read_text())
    assert params["status"] == "finished"


@pytest.mark.slow
def test_a_resumed_pseudo_label_run_is_exact(tmp_path, monkeypatch):
    full = run_recipe(_tiny(tmp_path, *PL, "experiment.name=full"), quiet=True)
    recipe = _tiny(tmp_path, *PL, "experiment.name=killed")
    real_fit = _killed(monkeypatch, after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    assert find_resumable_run_dir(recipe) is not None
    resumed = run_recipe(recipe, resume="auto", quiet=True)
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)
    assert resumed.history[-1]["train/pseudo_kept"] == pytest.approx(full.history[-1]["train/pseudo_kept"])
