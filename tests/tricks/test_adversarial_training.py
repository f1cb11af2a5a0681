"""Issue 19: adversarial training as a trick (PGD-AT, FGSM-RS, TRADES) -- budget, box, untouched
optimizer/BN state, TRADES' loss by hand, robustness gained on a toy task, recipe and ablate."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtricks.audit.adversarial import normalized_model, pgd
from medtricks.errors import ConfigError
from medtricks.recipe import RecipeError
from medtricks.run import run_recipe
from medtricks.tricks.adversarial import AdversarialConfig, AdversarialTraining, trades_attack
from medtricks.tricks.base import TrickContext


MEAN, STD = (0.5,), (0.25,)


def _conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def _trick(method, **kw):
    cfg = AdversarialConfig(method=method, **kw)
    recipe = SimpleNamespace(tricks=SimpleNamespace(adversarial=cfg, mixup_alpha=0.0, cutmix_alpha=0.0))
    return AdversarialTraining(
        recipe, TrickContext(recipe=recipe, classes=["a", "b"], device=torch.device("cpu"), mean=MEAN, std=STD)
    )


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("method,kw", [("fgsm_rs", {}), ("pgd", {"steps": 3}), ("pgd", {"steps": 2, "ratio": 0.5})])
def test_the_attack_in_training_respects_the_budget_and_the_box_and_touches_no_state(method, kw):
    model = _conv_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trick = _trick(method, eps=4 / 255, **kw)
    trick.on_fit_start(model)
    model.train()
    torch.manual_seed(0)
    pixels = torch.rand(8, 1, 12, 12)
    pixels[:2] = 0.0  # images at the box's edges: the attack must not leave [0, 1]
    pixels[2:4] = 1.0
    images = (pixels - 0.5) / 0.25
    targets = torch.randint(0, 2, (8,))
    before = _stats(model)
    adv, same_targets = trick.transform_batch(images, targets)
    adv01 = adv * 0.25 + 0.5
    assert torch.equal(same_targets, targets)
    assert adv01.min() >= -1e-6 and adv01.max() <= 1 + 1e-6
    assert (adv01 - pixels).abs().max() <= 4 / 255 + 1e-6
    n_adv = round(kw.get("ratio", 1.0) * 8)
    assert (adv01[:n_adv] - pixels[:n_adv]).abs().max() > 1 / 255  # it did perturb
    assert torch.equal(adv[n_adv:], images[n_adv:])  # the clean share is untouched
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient written
    assert optimizer.state_dict()["state"] == {}  # the optimizer never stepped
    for key, value in _stats(model).items():
        assert torch.equal(value, before[key]), key  # BN running stats restored
    assert model.training


def test_trades_attack_in_eval_mode_and_its_loss_by_hand():
    model = _conv_model(1)
    trick = _trick("trades", eps=2 / 255, steps=3, beta=6.0)
    trick.on_fit_start(model)
    model.train()
    modes = []
    model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    torch.manual_seed(1)
    pixels = torch.rand(6, 1, 10, 10)
    images, targets = (pixels - 0.5) / 0.25, torch.tensor([0, 1, 0, 1, 0, 1])
    before = _stats(model)
    out, _ = trick.transform_batch(images, targets)
    assert torch.equal(out, images)  # TRADES trains on the clean batch (+ a KL term)
    assert modes and not any(modes)  # clean probabilities and the attack: eval mode, as the reference code
    x_adv = trick._x_adv.clone()
    assert (x_adv - pixels).abs().max() <= 2 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    for key, value in _stats(model).items():
        assert torch.equal(value, before[key]), key
    logits = model(images)
    extra = trick.extra_loss(model, images, targets, logits)
    by_hand = (
        6.0
        * (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(model((x_adv - 0.5) / 0.25), 1)))
        .sum(1)
        .mean()
    )
    assert extra.item() == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-7)
    assert trick.extra_loss(model, images, targets, logits) is None  # one KL term per attacked batch


def test_trades_attack_maximises_the_divergence():
    model = _conv_model(2).eval()
    torch.manual_seed(2)
    pixels = torch.rand(16, 1, 10, 10)
    norm = lambda x: (x - 0.5) / 0.25  # noqa: E731
    mean, std = torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1)
    with torch.no_grad():
        clean = F.softmax(model(norm(pixels)), 1)
    x_adv = trades_attack(model, pixels, clean, eps=8 / 255, alpha=2 / 255, steps=5, mean=mean, std=std)
    noise = (pixels + (torch.rand_like(pixels) * 2 - 1) * 8 / 255).clamp(0, 1)

    def kl(x):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(norm(x)), 1), clean, reduction="sum").item()

    assert kl(x_adv) > kl(noise)


def _toy(n, seed):
    """Tsipras et al.'s toy: pixel 0 carries the label robustly (margin 0.4, right 90% of the time); the other
    63 pixels each carry it weakly (0.05) -- together very predictive, but an ε of 0.1 flips them all."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float()
    x = 0.5 + 0.05 * sign[:, None] + 0.1 * torch.randn(n, 64, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    x[:, 0] = 0.5 + 0.4 * torch.where(flip, -sign, sign)
    return x.clamp(0, 1).view(n, 1, 8, 8), y


def _train_toy(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    trick = _trick(method, eps=0.1) if method != "none" else None
    if trick:
        trick.on_fit_start(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _toy(512, 0)
    images = (x - 0.5) / 0.25
    for step in range(150):
        batch = torch.arange(step * 64, step * 64 + 64) % 512
        xb, yb = images[batch], y[batch]
        if trick:
            xb, yb = trick.transform_batch(xb, yb)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_fgsm_rs_buys_robust_accuracy_on_a_toy_separable_task():
    x, y = _toy(400, 1)
    robust = {}
    clean = {}
    for method in ("none", "fgsm_rs"):
        model01 = normalized_model(_train_toy(method), MEAN, STD).eval()
        x_adv = pgd(model01, x, y, eps=0.1, steps=20, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust[method] = (model01(x_adv).argmax(1) == y).float().mean().item()
            clean[method] = (model01(x).argmax(1) == y).float().mean().item()
    assert clean["none"] > 0.95  # standard training uses the weak, non-robust pixels: clean-accurate...
    assert robust["none"] < 0.3  # ...and fragile
    assert robust["fgsm_rs"] > 0.8 > robust["none"] + 0.5  # FGSM-RS learns the robust pixel


def test_bad_adversarial_settings_are_refused_with_the_key():
    with pytest.raises(ValueError, match="fgsm_rs takes exactly one step"):
        AdversarialConfig(method="fgsm_rs", steps=3)
    with pytest.raises(ValueError, match="TRADES attacks every image"):
        AdversarialConfig(method="trades", ratio=0.5)
    with pytest.raises(ValueError):
        AdversarialConfig(method="pgd", eps=2.0)  # eps is a pixel intensity in [0, 1]
    recipe = SimpleNamespace(
        tricks=SimpleNamespace(adversarial=AdversarialConfig(method="trades"), mixup_alpha=0.2, cutmix_alpha=0.0)
    )
    with pytest.raises(ConfigError, match="'trades' cannot be combined with tricks.mixup_alpha"):
        AdversarialTraining(recipe, TrickContext(recipe=recipe, classes=["a", "b"], mean=MEAN, std=STD))


def test_a_recipe_trains_with_fgsm_rs_tags_it_and_resumes_exactly(
    tiny_recipe, killed_then_resumed, tmp_path, monkeypatch
):
    extra = ["tricks.adversarial.method=fgsm_rs", "tricks.adversarial.eps=0.0078431"]
    full = run_recipe(tiny_recipe(tmp_path, *extra), quiet=True)
    assert "adversarial=fgsm_rs@2/255" in full.tracker.tags["tricks"]
    assert full.tracker.params["adversarial.resolved_alpha"] == "2.5/255"
    resumed = killed_then_resumed(
        monkeypatch, tiny_recipe(tmp_path, *extra, f"experiment.output_dir={tmp_path / 'r2'}")
    )
    assert [h["train/epoch_loss"] for h in resumed.history] == pytest.approx(
        [h["train/epoch_loss"] for h in full.history], abs=1e-6
    )


def test_trades_with_mixup_is_a_recipe_error(tiny_recipe, tmp_path):
    with pytest.raises((ConfigError, RecipeError), match="trades"):
        run_recipe(tiny_recipe(tmp_path, "tricks.adversarial.method=trades", "tricks.mixup_alpha=0.2"), quiet=True)


def test_ablate_accepts_adversarial_fgsm_rs():
    from medtricks.ablation.variants import trick_overrides

    assert trick_overrides("adversarial=fgsm_rs") == ["tricks.adversarial.method=fgsm_rs"]
    with pytest.raises(Exception, match="adversarial"):
        trick_overrides("adversarial")  # no default method: the user names one
