"""Issue 33, item 1: FixMatch as a trick -- the masked loss over mu·B, the weak view labels (no gradient, train
mode) and the strong view trains, mu·B images per step, a stream independent of lambda_u, the cxr_strong preset
(changes images, never flips them), recipe errors, the withheld labels of the pool, a real run and an exact
resume after a kill mid-epoch."""

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import medtricks.run
from medtricks.data import build_datasets
from medtricks.data.transforms import PRESETS, MultiView, build_transforms
from medtricks.errors import ConfigError
from medtricks.recipe import RecipeError, load_recipe
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.train.engine import seed_epoch
from medtricks.tricks.base import TrickContext
from medtricks.tricks.fixmatch import FixMatch, FixMatchConfig, fixmatch_loss
from medtricks.tricks.pseudo_label import PseudoLabelConfig

ROOT = Path(__file__).resolve().parents[2]


SIZE = 8
K = 10.0  # _ByValue's slope: confidence sigmoid(2K|c - 0.5|) >= 0.95  <=>  |c - 0.5| >= ln(19) / 2K = 0.147


def _xray(preset, size=SIZE):
    return build_transforms(preset, size, mean=(0.0,), std=(1.0,), in_chans=1, train=True)


class _ArrayPool(Dataset):
    """A stand-in for the run's XrayDataset pool: float (H, W) images through ``transform``, target -1, a manifest
    with the withheld labels, and ``with_transform`` (what the trick re-makes it with)."""

    def __init__(self, images, transform, withheld=None):
        self.images, self.transform = images, transform
        self.manifest = pd.DataFrame(
            {"withheld_target": list(withheld) if withheld is not None else [-1] * len(images)}
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), -1

    def with_transform(self, transform):
        return _ArrayPool(self.images, transform, self.manifest["withheld_target"])


def _values(n=24):
    return np.linspace(0.0, 1.0, n, dtype=np.float32)  # image i is constant values[i]; none is exactly 0.5


def _pool(n=24, weak="none", withheld=None):
    images = [np.full((SIZE, SIZE), v, np.float32) for v in _values(n)]
    return _ArrayPool(images, _xray(weak), withheld)


class _ByValue(nn.Module):
    """logits K·(c - 0.5) · (1, -1) for an image of mean c: a model whose confidence on the weak view is known
    (class 1 below 0.5). Records every forward: input, train mode, grad mode, output."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(K))
        self.calls = []

    def forward(self, x):
        c = x.mean(dim=(1, 2, 3)) - 0.5
        out = torch.stack([self.k * c, -self.k * c], dim=1)
        self.calls.append(
            SimpleNamespace(x=x.detach().clone(), training=self.training, grad=torch.is_grad_enabled(), out=out)
        )
        return out


def _trick(pool=None, batch_size=4, pseudo_label=False, **cfg):
    config = FixMatchConfig(enabled=True, **cfg)
    tricks = SimpleNamespace(fixmatch=config, pseudo_label=PseudoLabelConfig(enabled=pseudo_label))
    recipe = SimpleNamespace(
        tricks=tricks, train=SimpleNamespace(batch_size=batch_size), data=SimpleNamespace(num_workers=0)
    )
    ctx = TrickContext(
        recipe=recipe,
        classes=["a", "b"],
        device=torch.device("cpu"),
        mean=(0.0,),
        std=(1.0,),
        extras={"unlabeled": _pool() if pool is None else pool},
    )
    return FixMatch(recipe, ctx)


def test_the_loss_is_the_masked_cross_entropy_over_the_whole_unlabelled_batch():
    weak = torch.tensor(
        [
            [3.0, 0.0],  # p = 0.9526: passes 0.95, label 0
            [2.9, 0.0],  # p = 0.9478: masked
            [0.0, 4.0],  # p = 0.982: passes, label 1
            [0.1, 0.0],
        ]
    )  # p = 0.525: masked
    strong = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    loss, labels, mask = fixmatch_loss(weak, strong, 0.95)
    assert mask.tolist() == [True, False, True, False] and labels.tolist() == [0, 0, 1, 0]
    by_hand = (F.cross_entropy(strong[0:1], torch.tensor([0])) + F.cross_entropy(strong[2:3], torch.tensor([1]))) / 4
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)  # / 4 (mu·B), not / 2 (the images kept)
    loss.backward()
    assert strong.grad[[1, 3]].abs().sum() == 0 and strong.grad[[0, 2]].abs().sum() > 0  # masked: no gradient
    assert fixmatch_loss(weak, strong, 1.0)[0].item() == 0.0


def test_the_weak_view_labels_without_gradient_and_the_strong_view_trains_on_mu_b_images():
    trick = _trick(mu=3, batch_size=4, threshold=0.95, lambda_u=2.0)  # 12 unlabelled images per step
    model = _ByValue().train()
    seed_epoch(0, 0)
    loss = trick.extra_loss(model, torch.zeros(4, 1, SIZE, SIZE), None, None)
    weak, strong = model.calls  # one forward per view, the weak first
    assert weak.x.shape == strong.x.shape == (12, 1, SIZE, SIZE)
    assert weak.training and strong.training and model.training  # train mode, as the paper
    assert not weak.grad and not weak.out.requires_grad  # the label: no gradient
    assert strong.grad and strong.out.requires_grad  # the strong view trains
    c = weak.x.mean(dim=(1, 2, 3))  # the weak view ("none") is the constant image itself
    assert all(torch.isclose(v, torch.from_numpy(_values())).any() for v in c)
    mask = torch.sigmoid(2 * K * (c - 0.5).abs()) >= 0.95
    assert 0 < int(mask.sum()) < 12  # the draw has images on both sides of the threshold
    labels = (c < 0.5).long()
    expected = 2.0 * (F.cross_entropy(strong.out.detach(), labels, reduction="none") * mask).sum() / 12
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.allclose(weak.x, strong.x)  # the strong view is another view
    loss.backward()
    assert model.k.grad is not None and model.k.grad != 0
    metrics = {}
    trick.on_epoch_end(0, metrics)
    assert metrics["train/fixmatch_mask_rate"] == pytest.approx(int(mask.sum()) / 12)


def test_both_views_are_of_the_same_image():
    trick = _trick(strong="none", threshold=0.5)  # strong = weak = the eval transform: the views must agree
    seed_epoch(1, 0)
    weak, strong, index = trick.stream.next("cpu")
    assert torch.equal(weak, strong) and len(set(index.tolist())) == len(index)
    assert torch.allclose(weak.mean(dim=(1, 2, 3)), torch.from_numpy(_values())[index])


def test_nothing_passes_no_backward_but_the_strong_view_still_goes_through():
    trick = _trick(threshold=1.0)  # sigmoid never reaches 1 here
    model = _ByValue().train()
    seed_epoch(0, 0)
    assert trick.extra_loss(model, torch.zeros(4, 1, SIZE, SIZE), None, None) is None
    assert [call.grad for call in model.calls] == [False, False]  # weak and strong, no graph built


def test_the_pool_is_capped_and_a_pool_of_one_is_refused():
    trick = _trick(pool=_pool(n=10), mu=7, batch_size=4)
    assert trick.batch_size == 10 and trick.log_params()["fixmatch.unlabeled_batch"] == 10
    with pytest.raises(ConfigError, match="at least 2"):
        _trick(pool=_pool(n=1))


def test_the_unlabelled_stream_does_not_depend_on_lambda_u_nor_moves_the_runs_random_numbers():
    def draws(trick, epoch, seed=7):
        seed_epoch(seed, epoch)
        out = [trick.stream.next("cpu") for _ in range(3)]  # 3 x 4 of 24 images
        trick.on_epoch_end(epoch, {})
        return out

    on, off = _trick(lambda_u=1.0), _trick(lambda_u=0.0)
    for epoch in (0, 1):
        for (w1, s1, i1), (w0, s0, i0) in zip(draws(on, epoch), draws(off, epoch)):
            assert torch.equal(i1, i0) and torch.equal(w1, w0) and torch.equal(s1, s0)
    first, again = draws(_trick(), 0), draws(_trick(), 1)
    assert not torch.equal(first[0][2], again[0][2])  # another epoch, another order
    resumed = draws(_trick(), 1)  # a fresh trick (a resumed run) at epoch 1 draws epoch 1's batches
    assert all(torch.equal(a[1], b[1]) for a, b in zip(again, resumed))
    # lambda_u 0: the batch is drawn, nothing goes through the model, no random number of the run moves
    seed_epoch(3, 0)
    model = _ByValue()
    state, torch_state = random.getstate(), torch.get_rng_state()
    assert off.extra_loss(model, torch.zeros(4, 1, SIZE, SIZE), None, None) is None
    assert model.calls == [] and random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    on.extra_loss(model, torch.zeros(4, 1, SIZE, SIZE), None, None)  # the strong augmentation draws its own numbers
    assert random.getstate() == state


def test_pseudo_label_accuracy_uses_the_withheld_labels_only_where_known():
    values = _values()
    truth = (values < 0.5).astype(int)  # what _ByValue predicts
    truth[-1] = 1  # one wrong pseudo-label: c = 1.0 is labelled 0 with confidence
    withheld = np.where(np.arange(len(values)) % 4 == 0, -1, truth)  # every 4th label unknown (a folder image)
    trick = _trick(pool=_pool(withheld=withheld), mu=6, batch_size=4, threshold=0.95)  # the whole pool (24)
    model = _ByValue().train()
    seed_epoch(0, 0)
    trick.extra_loss(model, torch.zeros(4, 1, SIZE, SIZE), None, None)
    metrics = {}
    trick.on_epoch_end(0, metrics)
    c = torch.from_numpy(values)
    passed = torch.sigmoid(2 * K * (c - 0.5).abs()) >= 0.95
    known = torch.from_numpy(withheld) >= 0
    right = ((c < 0.5).long() == torch.from_numpy(withheld)) & known
    assert metrics["train/fixmatch_mask_rate"] == pytest.approx(float(passed.float().mean()))
    assert metrics["train/fixmatch_label_acc_all"] == pytest.approx(int(right.sum()) / int(known.sum()))
    passed_known = int((known & passed).sum())
    assert metrics["train/fixmatch_label_acc"] == pytest.approx(int((right & passed).sum()) / passed_known)
    assert metrics["train/fixmatch_label_acc"] < 1.0  # the wrong confident label counts
    assert trick.log_params()["fixmatch.n_withheld_labels"] == int(known.sum())
    no_labels = _trick()
    no_labels.extra_loss(model, torch.zeros(4, 1, SIZE, SIZE), None, None)
    metrics = {}
    no_labels.on_epoch_end(0, metrics)
    assert "train/fixmatch_label_acc_all" not in metrics and "train/fixmatch_mask_rate" in metrics


# ---- the strong preset
def _lateral():
    """A chest-like asymmetry: brighter on the image's left (a ramp) with a blob on the left (the heart side)."""
    image = np.tile(np.linspace(0.9, 0.1, 64, dtype=np.float32), (64, 1))
    image[20:40, 8:24] = 1.0
    return image


def _left_minus_right(out):
    half = out.shape[-1] // 2
    return float(out[0, :, :half].mean() - out[0, :, half:].mean())


def test_cxr_strong_changes_images_but_never_flips_them():
    assert "cxr_strong" in PRESETS
    strong, plain = (
        _xray("cxr_strong", 32),
        build_transforms("cxr_strong", 32, mean=(0.0,), std=(1.0,), in_chans=1, train=False),
    )
    names = []

    def walk(transforms):
        for t in transforms:
            names.append(type(t).__name__)
            walk(getattr(t, "transforms", []))

    walk(strong.pipeline.transforms)
    assert not [n for n in names if "Flip" in n or n in ("Transpose", "D4", "RandomRotate90")]
    image, clean = _lateral(), plain(_lateral())
    random.seed(0)
    outs = [strong(image) for _ in range(200)]
    assert all(_left_minus_right(o) > 0.05 for o in outs)  # the bright side stays on the left, every time
    assert all(not torch.allclose(o, clean, atol=1e-3) for o in outs)  # every view is changed ...
    assert len({round(float(o.sum()), 3) for o in outs}) > 190  # ... and differently
    random.seed(0)
    assert all(torch.equal(a, strong(image)) for a in outs[:5])  # seeded like every preset
    # the check would see a flip: paper_baseline flips half of the images
    flipping = _xray("paper_baseline", 32)
    assert sum(_left_minus_right(flipping(image)) < 0 for _ in range(50)) > 10


def test_multiview_gives_each_transform_the_same_image():
    seen = []
    views = MultiView(lambda x: seen.append(x) or 1, lambda x: seen.append(x) or 2)
    image = np.zeros((4, 4), np.float32)
    assert views(image) == (1, 2) and seen[0] is seen[1] is image
    with pytest.raises(ConfigError):
        MultiView()


# ---- recipe and run
@pytest.mark.parametrize(
    "override, key",
    [
        ("tricks.fixmatch.threshold=0", "tricks.fixmatch.threshold"),
        ("tricks.fixmatch.threshold=1.01", "tricks.fixmatch.threshold"),
        ("tricks.fixmatch.mu=0", "tricks.fixmatch.mu"),
        ("tricks.fixmatch.strong=cxr_flip", "tricks.fixmatch.strong"),
        ("tricks.fixmatch.lambda_u=-1", "tricks.fixmatch.lambda_u"),
    ],
)
def test_bad_settings_are_recipe_errors_naming_the_key(override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=["tricks.fixmatch.enabled=true", override])


def test_the_recipe_keys_tag_and_shipped_recipe():
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", overrides=["tricks.fixmatch.enabled=true", "tricks.fixmatch.threshold=1"]
    )
    assert "fixmatch@1" in recipe.tricks_on()
    shipped = load_recipe(ROOT / "recipes" / "kermany_fixmatch.yaml")
    fm = shipped.tricks.fixmatch
    assert fm.enabled and (fm.threshold, fm.mu, fm.lambda_u, fm.strong) == (0.95, 7, 1.0, "cxr_strong")
    assert shipped.data.label_fraction == 0.1 and not shipped.tricks.pseudo_label.enabled


def test_no_pool_and_pseudo_label_together_are_refused_naming_the_keys():
    with pytest.raises(ConfigError, match="data.label_fraction.*data.unlabeled"):
        _trick(pool=_ArrayPool([], _xray("none")))
    with pytest.raises(ConfigError, match="tricks.fixmatch.*tricks.pseudo_label"):
        _trick(pseudo_label=True)
    with pytest.raises(ConfigError, match="second view"):  # a pool of tensors cannot give a strong view
        _trick(pool=TensorDataset(torch.zeros(4, 1, SIZE, SIZE), torch.full((4,), -1)))


def test_the_pool_keeps_the_withheld_labels_for_monitoring_only(tmp_path):
    kw = dict(image_size=32, mean=(0.5,), std=(0.25,), in_chans=1, progress=False)
    bundle = build_datasets("synthetic-phantoms", tmp_path, synth={"n": 40, "size": 32}, label_fraction=0.5, **kw)
    pool = bundle.unlabeled
    assert set(pool.targets) == {-1}  # never a training target
    truth = bundle.manifest.set_index("path")["target"]
    assert pool.manifest["withheld_target"].tolist() == [int(truth[p]) for p in pool.manifest["path"]]


FM = [
    "data.label_fraction=0.6",
    "tricks.fixmatch.enabled=true",
    "tricks.fixmatch.mu=1",
    "tricks.fixmatch.threshold=0.6",
]


def test_a_run_with_fixmatch_logs_the_mask_rate_and_the_label_accuracy(tiny_recipe, tmp_path):
    result = run_recipe(tiny_recipe(tmp_path, *FM), quiet=True)
    for h in result.history:
        assert 0.0 <= h["train/fixmatch_mask_rate"] <= 1.0 and 0.0 <= h["train/fixmatch_label_acc_all"] <= 1.0


def test_a_fixmatch_run_killed_mid_epoch_resumes_to_the_same_weights(tiny_recipe, kill_run, tmp_path, monkeypatch):
    # 48 phantoms: 41 training images, 60 % labelled (27: 2 updates per epoch at batch 16), 14 in the pool
    full = run_recipe(tiny_recipe(tmp_path, *FM, "experiment.name=full"), quiet=True)
    recipe = tiny_recipe(tmp_path, *FM, "experiment.name=killed")
    real_fit = kill_run(monkeypatch, at_step=3)  # step 3: the first update of epoch 2
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    killed = find_resumable_run_dir(recipe)
    state = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 2)  # died after step 3: mid epoch 2, replayed from its seed
    resumed = run_recipe(recipe, resume="auto", quiet=True)
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1]["train/fixmatch_mask_rate"] == full.history[-1]["train/fixmatch_mask_rate"]


def test_fixmatch_at_lambda_u_0_trains_exactly_as_without_it(tiny_recipe, tmp_path):
    plain = run_recipe(tiny_recipe(tmp_path, "data.label_fraction=0.6", "experiment.name=plain"), quiet=True)
    zero = run_recipe(tiny_recipe(tmp_path, *FM, "tricks.fixmatch.lambda_u=0", "experiment.name=zero"), quiet=True)
    a = torch.load(plain.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(zero.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # common random numbers: the stream moves nothing else


def test_the_label_efficiency_benchmark_runs_fixmatch_from_its_recipe_below_100_percent(tmp_path, monkeypatch):
    import benchmarks.label_efficiency as bench

    trained = []
    monkeypatch.setattr(bench, "_train", lambda recipe: (trained.append(recipe), (str(tmp_path / "run"), 1.0))[1])
    monkeypatch.setattr(bench, "test_metrics", lambda run_dir, positive: {m: 0.5 for m in bench.METRICS})
    args = SimpleNamespace(quick=False, data_root=None, cache_dir=None)
    rows = bench.run_seed(0, {0.1: 4, 1.0: 1}, ["fixmatch"], args, tmp_path, tmp_path / "tmp", "PNEUMONIA")
    assert [(r["fraction"], r["variant"]) for r in rows] == [(0.1, "fixmatch")]
    fixmatch = trained[-1]  # the 100 % tricks run first (every seed trains it: the distill teacher)
    assert fixmatch.tricks.fixmatch.enabled and fixmatch.data.label_fraction == 0.1 and fixmatch.train.epochs == 4
    assert "fixmatch" not in bench.DEFAULT_VARIANTS and "fixmatch" in bench.VARIANTS
