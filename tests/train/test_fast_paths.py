"""Issue 29: the cached frozen prefix and progressive resizing."""

import copy
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from medtricks.errors import ConfigError
from medtricks.models import create_model, freeze_model
from medtricks.recipe import load_recipe
from medtricks.run import find_resumable_run_dir, make_train_loader, run_recipe
from medtricks.tracking import NullStore
from medtricks.train import EngineConfig, fit, predict
from medtricks.train.frozen_cache import CachedViews, FrozenSplit, SuffixModel, build_cached_views, split_frozen_prefix
from medtricks.train.progressive import ProgressiveLoader, progressive_batches, progressive_sizes
from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.train.schedules import build_scheduler


ROOT = Path(__file__).resolve().parents[2]


class _RandomImages(torch.utils.data.Dataset):
    """Images whose augmentation draws from python's random (as XrayTransform does)."""

    def __init__(self, n=40, size=32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 1, size, size, generator=g)
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        shift = random.uniform(-0.3, 0.3)
        return self.images[i] + shift + 0.5 * self.targets[i], self.targets[i]


def _frozen_resnet(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=2, in_chans=1)
    freeze_model(model, [0, 1, 2])
    return model


def _train(model, train_set, *, train_module=None, epochs=3, checkpoint_dir, resume=False, seed=0):
    loader = make_train_loader(train_set, batch_size=8, seed=seed, num_workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(build_param_groups(model, weight_decay=1e-4), name="nesterov", lr=0.05)
    sched = build_scheduler(opt, name="cosine", epochs=epochs, steps_per_epoch=len(loader), warmup_epochs=0.5)
    cfg = EngineConfig(
        epochs=epochs,
        device=torch.device("cpu"),
        seed=seed,
        best_metric="val/loss",
        best_mode="min",
        progress=False,
        log_every=1,
    )
    assert params
    return fit(
        model,
        loader,
        None,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=lambda m: {"val/loss": 0.0},
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        train_module=train_module,
    )


def _views(split, dataset, dtype=torch.float32):
    return build_cached_views(
        split, dataset, views=2, seed_of_view=lambda v: 1000 + v, dtype=dtype, batch_size=16, progress=False
    )


def test_split_cuts_after_the_frozen_prefix_and_reproduces_the_forward():
    model = _frozen_resnet()
    split = split_frozen_prefix(model, sample=torch.randn(2, 1, 32, 32))
    assert split.cut == "layer3.0"
    assert all(not p.requires_grad for _, unit in split.units[: split.n_frozen] for p in unit.parameters())
    lite = create_model("efficientnet_lite0", num_classes=2, in_chans=1)
    freeze_model(lite, [0, 1, 2, 3, 4])
    assert split_frozen_prefix(lite, sample=torch.randn(2, 1, 64, 64)).cut == "blocks.4.0"


def test_nothing_frozen_at_the_front_is_refused():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, in_chans=1)
    freeze_model(model, ["layer2*"])
    with pytest.raises(ConfigError, match="freezes nothing at the front"):
        split_frozen_prefix(model)


def test_a_split_that_does_not_reproduce_the_model_is_refused():
    model = _frozen_resnet()
    real_forward = model.forward
    model.forward = lambda x: real_forward(x) + 1.0  # a forward that is more than its blocks in sequence
    with pytest.raises(ConfigError, match="does not reproduce"):
        split_frozen_prefix(model, sample=torch.randn(2, 1, 32, 32))
    with pytest.raises(ConfigError, match="not a family"):
        split_frozen_prefix(nn.Sequential(_frozen_resnet()))


def test_cached_prefix_trains_exactly_like_the_uncached_run_on_the_same_views(tmp_path):
    data = _RandomImages(n=24, size=24)
    cached_model = _frozen_resnet()
    plain_model = copy.deepcopy(cached_model)
    split = split_frozen_prefix(cached_model)
    features = _views(split, data)
    identity = FrozenSplit([("identity", nn.Identity())], 1, tail=None)
    images = _views(identity, data)  # the same two augmented views, before the prefix
    assert features.store.shape[:2] == images.store.shape[:2] == (2, len(data))

    cached = _train(
        cached_model, features, train_module=SuffixModel(cached_model, split), checkpoint_dir=tmp_path / "c", epochs=2
    )
    plain = _train(plain_model, images, checkpoint_dir=tmp_path / "p", epochs=2)
    assert [h["train/epoch_loss"] for h in cached.history] == pytest.approx(
        [h["train/epoch_loss"] for h in plain.history], rel=1e-5, abs=1e-6
    )
    for (name, a), b in zip(cached_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_cached_views_cycle_by_epoch_and_the_views_differ():
    data = _RandomImages(n=8)
    views = _views(FrozenSplit([("identity", nn.Identity())], 1, tail=None), data)
    views.set_epoch(0)
    first = views[3][0]
    views.set_epoch(1)
    assert not torch.equal(first, views[3][0])
    views.set_epoch(2)
    assert torch.equal(first, views[3][0])
    again = _views(FrozenSplit([("identity", nn.Identity())], 1, tail=None), data)
    assert torch.equal(views.store, again.store)  # drawn from the seeds: a resumed run redraws the same views


def test_float16_store_and_suffix_evaluation():
    data = _RandomImages(n=16)
    model = _frozen_resnet()
    split = split_frozen_prefix(model)
    views = _views(split, data, dtype=torch.float16)
    assert views.store.dtype == torch.float16
    targets, probs, _ = predict(SuffixModel(model, split), torch.utils.data.DataLoader(views, batch_size=8))
    whole_targets, whole_probs, _ = predict(
        model,
        torch.utils.data.DataLoader(
            CachedViews(_views(FrozenSplit([("identity", nn.Identity())], 1, tail=None), data).store, data.targets),
            batch_size=8,
        ),
    )
    assert (targets == whole_targets).all()
    assert whole_probs == pytest.approx(probs, abs=2e-2)


# ------------------------------------------------------------------------------- progressive resizing
def test_progressive_sizes_and_batches():
    assert progressive_sizes(epochs=3, start=96, end=160, final_epochs=1) == [96, 128, 160]
    assert progressive_sizes(epochs=5, start=64, end=128, final_epochs=2, multiple=32) == [64, 64, 96, 128, 128]
    assert progressive_sizes(epochs=2, start=96, end=160, final_epochs=2) == [160, 160]
    assert progressive_sizes(epochs=1, start=96, end=160, final_epochs=0) == [96]
    assert progressive_batches([96, 128, 160], end=160, batch_size=32, n_images=1000) == [88, 48, 32]
    assert progressive_batches([96, 128, 160], end=160, batch_size=32, n_images=60) == [60, 48, 32]
    assert progressive_batches([96, 160], end=160, batch_size=32, n_images=1000, scale_batch=False) == [32, 32]
    # memory stays about flat: batch x pixels never exceeds the final epoch's
    for size, batch in zip([96, 128, 160], [88, 48, 32]):
        assert batch * size**2 <= 32 * 160**2


def test_progressive_lr_schedule_stays_in_epochs_and_scales_with_the_batch(tmp_path):
    data = _RandomImages(n=48)
    sizes, batches = [16, 24, 32], [24, 16, 8]
    seen_sizes = []

    class Resized(torch.utils.data.Dataset):
        size = 32
        targets = data.targets

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            image, target = data[i]
            return nn.functional.interpolate(image[None], size=self.size)[0], target

    resized = Resized()

    def set_size(size):
        resized.size = size
        seen_sizes.append(size)

    loader = ProgressiveLoader(
        resized,
        sizes=sizes,
        batches=batches,
        batch_size=8,
        set_size=set_size,
        make_loader=lambda b: make_train_loader(resized, batch_size=b, seed=0, num_workers=0),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(build_param_groups(model, weight_decay=0.0), name="sgd", lr=0.1)
    nominal = loader.nominal_batches
    assert nominal == 6
    sched = build_scheduler(opt, name="cosine", epochs=3, steps_per_epoch=nominal)
    lrs = []
    cfg = EngineConfig(
        epochs=3,
        device=torch.device("cpu"),
        seed=0,
        best_metric="val/loss",
        best_mode="min",
        progress=False,
        log_every=1,
    )
    result = fit(
        model,
        loader,
        None,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=lambda m: {"val/loss": 0.0},
        checkpoint_dir=tmp_path,
        on_step=lambda step, m: lrs.append(m["lr"]),
    )
    assert seen_sizes == sizes
    assert result.steps == 2 + 3 + 6  # 48 images in batches of 24, 16, 8
    # epoch 0 runs at 3x the batch: the lr after its first update is 3x the cosine value at 1/2 of an epoch's updates
    cosine = [0.5 * 0.1 * (1 + math.cos(math.pi * t / 18)) for t in range(19)]
    assert lrs[0] == pytest.approx(3 * cosine[3])
    assert lrs[2] == pytest.approx(2 * cosine[6 + 2])  # epoch 1, first of 3 updates: position 1 + 1/3
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------- through a recipe
TINY = [
    "data.synth.n=48",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=3",
    "train.batch_size=16",
    "eval.n_bootstrap=20",
    "eval.plots=false",
    "train.progress=false",
    "train.log_every=1",
    "schedule.warmup_epochs=0.5",
    "optim.lr=0.4",
    "tricks.bn_gamma.strategy=none",
    "model.freeze=[0, 1, 2]",
    "train.cache_frozen.views=2",
]


def _tiny(tmp_path, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[*TINY, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}", *extra],
    )


def test_cached_run_resumes_exactly_after_a_kill(fit_killed_after_epoch, tmp_path, monkeypatch):
    import medtricks.run

    full = run_recipe(_tiny(tmp_path), tracker=NullStore(), quiet=True)
    assert len(full.history) == 3
    recipe = _tiny(tmp_path, f"experiment.output_dir={tmp_path / 'runs2'}")
    real_fit = medtricks.run.fit

    monkeypatch.setattr(medtricks.run, "fit", fit_killed_after_epoch(real_fit, 2))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tracker=NullStore(), quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    resumed = run_recipe(recipe, resume="auto", tracker=NullStore(), quiet=True)
    assert [h["train/epoch_loss"] for h in resumed.history] == pytest.approx(
        [h["train/epoch_loss"] for h in full.history], rel=1e-6
    )
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], rel=1e-6)
    assert find_resumable_run_dir(recipe) is None


def test_cached_run_logs_where_it_cut_and_what_it_holds(tmp_path):
    tracker = NullStore()
    run_recipe(_tiny(tmp_path, "train.epochs=1"), tracker=tracker, quiet=True)
    assert tracker.params["resolved.cache_frozen.first_trained"] == "layer3.0"
    assert tracker.params["resolved.cache_frozen.megabytes"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["tricks.mixup_alpha=0.2"], "mixup"),
        (["model.resizer.enabled=true", "model.resizer.input_size=48", "model.resizer.output_size=32"], "resizer"),
    ],
)
def test_what_the_cache_cannot_honour_is_refused(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        run_recipe(_tiny(tmp_path, *extra), tracker=NullStore(), quiet=True)


def test_cache_without_freeze_and_bad_progressive_settings_fail_at_load(tmp_path):
    with pytest.raises(Exception, match="model.freeze is not set"):
        _tiny(tmp_path, "model.freeze=null")
    with pytest.raises(Exception, match="larger than its end"):
        _tiny(tmp_path, "train.cache_frozen=null", "model.freeze=null", "schedule.progressive_resize.start=64")
    with pytest.raises(Exception, match="progressive_resize changes the image size"):
        _tiny(tmp_path, "schedule.progressive_resize.start=16")


def test_progressive_run_trains_at_the_scheduled_sizes(tmp_path):
    tracker = NullStore()
    result = run_recipe(
        _tiny(
            tmp_path,
            "train.cache_frozen=null",
            "model.freeze=null",
            "schedule.progressive_resize.start=16",
            "schedule.progressive_resize.multiple=8",
        ),
        tracker=tracker,
        quiet=True,
    )
    assert tracker.params["resolved.progressive_sizes"] == "16,24,32"
    assert (
        tracker.params["resolved.progressive_batches"] == "41,24,16"
    )  # 41 training images cap the first epoch's batch
    assert len(result.history) == 3 and result.metrics is not None


def test_fused_frozen_norms_copy_predicts_the_same_and_leaves_the_model_alone():
    from medtricks.train.frozen_cache import with_fused_frozen_norms

    model = _frozen_resnet().eval()
    fused = with_fused_frozen_norms(model)
    assert fused is not model
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert "FrozenBatchNorm" in type(model.bn1).__name__  # the saved model keeps its frozen layers
    unfrozen = create_model("resnet18", num_classes=2, in_chans=1)
    assert with_fused_frozen_norms(unfrozen) is unfrozen
