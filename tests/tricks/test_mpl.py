"""Issue 33, item 2: Meta Pseudo Labels as a trick -- the teacher's update sign on a toy problem whose answer is
known (labels that hurt the student's labelled loss are pushed away from, labels that help are reinforced), the
student trains on the teacher's strong-view labels only, UDA's mask and normalisation, the refusals, a real run
with its fine-tuning epochs, and an exact resume of student and teacher after a kill mid-epoch."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medtricks.run
import medtricks.tricks.mpl as mpl_module
from medtricks.errors import ConfigError
from medtricks.recipe import RecipeError, load_recipe
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.train.engine import seed_epoch
from medtricks.tricks.base import TrickContext
from medtricks.tricks.fixmatch import FixMatchConfig
from medtricks.tricks.mpl import MetaPseudoLabels, MetaPseudoLabelsConfig, mpl_teacher_loss, uda_loss
from medtricks.data.transforms import build_transforms

ROOT = Path(__file__).resolve().parents[2]
SIZE = 8
SCHEDULE = dict(name="constant", epochs=3, steps_per_epoch=4)  # what the run hands a trick (build_scheduler's)


def _xray(preset):
    return build_transforms(preset, SIZE, mean=(0.0,), std=(1.0,), in_chans=1, train=True)


class _ArrayPool(torch.utils.data.Dataset):
    """The run's unlabelled pool as the stream sees it: images through ``transform``, target -1, a manifest with
    the withheld labels, ``with_transform``. Image i is constant: 24 values spread over [0, 1]."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform
        truth = [int(float(image.mean()) < 0.5) for image in images]  # class 1 below 0.5
        self.manifest = pd.DataFrame({"withheld_target": truth})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), -1

    def with_transform(self, transform):
        return _ArrayPool(self.images, transform)


def _pool(n=24):
    return _ArrayPool([np.full((SIZE, SIZE), v, np.float32) for v in np.linspace(0, 1, n)], _xray("none"))


class _ByValue(nn.Module):
    """logits k·(c − 0.5)·(1, −1) for an image of mean c (class 1 below 0.5 when k > 0); records each forward."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(10.0))
        self.calls = []

    def forward(self, x):
        c = x.mean(dim=(1, 2, 3)) - 0.5
        out = torch.stack([self.k * c, -self.k * c], dim=1)
        self.calls.append(
            SimpleNamespace(x=x.detach().clone(), training=self.training, grad=torch.is_grad_enabled(), out=out)
        )
        return out


def _recipe(cfg, *, batch_size=4, epochs=3, accumulate=1, cache_frozen=None, fixmatch=False, lr=0.5):
    return SimpleNamespace(
        tricks=SimpleNamespace(mpl=cfg, fixmatch=FixMatchConfig(enabled=fixmatch), no_bias_decay=False),
        train=SimpleNamespace(
            batch_size=batch_size, epochs=epochs, accumulate=accumulate, cache_frozen=cache_frozen, grad_clip=None
        ),
        optim=SimpleNamespace(
            name="sgd", lr=lr, weight_decay=0.0, momentum=0.0, betas=(0.9, 0.999), linear_scaling=False
        ),
        data=SimpleNamespace(num_workers=0),
    )


def _trick(pool=None, recipe_kw=None, **cfg):
    cfg.setdefault("uda_weight", 0.0)  # the MPL term alone unless a test asks for UDA
    recipe = _recipe(MetaPseudoLabelsConfig(enabled=True, **cfg), **(recipe_kw or {}))
    ctx = TrickContext(
        recipe=recipe,
        classes=["a", "b"],
        device=torch.device("cpu"),
        mean=(0.0,),
        std=(1.0,),
        extras={"unlabeled": _pool() if pool is None else pool, "updates_per_epoch": 4, "schedule_kwargs": SCHEDULE},
    )
    return MetaPseudoLabels(recipe, ctx)


def _labelled():
    """Four labelled images of constant value c; class 1 below 0.5 (what _ByValue with k > 0 predicts)."""
    c = torch.tensor([0.1, 0.3, 0.7, 0.9])
    return c.view(4, 1, 1, 1).expand(4, 1, SIZE, SIZE).clone(), torch.tensor([1, 1, 0, 0])


def _start(trick, student):
    """What the run does before the first batch: the loss through the trick, then on_fit_start (the teacher)."""
    images, targets = _labelled()
    loss_fn = trick.transform_loss_fn(lambda logits, y: F.cross_entropy(logits, y))
    trick.on_fit_start(student)
    return images, targets, loss_fn


def _teacher_prob_of_its_labels(trick, images):
    with torch.no_grad():
        logits = trick.teacher(images)
    return F.softmax(logits, dim=1).gather(1, logits.argmax(1, keepdim=True)).mean().item()


def _teacher_after_a_step(teacher_k, monkeypatch, feedback_on=True):
    """Student k = 1 (right, unsure); teacher k = teacher_k. One engine step; the teacher's k after it, the
    feedback h, and the student's labelled loss before/after."""
    trick = _trick(mu=3)  # 12 unlabelled images of the 24 in [0, 1]
    student = _ByValue().train()
    with torch.no_grad():
        student.k.fill_(1.0)
    images, targets, loss_fn = _start(trick, student)
    with torch.no_grad():
        trick.teacher.k.fill_(teacher_k)
    seen, real = [], mpl_module.teacher_feedback

    def recorded(before, after):
        seen.append((float(before), float(after)))
        return real(before, after) if feedback_on else 0.0

    monkeypatch.setattr(mpl_module, "teacher_feedback", recorded)
    seed_epoch(0, 0)  # the same unlabelled batch and strong views in both calls
    logits = student(images)
    loss = loss_fn(logits, targets) + trick.extra_loss(student, images, targets, logits)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    trick.on_step_end(student, 1)
    return float(trick.teacher.k.detach()), seen[0]


@pytest.mark.parametrize("teacher_k, helps", [(3.0, True), (-3.0, False)])
def test_the_teacher_is_pushed_towards_labels_that_help_and_away_from_labels_that_hurt(teacher_k, helps, monkeypatch):
    # The right labels (teacher k > 0) make the student surer of the truth: its labelled loss falls (h > 0);
    # the flipped labels (k < 0) raise it (h < 0). The teacher's labelled loss pulls towards the truth either
    # way, so the MPL term is isolated as the difference to the same step with the feedback set to 0.
    k_with, (before, after) = _teacher_after_a_step(teacher_k, monkeypatch, feedback_on=True)
    assert (after < before) == helps  # the student's labelled loss moved as the labels deserve
    monkeypatch.undo()
    k_without, _ = _teacher_after_a_step(teacher_k, monkeypatch, feedback_on=False)
    # P(ŷ) grows with |k| in the direction of the teacher's own labels: sign(k) · Δk > 0 means "surer of ŷ"
    surer = (k_with - k_without) * (1 if teacher_k > 0 else -1)
    assert (surer > 0) == helps and abs(surer) > 1e-5


def test_the_mpl_term_is_the_feedback_times_the_cross_entropy_of_the_teachers_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = logits.detach().argmax(1)
    for h in (0.3, -0.3):
        loss = mpl_teacher_loss(logits, labels, h)
        assert loss.item() == pytest.approx(h * F.cross_entropy(logits, labels).item())
        (grad,) = torch.autograd.grad(loss, logits)
        step = logits.detach() - grad  # one descent step
        p_before = F.softmax(logits.detach(), 1).gather(1, labels[:, None])
        p_after = F.softmax(step, 1).gather(1, labels[:, None])
        assert bool(((p_after > p_before) if h > 0 else (p_after < p_before)).all())


def test_uda_masks_on_the_sharpened_weak_prediction_and_averages_over_the_whole_batch():
    weak = torch.tensor([[2.1, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    strong = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.5, 0.0]], requires_grad=True)
    loss, mask = uda_loss(weak, strong, temperature=0.7, threshold=0.95)
    target = F.softmax(weak / 0.7, 1)  # sharpened: 2.1 / 0.7 = 3 -> p = 0.9526 passes; 1.0 / 0.7 -> 0.80 does not
    assert mask.tolist() == [True, False, True, False]
    by_hand = -(target * F.log_softmax(strong, 1)).sum(1)[[0, 2]].sum() / 4
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert strong.grad[[1, 3]].abs().sum() == 0  # masked images give no gradient; the weak view none at all


def test_the_student_trains_on_the_teachers_strong_view_labels_and_not_on_the_labels():
    trick = _trick(mu=3, finetune_epochs=1)
    student = _ByValue().train()
    images, targets, loss_fn = _start(trick, student)
    with torch.no_grad():
        trick.teacher.k.fill_(-10.0)  # a teacher that labels every image the wrong way
    assert loss_fn(student(images), targets).item() == 0.0  # student_labeled_weight 0: the paper
    seed_epoch(0, 0)
    student.calls.clear()
    extra = trick.extra_loss(student, images, targets, student(images))
    strong = student.calls[-1]
    assert strong.grad and strong.training and strong.x.shape[0] == 12  # mu · B strong views, with gradient
    flipped = (strong.x.mean(dim=(1, 2, 3)) > 0.5).long()  # the teacher (k < 0) labels c > 0.5 as class 1
    expected = F.cross_entropy(strong.out, flipped)
    assert extra.item() == pytest.approx(expected.item(), rel=1e-5)
    trick.on_step_end(student, 1)
    metrics = {}
    trick.on_epoch_end(0, metrics)
    assert {"train/mpl_feedback", "train/mpl_teacher_loss", "train/mpl_uda_mask_rate"} <= set(metrics)
    trick.on_epoch_end(1, {})  # epochs 2 of 3: the last one fine-tunes on the labels alone
    assert loss_fn(student(images), targets).item() > 0.0
    assert trick.extra_loss(student, images, targets, student(images)) is None


def test_the_teacher_and_the_feedback_use_the_runs_labelled_loss_with_its_class_weights():
    trick = _trick(mu=3)
    student = _ByValue().train()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([3.0, 1.0]))  # tricks.class_balance: loss
    trick.transform_loss_fn(weighted)
    trick.on_fit_start(student)
    images, _ = _labelled()
    targets = torch.tensor([1, 1, 0, 1])  # one label against the model: the classes' losses differ
    seed_epoch(0, 0)
    logits = student(images)
    trick.extra_loss(student, images, targets, logits)
    pending = trick._pending
    assert pending["loss_before"].item() == pytest.approx(weighted(logits, targets).item())
    teacher_labelled = trick.teacher(images)
    assert pending["teacher_base"].item() == pytest.approx(weighted(teacher_labelled, targets).item(), rel=1e-5)
    assert weighted(logits, targets).item() != pytest.approx(F.cross_entropy(logits, targets).item())


def test_under_progressive_resizing_the_teacher_sees_the_labelled_batch_apart():
    trick = _trick(mu=3)
    student = _ByValue().train()
    images, targets, loss_fn = _start(trick, student)
    big = F.interpolate(images, scale_factor=2)  # this epoch's size; the pool stays at the recipe's (8 px)
    calls = []
    trick.teacher.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    seed_epoch(0, 0)
    extra = trick.extra_loss(student, big, targets, student(big))
    assert calls == [(4, 1, 2 * SIZE, 2 * SIZE), (24, 1, SIZE, SIZE)]  # labelled, then weak + strong (2 x 12)
    assert torch.isfinite(extra) and trick._pending["teacher_base"].shape == ()


def test_the_teacher_starts_as_a_copy_and_has_its_own_optimizer_and_lr():
    trick = _trick(teacher_lr=0.01)
    student = _ByValue()
    trick.on_fit_start(student)
    assert trick.teacher is not student and float(trick.teacher.k.detach()) == float(student.k.detach())
    assert trick.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert trick.log_params()["mpl.teacher_lr"] == 0.01 and _trick().log_params()["mpl.teacher_lr"] == 0.5


def _finished_run(k=7.0, classes=("a", "b"), mean=(0.0,)):
    """What ``load_trained`` gives for a finished run, as the trick reads it."""
    model = _ByValue()
    with torch.no_grad():
        model.k.fill_(k)
    return SimpleNamespace(
        model=model, classes=list(classes), data_config={"mean": mean, "std": (1.0,)}, run_id=None, run_dir="runs/x"
    )


def _trick_with_teacher(finished):
    trick_ctx = {}

    def load_run(ref, device="cpu"):
        trick_ctx["ref"] = ref
        return finished

    cfg = MetaPseudoLabelsConfig(enabled=True, teacher="runs/x", uda_weight=0.0)
    recipe = _recipe(cfg)
    ctx = TrickContext(
        recipe=recipe,
        classes=["a", "b"],
        device=torch.device("cpu"),
        mean=(0.0,),
        std=(1.0,),
        load_run=load_run,
        extras={"unlabeled": _pool(), "updates_per_epoch": 4, "schedule_kwargs": SCHEDULE},
    )
    return MetaPseudoLabels(recipe, ctx), trick_ctx


def test_the_teacher_can_start_from_a_finished_run_with_the_same_classes_and_normalisation():
    trick, seen = _trick_with_teacher(_finished_run(k=7.0))
    student = _ByValue()
    trick.on_fit_start(student)
    assert seen["ref"] == "runs/x" and float(trick.teacher.k.detach()) == 7.0 and float(student.k.detach()) == 10.0
    assert trick.log_params()["mpl.teacher_run"] == "runs/x"
    with pytest.raises(ConfigError, match="classes"):
        _trick_with_teacher(_finished_run(classes=("b", "a")))
    with pytest.raises(ConfigError, match="input mean"):
        _trick_with_teacher(_finished_run(mean=(0.5,)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(recipe_kw=dict(fixmatch=True)), "tricks.mpl and tricks.fixmatch"),
        (dict(recipe_kw=dict(accumulate=2)), "train.accumulate"),
        (dict(recipe_kw=dict(cache_frozen={"views": 1})), "train.cache_frozen"),
        (dict(finetune_epochs=3), "finetune_epochs=3 leaves no MPL epoch"),
        (dict(pool=_ArrayPool([], _xray("none"))), "data.label_fraction.*data.unlabeled"),
    ],
)
def test_what_mpl_cannot_do_is_refused_naming_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _trick(**kwargs)


@pytest.mark.parametrize(
    "override, key",
    [
        ("tricks.mpl.mu=0", "tricks.mpl.mu"),
        ("tricks.mpl.uda_threshold=0", "tricks.mpl.uda_threshold"),
        ("tricks.mpl.teacher_lr=0", "tricks.mpl.teacher_lr"),
        ("tricks.mpl.strong=cxr_flip", "tricks.mpl.strong"),
        ("tricks.mpl.finetune_epoch=1", "tricks.mpl.finetune_epoch"),
    ],
)
def test_bad_settings_are_recipe_errors_naming_the_key(override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=["tricks.mpl.enabled=true", override])


def test_the_recipe_tag_and_the_shipped_recipe():
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=["tricks.mpl.enabled=true"])
    assert "mpl@mu7" in recipe.tricks_on()
    shipped = load_recipe(ROOT / "recipes" / "kermany_mpl.yaml")
    assert shipped.tricks.mpl.enabled and shipped.data.label_fraction == 0.1
    assert 0 < shipped.tricks.mpl.finetune_epochs < shipped.train.epochs and not shipped.tricks.fixmatch.enabled
    assert shipped.tricks.mpl.teacher is None  # the paper: the teacher starts as the student does


MPL = [
    "data.label_fraction=0.6",
    "tricks.mpl.enabled=true",
    "tricks.mpl.mu=1",
    "tricks.mpl.finetune_epochs=1",
    "train.epochs=3",
]


def test_an_mpl_run_logs_the_teachers_feedback_then_fine_tunes(tiny_recipe, tmp_path):
    result = run_recipe(tiny_recipe(tmp_path, *MPL), quiet=True)
    mpl_epochs, finetune = result.history[:2], result.history[2]
    assert all("train/mpl_feedback" in h and 0.0 <= h["train/mpl_label_acc_all"] <= 1.0 for h in mpl_epochs)
    assert "train/mpl_feedback" not in finetune  # the last epoch trains on the labels alone
    assert result.run_dir.joinpath("checkpoints", "best.pt").is_file()


def test_an_mpl_run_can_start_its_teacher_from_a_finished_run(tiny_recipe, tmp_path):
    supervised = run_recipe(tiny_recipe(tmp_path, "data.label_fraction=0.6", "experiment.name=sup"), quiet=True)
    result = run_recipe(
        tiny_recipe(tmp_path, *MPL, "train.epochs=2", f"tricks.mpl.teacher={supervised.run_dir}"), quiet=True
    )
    assert "train/mpl_feedback" in result.history[0]
    params = json.loads((result.run_dir / "store" / "params.json").read_text())
    assert params["mpl.teacher_run"] == supervised.run_id  # the run id where it has one, else its folder


def test_an_mpl_run_killed_mid_epoch_resumes_to_the_same_student_and_teacher(
    tiny_recipe, kill_run, tmp_path, monkeypatch
):
    full = run_recipe(tiny_recipe(tmp_path, *MPL, "experiment.name=full"), quiet=True)
    recipe = tiny_recipe(tmp_path, *MPL, "experiment.name=killed")
    real_fit = kill_run(monkeypatch, at_step=3)  # the first update of epoch 2 (2 updates per epoch)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    state = torch.load(find_resumable_run_dir(recipe) / "checkpoints" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 2) and "teacher" in state["tricks"]["mpl"]
    resumed = run_recipe(recipe, resume="auto", quiet=True)
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=False)
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    ta, tb = a["tricks"]["mpl"]["teacher"], b["tricks"]["mpl"]["teacher"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert resumed.history[1]["train/mpl_feedback"] == full.history[1]["train/mpl_feedback"]


def test_the_label_efficiency_benchmark_runs_mpl_from_its_recipe_below_100_percent(tmp_path, monkeypatch):
    import benchmarks.label_efficiency as bench

    trained = []
    monkeypatch.setattr(bench, "_train", lambda recipe: (trained.append(recipe), (str(tmp_path / "run"), 1.0))[1])
    monkeypatch.setattr(bench, "test_metrics", lambda run_dir, positive: {m: 0.5 for m in bench.METRICS})
    args = SimpleNamespace(quick=False, data_root=None, cache_dir=None)
    rows = bench.run_seed(0, {0.02: 12, 0.1: 4, 1.0: 1}, ["mpl"], args, tmp_path, tmp_path / "tmp", "PNEUMONIA")
    assert [(r["fraction"], r["variant"]) for r in rows] == [(0.1, "mpl"), (0.02, "mpl")]
    at_10, at_2 = trained[-2], trained[-1]
    assert at_10.tricks.mpl.enabled and at_10.data.label_fraction == 0.1 and at_10.train.epochs == 4
    assert (at_10.tricks.mpl.finetune_epochs, at_2.tricks.mpl.finetune_epochs) == (1, 3)
    assert "mpl" not in bench.DEFAULT_VARIANTS and "mpl" in bench.VARIANTS
