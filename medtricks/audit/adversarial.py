"""Adversarial attacks on images in ``[0, 1]`` pixel space.

Every attack takes ``model01`` — a model that maps images in ``[0, 1]`` to logits, i.e. the trained
network with its input normalization moved inside (:func:`normalized_model`) — so that ``eps`` is a
pixel intensity: ``4/255`` means "at most 4 grey levels of an 8-bit image". Returned images are
clamped to ``[0, 1]`` and checked against the budget (:func:`check_perturbation`).

Which code runs what, and why:

* FGSM, PGD-L∞, PGD-L2 and the transfer attack are plain torch (a few lines each): batched on the
  model's device, no numpy round trips, so PGD-k costs about k forward+backward passes
  (``benchmarks/audit_cost.py``), and the best iterate is kept.
* APGD-CE, APGD-DLR and Square come from IBM's Adversarial Robustness Toolbox (ART), a maintained
  implementation of Croce & Hein (ICML 2020) and Andriushchenko et al. (ECCV 2020).
  ``torchattacks`` is not used: it pins ``requests~=2.25`` and its AutoAttack indexes the 3rd/4th
  largest logit, which crashes on 2-class models.
* ``apgd_square`` is a *reduced* AutoAttack (Croce & Hein, ICML 2020) over ART's attacks: APGD-CE,
  APGD-DLR (only with >= 3 classes: its loss needs the 3rd largest logit), then Square, each on the
  images no earlier attack broke; robust accuracy is the per-image worst case over them (the
  AutoAttack rule). It is *not* the standard AutoAttack and is not called so: it leaves out APGD-T
  and FAB-T (ART has no FAB; the reference ``autoattack`` package is not on PyPI; the targeted DLR
  loss needs >= 4 classes, so the standard suite is undefined for a binary model), and Square runs
  ``square_queries`` queries (1,000 by default to keep a CPU audit feasible; the standard is 5,000).
  ART's own ``AutoAttack`` class is not used because it adds DeepFool/DLR unconditionally and cannot
  target a single chosen class. The old name ``autoattack`` is refused with this explanation.

Example:
    >>> model01 = normalized_model(model, mean=(0.5,), std=(0.25,)).eval()
    >>> x_adv = pgd(model01, images01, labels, eps=2 / 255, norm="linf", steps=10)
    >>> check_perturbation(x_adv, images01, 2 / 255, "linf")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from medtricks.audit.attack_names import ATTACKS, RENAMED_ATTACKS
from medtricks.errors import ConfigError

__all__ = [
    "ATTACKS",
    "APGD_STEPS",
    "SQUARE_QUERIES",
    "PerturbationBudgetError",
    "normalized_model",
    "attack_norm",
    "l2_radius",
    "check_perturbation",
    "fgsm",
    "pgd",
    "apgd",
    "square",
    "apgd_square",
    "RENAMED_ATTACKS",
]

#: APGD iterations, as in AutoAttack's "standard" version (Croce & Hein 2020).
APGD_STEPS = 100
#: Default Square query budget (AutoAttack "standard" uses 5000; 1000 keeps a CPU audit feasible);
#: ``audit.square_queries`` / ``run_audit(square_queries=)`` change it.
SQUARE_QUERIES = 1000
# float32 rounding of x0 + delta can exceed the budget by ~1 ulp; this much is tolerated.
BUDGET_ATOL = 1e-6


# Deliberately not a medtricks.errors.MedtricksError: it signals a bug in an attack, not input a
# user can fix, so the CLI must show its traceback.
class PerturbationBudgetError(AssertionError):
    """An attack returned an image outside ``[0, 1]`` or farther than ``eps`` from the original."""


# --------------------------------------------------------------------------------------------
# model wrapper and budget checks
# --------------------------------------------------------------------------------------------
def normalized_model(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``Normalize(mean, std) -> model``: a model that takes images in ``[0, 1]``.

    The wrapper shares ``model``'s parameters (nothing is copied), so attacks on it are attacks on
    ``model`` with ``eps`` in pixel units.

    >>> model01 = normalized_model(model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    """
    from torchvision.transforms import Normalize

    mean_t, std_t = _check_mean_std(mean, std)
    return nn.Sequential(Normalize(mean_t, std_t), model)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    try:
        mean_l = [float(v) for v in mean]
        std_l = [float(v) for v in std]
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"mean and std must be sequences of numbers (one per channel), got mean={mean!r} std={std!r}"
        ) from err
    if len(mean_l) == 0 or len(mean_l) != len(std_l):
        raise ConfigError(
            f"mean and std must have the same non-zero length (one value per channel), got mean={mean_l} std={std_l}"
        )
    bad = [s for s in std_l if not (math.isfinite(s) and s > 0)]
    if bad or not all(math.isfinite(m) for m in mean_l):
        raise ConfigError(f"std must be finite and > 0 and mean finite, got mean={mean_l} std={std_l}")
    return mean_l, std_l


def attack_norm(attack: str) -> str:
    """The threat model of an attack name: ``"l2"`` for ``pgd_l2``, else ``"linf"``."""
    return "l2" if attack == "pgd_l2" else "linf"


def l2_radius(eps: float, image_shape: Sequence[int]) -> float:
    """L2 radius used for a per-pixel ``eps``: ``eps * sqrt(C*H*W)``.

    ``pgd_l2`` reads ``eps`` as the root-mean-square change per pixel so that one ε grid (in grey
    levels) serves both threat models; the L∞ ball of radius ``eps`` lies inside this L2 ball.
    """
    return float(eps) * math.sqrt(float(np.prod(image_shape)))


def check_perturbation(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf", *, atol: float = BUDGET_ATOL
) -> torch.Tensor:
    """Raise :class:`PerturbationBudgetError` unless every image is in ``[0, 1]`` and within budget.

    ``norm`` is ``"linf"`` (``max |x_adv - x| <= eps``) or ``"l2"`` (``||x_adv - x||_2 <= eps``;
    pass the radius, e.g. :func:`l2_radius`). Returns the per-image norms (float64).
    """
    if x_adv.shape != x.shape:
        raise PerturbationBudgetError(f"adversarial batch has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise PerturbationBudgetError(f"adversarial images leave [0, 1]: min {lo:.6g}, max {hi:.6g}")
    delta = (x_adv.double() - x.double()).flatten(1)
    norms = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    worst = float(norms.max()) if norms.numel() else 0.0
    if worst > eps + atol:
        raise PerturbationBudgetError(
            f"perturbation {norm} norm {worst:.8g} exceeds eps {eps:.8g} (+{atol:g}) for image {int(norms.argmax())}"
        )
    return norms


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (attacks need input gradients only); restored after."""
    # every submodule's own flag: a wrapper's .train() must not flip the wrapped model back
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _ce_objective(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    # Ascend this: untargeted raises the loss of the true class, targeted lowers the target's.
    loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
    return -loss if targeted else loss


def _is_success(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    # (1 - 1e-6): float32 round-off must not push ||delta|| a hair over the radius
    factor = torch.clamp(eps * (1 - 1e-6) / norms, max=1.0)
    return delta * _per_image(factor, delta)


def _check_attack_args(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf") -> None:
    if x.dim() != 4:
        raise ConfigError(f"images must be a (N, C, H, W) batch in [0, 1], got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ConfigError(f"labels must have shape ({x.shape[0]},) (one class index per image), got {tuple(y.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps must be a finite number >= 0 (pixel intensity in [0, 1]), got {eps!r}")
    if norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}")


# --------------------------------------------------------------------------------------------
# plain-torch attacks
# --------------------------------------------------------------------------------------------
def fgsm(model01: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, targeted: bool = False) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L∞ step of size ``eps``.

    ``y`` holds the true labels (untargeted) or the target labels (``targeted=True``).
    Returns the adversarial images, clamped to ``[0, 1]``.
    """
    _check_attack_args(x, y, eps)
    if eps == 0:
        return x.clone()
    with _frozen(model01), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_ce_objective(model01(x_in), y, targeted), x_in)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    model01: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 10,
    step_size: Optional[float] = None,
    random_start: bool = True,
    targeted: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) under an L∞ or L2 budget ``eps``.

    Starts at a random point of the ball (``random_start``), takes ``steps`` steps of ``step_size``
    (default ``2.5 * eps / steps``, Madry's choice) — the gradient sign for L∞, the L2-normalized
    gradient for L2 — then projects onto the ball and clamps to ``[0, 1]``. Per image the latest
    iterate that fooled the model is kept, else the last one. For ``norm="l2"``, ``eps`` is the L2
    radius itself (see :func:`l2_radius` for the per-pixel reading used by the audit).

    >>> x_adv = pgd(model01, x, y, eps=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    """
    return _pgd(
        model01,
        x,
        y,
        eps,
        norm=norm,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        targeted=targeted,
        generator=generator,
    )[0]


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    # uniform in the L2 ball: gaussian direction, radius eps * u^(1/d)
    d = x[0].numel()
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _per_image(direction.flatten(1).norm(dim=1).clamp_min(1e-12), x)
    radius = eps * torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
    return _project(direction * _per_image(radius, x), eps, norm)


def _pgd(
    model01: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    steps: int,
    step_size: Optional[float],
    random_start: bool,
    targeted: bool,
    generator: Optional[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD returning ``(x_adv, logits(x_adv))``: the final logits come free from the best-iterate bookkeeping."""
    _check_attack_args(x, y, eps, norm)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach()
    with _frozen(model01):
        if eps == 0:
            with torch.no_grad():
                return x.clone(), model01(x).float()
        delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
        x_adv = (x + delta).clamp(0.0, 1.0)
        best_x, best_logits, fooled = x_adv.clone(), None, None
        with torch.enable_grad():
            for i in range(steps + 1):
                last = i == steps  # the last pass only scores the final iterate
                if last:
                    with torch.no_grad():
                        logits = model01(x_adv)
                else:
                    x_in = x_adv.clone().requires_grad_(True)
                    logits = model01(x_in)
                scores = logits.detach().float()
                ok = _is_success(scores, y, targeted)
                if best_logits is None:
                    best_logits, fooled = scores.clone(), ok.clone()
                # keep this iterate where it fools the model, or where nothing has fooled it yet
                take = ok | ~fooled
                best_x[take], best_logits[take] = x_adv[take], scores[take]
                fooled |= ok
                if last:
                    break
                (grad,) = torch.autograd.grad(_ce_objective(logits, y, targeted), x_in)
                if norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / _per_image(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
                delta = _project(x_adv + alpha * step - x, eps, norm)
                x_adv = (x + delta).clamp(0.0, 1.0).detach()
    return best_x, best_logits


# --------------------------------------------------------------------------------------------
# ART-based attacks (APGD, Square) and the AutoAttack-style ensemble
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """ART draws from numpy's global RNG: seed it for the call, then put the caller's state back."""
    state = np.random.get_state()
    np.random.seed(int(seed) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def _n_classes(model01: nn.Module, x: torch.Tensor, n_classes: Optional[int]) -> int:
    if n_classes is not None:
        return int(n_classes)
    with torch.no_grad():
        logits = model01(x[:1])
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ConfigError(f"the model must return (N, K) logits with K >= 2 classes, got shape {tuple(logits.shape)}")
    return int(logits.shape[1])


def _art_classifier(model01: nn.Module, x: torch.Tensor, n_classes: int):
    # ART (adversarial-robustness-toolbox) takes ~4 s to import: only the ART-backed attacks
    # (apgd, square, autoattack) load it, here and below.
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model01,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.device.type == "cuda" else "cpu",
    )


def _run_art(
    model01: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, build: Callable[[object], object]
) -> torch.Tensor:
    """Run an ART attack built by ``build(estimator)`` on a torch batch; back to a torch batch."""
    # ART's "gpu" means the *current* CUDA device: make that the batch's device.
    where = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with _frozen(model01), where, _numpy_seed(seed):
        attack = build(_art_classifier(model01, x, _n_classes(model01, x, None)))
        x_np = x.detach().cpu().numpy().astype(np.float32)
        x_adv = attack.generate(x_np, y.detach().cpu().numpy().astype(np.int64))
    return torch.from_numpy(np.asarray(x_adv, dtype=np.float32)).to(device=x.device, dtype=x.dtype).clamp(0.0, 1.0)


def apgd(
    model01: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    loss: str = "ce",
    steps: int = APGD_STEPS,
    restarts: int = 1,
    targeted: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Auto-PGD under L∞ (Croce & Hein 2020) via ART: step size adapted per image, no tuning.

    ``loss="ce"`` (cross-entropy) works for any number of classes; ``loss="dlr"`` (difference of
    logits ratio) needs >= 3 classes and is untargeted only. Initial step ``2 * eps`` as in
    AutoAttack. Images the model already gets wrong are left unchanged.
    """
    _check_attack_args(x, y, eps)
    if loss not in ("ce", "dlr"):
        raise ConfigError(f"loss must be 'ce' or 'dlr', got {loss!r}")
    if eps == 0:
        return x.clone()
    if loss == "dlr":
        k = _n_classes(model01, x, None)
        if k < 3:
            raise ConfigError(
                f"APGD-DLR needs >= 3 classes (its loss uses the 3rd largest logit), the model has {k}; use loss='ce'"
            )
        if targeted:
            raise ConfigError("APGD-DLR is untargeted here; use loss='ce' for a targeted APGD")

    def build(estimator):
        from art.attacks.evasion import AutoProjectedGradientDescent

        return AutoProjectedGradientDescent(
            estimator,
            norm=np.inf,
            eps=float(eps),
            eps_step=2.0 * float(eps),
            max_iter=int(steps),
            targeted=targeted,
            nb_random_init=int(restarts),
            batch_size=len(x),
            loss_type="cross_entropy" if loss == "ce" else "difference_logits_ratio",
            verbose=False,
        )

    return _run_art(model01, x, y, seed, build)


def square(
    model01: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    queries: int = SQUARE_QUERIES,
    targeted: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Square attack under L∞ (Andriushchenko et al. 2020) via ART: black-box, uses scores only.

    Untargeted: the margin loss of the true class; targeted: the margin by which the target class
    trails the best other class, and success means the target class wins.
    """
    _check_attack_args(x, y, eps)
    if eps == 0:
        return x.clone()

    def build(estimator):
        from art.attacks.evasion import SquareAttack

        extra = {}
        if targeted:

            def target_margin(x_np: np.ndarray, y_onehot: np.ndarray) -> np.ndarray:
                logits = estimator.predict(x_np, batch_size=len(x))
                t = y_onehot.argmax(axis=1)
                target_logit = np.take_along_axis(logits, t[:, None], axis=1)[:, 0]
                others = logits.copy()
                np.put_along_axis(others, t[:, None], -np.inf, axis=1)
                return others.max(axis=1) - target_logit  # < 0 once the target wins

            extra = {
                "adv_criterion": lambda pred, y_onehot: pred.argmax(axis=1) == y_onehot.argmax(axis=1),
                "loss": target_margin,
            }
        return SquareAttack(
            estimator,
            norm=np.inf,
            eps=float(eps),
            max_iter=int(queries),
            p_init=0.8,
            nb_restarts=1,
            batch_size=len(x),
            verbose=False,
            **extra,
        )

    return _run_art(model01, x, y, seed, build)


def apgd_square(
    model01: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    targeted: bool = False,
    seed: int = 0,
    apgd_steps: int = APGD_STEPS,
    square_queries: int = SQUARE_QUERIES,
) -> torch.Tensor:
    """Reduced AutoAttack (Croce & Hein 2020), L∞, safe for 2-class models -- *not* the standard
    AutoAttack (no APGD-T, no FAB-T, Square at ``square_queries``; see the module docstring).

    Runs APGD-CE, then APGD-DLR (only with >= 3 classes, untargeted), then Square, each on the
    images no earlier attack has broken; an image is broken when any attack fools the model (the
    AutoAttack rule: unbroken images are returned unchanged, so this measures robust accuracy).
    """
    _check_attack_args(x, y, eps)
    if eps == 0:
        return x.clone()
    n_classes = _n_classes(model01, x, None)
    parts: list[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = [
        lambda xb, yb, s: apgd(model01, xb, yb, eps, loss="ce", steps=apgd_steps, targeted=targeted, seed=s)
    ]
    if n_classes >= 3 and not targeted:
        parts.append(lambda xb, yb, s: apgd(model01, xb, yb, eps, loss="dlr", steps=apgd_steps, seed=s))
    parts.append(lambda xb, yb, s: square(model01, xb, yb, eps, queries=square_queries, targeted=targeted, seed=s))

    x_adv = x.detach().clone()
    with _frozen(model01), torch.no_grad():
        robust = ~_is_success(model01(x_adv), y, targeted)
    for k, run in enumerate(parts):
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        candidate = run(x[idx], y[idx], seed + k)
        with _frozen(model01), torch.no_grad():
            ok = _is_success(model01(candidate), y[idx], targeted)
        x_adv[idx[ok]] = candidate[ok]
        robust[idx[ok]] = False
    return x_adv
