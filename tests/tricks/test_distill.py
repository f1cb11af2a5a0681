"""Issue 17, item 1: knowledge distillation as a trick -- the loss by hand, a frozen teacher in eval mode
that gets no gradient, teachers with another input size / channels / normalisation, a real run, ablate."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medtricks.tricks.distill as distill_mod
from medtricks.ablation.variants import make_variants, trick_overrides
from medtricks.errors import ConfigError
from medtricks.recipe import load_recipe
from medtricks.train import fit
from medtricks.posthoc.load import load_trained
from medtricks.tricks.base import TrickContext
from medtricks.tricks.distill import DistillConfig, Distillation, Teacher, distillation_kl


MEAN, STD = (0.5,), (0.25,)


def _teacher_net(in_chans=1, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_chans, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _trick(monkeypatch, teacher, **cfg):
    monkeypatch.setattr(distill_mod, "teacher_for", lambda recipe, ctx, ref, **kw: teacher)
    config = DistillConfig(teacher="run", **cfg)
    recipe = SimpleNamespace(tricks=SimpleNamespace(distill=config))
    return Distillation(
        recipe, TrickContext(recipe=recipe, classes=["a", "b"], device=torch.device("cpu"), mean=MEAN, std=STD)
    )


class _Fixed(nn.Module):
    """A 'teacher' that returns given logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits + 0 * self.dummy


def test_the_loss_is_the_hand_computed_value(monkeypatch):
    z_s = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    z_t = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1, 0])
    T, a = 2.0, 0.3
    teacher = Teacher(_Fixed(z_t), mean=MEAN, std=STD, in_chans=1, image_size=4, student_mean=MEAN, student_std=STD)
    trick = _trick(monkeypatch, teacher, temperature=T, alpha=a)
    loss_fn = trick.transform_loss_fn(nn.CrossEntropyLoss())
    images = torch.zeros(2, 1, 4, 4)
    total = loss_fn(z_s, y) + trick.extra_loss(None, images, y, z_s)

    def softmax(row, t):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    ce = sum(-math.log(softmax(row, 1)[label]) for row, label in zip(z_s.tolist(), y.tolist())) / 2
    kl = (
        sum(
            sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(t_row, T), softmax(s_row, T)))
            for s_row, t_row in zip(z_s.tolist(), z_t.tolist())
        )
        / 2
    )
    assert total.item() == pytest.approx(a * ce + (1 - a) * T * T * kl, rel=1e-6)
    assert distillation_kl(z_t, z_t, T).item() == pytest.approx(0.0, abs=1e-7)
    total.backward()  # the gradient reaches the student's logits only
    assert z_s.grad is not None and teacher.model.dummy.grad is None


def test_alpha_one_is_plain_training(monkeypatch):
    teacher = Teacher(
        _Fixed(torch.zeros(2, 2)), mean=MEAN, std=STD, in_chans=1, image_size=4, student_mean=MEAN, student_std=STD
    )
    trick = _trick(monkeypatch, teacher, alpha=1.0)
    loss = nn.CrossEntropyLoss()
    assert trick.transform_loss_fn(loss) is loss and trick.extra_loss(None, torch.zeros(2, 1, 4, 4), None, None) is None


def test_the_teacher_gets_no_gradient_and_stays_in_eval_mode_through_training(engine_setup, monkeypatch, tmp_path):
    net = _teacher_net()
    net.train()  # even a teacher handed over in train mode is put in eval mode
    teacher = Teacher(net, mean=(0.0,), std=(1.0,), in_chans=1, image_size=8, student_mean=(0.0,), student_std=(1.0,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trick = _trick(monkeypatch, teacher, temperature=3.0, alpha=0.5)
    calls = []
    real_call = Teacher.__call__

    def spy(self, images):
        out = real_call(self, images)
        calls.append((self.model.training, torch.is_grad_enabled(), out.requires_grad))
        return out

    monkeypatch.setattr(Teacher, "__call__", spy)
    model, train, val, opt, sched, cfg, ev = engine_setup(tmp_path, epochs=2)
    fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=trick.transform_loss_fn(nn.CrossEntropyLoss()),
        cfg=cfg,
        evaluate_fn=ev,
        checkpoint_dir=tmp_path / "ckpt",
        tricks=[trick],
    )
    assert len(calls) == 2 * len(train)
    assert all(mode is False and out_grad is False for mode, _, out_grad in calls)
    assert not net.training
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert {id(p) for p in net.parameters()}.isdisjoint(id(p) for g in opt.param_groups for p in g["params"])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    model.train()  # the engine's train() calls on the student never reach the teacher
    assert not net.training


def test_a_teacher_with_another_size_channels_and_normalisation(engine_model, monkeypatch):
    seen = {}

    class RGB48(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            seen["x"] = x
            return self.lin(x.mean(dim=(2, 3)))

    t_mean, t_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = Teacher(RGB48(), mean=t_mean, std=t_std, in_chans=3, image_size=48, student_mean=MEAN, student_std=STD)
    trick = _trick(monkeypatch, teacher)
    torch.manual_seed(0)
    pixels = torch.rand(4, 1, 32, 32)
    images = (pixels - 0.5) / 0.25  # the student's loader output
    student = engine_model()  # grey, any size
    logits = student(images)
    extra = trick.extra_loss(student, images, torch.tensor([0, 1, 0, 1]), logits)
    assert extra.dim() == 0 and torch.isfinite(extra)
    x = seen["x"]
    assert tuple(x.shape) == (4, 3, 48, 48)
    expected = F.interpolate(pixels.expand(-1, 3, -1, -1), size=(48, 48), mode="bilinear", align_corners=False)
    expected = (expected - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)
    # RGB student, grey teacher, smaller input: channel mean, antialiased shrink
    grey = Teacher(
        _teacher_net(),
        mean=(0.5,),
        std=(0.2,),
        in_chans=1,
        image_size=16,
        student_mean=(0.4, 0.4, 0.4),
        student_std=(0.3, 0.3, 0.3),
    )
    assert tuple(grey.inputs(torch.zeros(2, 3, 32, 32)).shape) == (2, 1, 16, 16)
    assert torch.allclose(grey.inputs(torch.zeros(2, 3, 32, 32)), torch.full((2, 1, 16, 16), (0.4 - 0.5) / 0.2))


def test_a_bad_teacher_is_named(tmp_path):
    from medtricks.tricks.distill import load_teacher

    with pytest.raises(ConfigError, match=r"tricks.distill.teacher='.*nowhere'.*not a finished run"):
        load_teacher(
            str(tmp_path / "nowhere"), classes=["a", "b"], student_mean=MEAN, student_std=STD, load_run=load_trained
        )
    with pytest.raises(ConfigError, match="cannot build the teacher model"):
        load_teacher("model:no_such_net_xyz", classes=["a", "b"], student_mean=MEAN, student_std=STD)
    teacher = load_teacher("model:resnet18", classes=["a", "b"], student_mean=MEAN, student_std=STD, student_size=32)
    assert teacher.image_size == 32 and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_ablate_names_distill_with_a_teacher_and_pseudo_label():
    assert trick_overrides("distill=runs/teacher/abc") == ["tricks.distill.teacher=runs/teacher/abc"]
    with pytest.raises(ValueError, match="distill=RUN_FOLDER_OR_ID"):
        trick_overrides("distill")
    assert trick_overrides("pseudo_label") == ["tricks.pseudo_label.enabled=true"]
    from pathlib import Path

    base = load_recipe(
        Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml", overrides=["data.label_fraction=0.2"]
    )
    variants = make_variants(base, ["distill=runs/t", "pseudo_label"])
    assert [name for name, _ in variants] == ["baseline", "+distill=runs/t", "+distill=runs/t +pseudo_label"]


@pytest.mark.slow
def test_a_run_distils_from_a_finished_run_with_another_input_size(tiny_recipe, tmp_path):
    from medtricks.run import run_recipe

    teacher = run_recipe(
        tiny_recipe(
            tmp_path,
            "train.epochs=1",
            "schedule.warmup_epochs=0",
            "tracking.log_model=true",
            "experiment.name=teacher",
            "data.image_size=48",
        ),
        quiet=True,
    )
    student = run_recipe(
        tiny_recipe(
            tmp_path,
            "train.epochs=1",
            "schedule.warmup_epochs=0",
            "experiment.name=student",
            "model.name=resnet10t",
            f"tricks.distill.teacher={teacher.run_dir}",
            "tricks.distill.temperature=2",
            "tricks.distill.alpha=0.5",
        ),
        quiet=True,
    )
    assert math.isfinite(student.history[-1]["train/epoch_loss"])
    from medtricks.recipe import load_recipe as _load

    logged = _load(student.run_dir / "recipe.yaml")
    assert logged.tricks.distill.teacher == str(teacher.run_dir) and "distill(T=2,a=0.5)" in logged.tricks_on()
