"""The audit's one pass over the loader: every batch scored clean, attacked at every ε, corrupted at every
severity, and probed for gradient masking; the probabilities are kept for :mod:`medtricks.audit.scoring`.

Each batch is de-normalized to pixels in ``[0, 1]`` (attacks and corruptions work there, with the
normalization moved inside the model), and every (batch, attack, ε) cell gets its own reproducible seed.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from medtricks.audit.adversarial import (
    APGD_STEPS,
    _is_success,
    _pgd,
    apgd,
    apgd_square,
    attack_norm,
    check_perturbation,
    fgsm,
    l2_radius,
    square,
)
from medtricks.audit.corruptions import corrupt
from medtricks.audit.masking import LARGE_EPS, fewer_steps
from medtricks.audit.plan import AuditPlan
from medtricks.audit.report import AuditExamples
from medtricks.errors import ConfigError

__all__ = ["AuditSweep"]

# De-normalized loader images may overshoot [0, 1] by float round-off; more means wrong mean/std.
_RANGE_TOL = 1e-3
_N_EXAMPLES = 4


class AuditSweep:
    """State of one audit: the collected probabilities per (attack, eps) and (corruption, severity).

    ``model`` takes normalized images; ``model01`` (and ``surrogate01`` for ``transfer``) take pixels in
    ``[0, 1]`` (:func:`~medtricks.audit.adversarial.normalized_model`); the caller sets them before
    :meth:`collect`.
    """

    def __init__(self, plan: AuditPlan):
        self.plan = plan
        self.model = self.model01 = self.surrogate01 = None
        self.y: list[np.ndarray] = []
        self.clean: list[np.ndarray] = []
        self.adv: dict[tuple[str, float], list[np.ndarray]] = {
            (a, e): [] for a in plan.attacks for e in plan.eps if e > 0
        }
        self.corrupted: dict[tuple[str, int], list[np.ndarray]] = {
            (c, s): [] for c in plan.corruptions for s in plan.severities if s > 0
        }
        self.examples: Optional[AuditExamples] = None
        self.image_shape: Optional[tuple[int, ...]] = None
        self.max_norm: dict[tuple[str, float], float] = {}
        self.apgd_steps = APGD_STEPS  # what the sweep ran, for the report's config
        # gradient-masking probes: per-image correctness
        self.probe_fewer: list[np.ndarray] = []
        self.probe_large: list[np.ndarray] = []
        self.probe_noise: dict[float, list[np.ndarray]] = {e: [] for e in plan.eps if e > 0}

    # ------------------------------------------------------------------ collection
    def collect(self, loader: Any, device: torch.device, progress: bool) -> None:
        from tqdm.auto import tqdm

        n = self.plan.n
        expected = _expected_images(loader, n)
        units = 1 + len(self.adv) + len(self.corrupted) + (2 if self.plan.masking else 0)
        bar = tqdm(
            total=expected * units if expected else None, desc="audit", unit="img", disable=not progress, leave=False
        )
        mean_t = torch.tensor(self.plan.mean, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(self.plan.std, device=device).view(1, -1, 1, 1)
        seen = 0
        try:
            for b, batch in enumerate(loader):
                if n is not None and seen >= n:
                    break
                x_norm, y = _unpack(batch, b, len(self.plan.names))
                if n is not None:
                    x_norm, y = x_norm[: n - seen], y[: n - seen]
                x_norm, y = x_norm.to(device), y.to(device)
                seen += len(y)
                x01 = _denormalize(x_norm, mean_t, std_t, b)
                self.image_shape = tuple(x01.shape[1:])
                self._batch(b, x_norm, x01, y, bar)
        finally:
            bar.close()
        if seen == 0:
            raise ConfigError("the audit loader yielded no images: nothing to audit")

    def _batch(self, b, x_norm, x01, y, bar):
        plan = self.plan
        k = len(y)
        with torch.no_grad():
            logits = self.model(x_norm)  # exactly what predict() computes: eps=0 == clean
        if logits.dim() != 2 or logits.shape[1] != len(plan.names):
            raise ConfigError(
                f"the model returned logits of shape {tuple(logits.shape)} for a batch of {k}; expected "
                f"({k}, {len(plan.names)}) for classes {plan.names}"
            )
        clean_probs = torch.softmax(logits.float(), dim=1)
        self.y.append(y.cpu().numpy())
        self.clean.append(clean_probs.cpu().numpy())
        bar.update(k)

        y_attack = y if plan.target is None else torch.full_like(y, plan.target)
        for ai, attack in enumerate(plan.attacks):
            for ei, eps in enumerate(plan.eps):
                if eps == 0:
                    continue
                bar.set_postfix_str(f"{attack} eps={eps * 255:.3g}/255")
                x_adv, probs = self._attack(attack, x01, y_attack, eps, _sub_seed(plan.seed, b, ai, ei))
                self.adv[(attack, eps)].append(probs.cpu().numpy())
                if b == 0 and self.examples is None and attack == self._example_attack() and eps == plan.eps[-1]:
                    self._keep_examples(attack, eps, x01, x_adv, y, clean_probs, probs)
                bar.update(k)
        if plan.masking:
            self._masking_probes(b, x01, y, bar)
        for ci, name in enumerate(plan.corruptions):
            for severity in plan.severities:
                if severity == 0:
                    continue
                bar.set_postfix_str(f"{name} severity {severity}")
                corrupted = corrupt(x01, name, severity, seed=_sub_seed(plan.seed, b, 1000 + ci, severity))
                with torch.no_grad():
                    probs = torch.softmax(self.model01(corrupted).float(), dim=1)
                self.corrupted[(name, severity)].append(probs.cpu().numpy())
                bar.update(k)

    def _masking_probes(self, b, x01, y, bar):
        """PGD with fewer steps at the largest ε, PGD at ε = 64/255, random sign noise at every ε."""
        plan = self.plan
        eps_max = max(plan.eps)
        for tag, eps, steps in ((0, eps_max, fewer_steps(plan.pgd_steps)), (1, LARGE_EPS, plan.pgd_steps)):
            bar.set_postfix_str(f"masking probe pgd-{steps} eps={eps * 255:.3g}/255")
            generator = torch.Generator(device=x01.device).manual_seed(_sub_seed(plan.seed, b, 2000 + tag))
            _, logits = _pgd(
                self.model01,
                x01,
                y,
                eps,
                norm="linf",
                steps=steps,
                step_size=None,
                random_start=True,
                targeted=False,
                generator=generator,
            )
            (self.probe_fewer if tag == 0 else self.probe_large).append((logits.argmax(1) == y).cpu().numpy())
            bar.update(len(y))
        generator = torch.Generator(device=x01.device).manual_seed(_sub_seed(plan.seed, b, 3000))
        for eps in self.probe_noise:
            broken = torch.zeros_like(y, dtype=torch.bool)
            for _ in range(4):  # four random corners of the ε-ball
                sign = torch.randint(0, 2, x01.shape, generator=generator, device=x01.device).to(x01.dtype) * 2 - 1
                with torch.no_grad():
                    broken |= _is_success(self.model01((x01 + eps * sign).clamp(0.0, 1.0)).float(), y, False)
            self.probe_noise[eps].append((~broken).cpu().numpy())

    def _attack(self, attack, x01, y_attack, eps, seed):
        plan = self.plan
        targeted = plan.target is not None
        norm = attack_norm(attack)
        budget = l2_radius(eps, x01.shape[1:]) if norm == "l2" else eps
        logits = None
        if attack in ("pgd_linf", "pgd_l2", "transfer"):
            generator = torch.Generator(device=x01.device).manual_seed(seed)
            source = self.surrogate01 if attack == "transfer" else self.model01
            x_adv, logits = _pgd(
                source,
                x01,
                y_attack,
                budget,
                norm=norm,
                steps=plan.pgd_steps,
                step_size=None,
                random_start=True,
                targeted=targeted,
                generator=generator,
            )
            if attack == "transfer":
                logits = None  # those are the surrogate's: score on the target model below
        elif attack == "fgsm":
            x_adv = fgsm(self.model01, x01, y_attack, eps, targeted=targeted)
        elif attack == "apgd_ce":
            x_adv = apgd(
                self.model01, x01, y_attack, eps, loss="ce", steps=self.apgd_steps, targeted=targeted, seed=seed
            )
        elif attack == "apgd_square":
            x_adv = apgd_square(
                self.model01, x01, y_attack, eps, targeted=targeted, seed=seed, square_queries=plan.square_queries
            )
        elif attack == "square":
            x_adv = square(self.model01, x01, y_attack, eps, queries=plan.square_queries, targeted=targeted, seed=seed)
        else:  # pragma: no cover - names are validated up front
            raise ConfigError(f"unknown attack {attack!r}")
        norms = check_perturbation(x_adv, x01, budget, norm)  # the budget is asserted, never assumed
        key = (attack, eps)
        self.max_norm[key] = max(self.max_norm.get(key, 0.0), float(norms.max()))
        if logits is None:
            with torch.no_grad():
                logits = self.model01(x_adv)
        return x_adv, torch.softmax(logits.float(), dim=1)

    def _example_attack(self) -> str:
        return "pgd_linf" if "pgd_linf" in self.plan.attacks else self.plan.attacks[0]

    def _keep_examples(self, attack, eps, x01, x_adv, y, clean_probs, adv_probs):
        m = min(_N_EXAMPLES, len(y))
        self.examples = AuditExamples(
            attack=self.plan.labels[attack],
            eps=eps,
            clean=x01[:m].cpu().numpy(),
            adversarial=x_adv[:m].cpu().numpy(),
            labels=y[:m].cpu().numpy(),
            clean_probs=clean_probs[:m].cpu().numpy(),
            adversarial_probs=adv_probs[:m].cpu().numpy(),
        )


def _sub_seed(*parts: int) -> int:
    """A distinct, reproducible seed per (seed, batch, attack, eps) cell."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _expected_images(loader, n) -> Optional[int]:
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):
        return n
    return total if n is None else min(n, total)


def _unpack(batch, index, n_classes) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ConfigError(f"loader batch {index} is a {type(batch).__name__}; expected (images, targets)")
    images, targets = batch[0], batch[1]
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        what = (
            f"shape {tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        )
        raise ConfigError(f"loader batch {index}: images must be a float tensor (N, C, H, W), got {what}")
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or len(targets) != len(images) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ConfigError(
            f"loader batch {index}: targets must be {len(images)} integer class indices (shape (N,)), got "
            f"{targets.dtype} of shape {tuple(targets.shape)} (one-hot or soft labels are not supported)"
        )
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
        raise ConfigError(
            f"loader batch {index}: target {int(targets.max()) if int(targets.max()) >= n_classes else int(targets.min())} "
            f"is not a class index 0..{n_classes - 1}"
        )
    return images.float(), targets.long()


def _denormalize(x_norm: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor, index: int) -> torch.Tensor:
    if x_norm.shape[1] != mean_t.shape[1]:
        raise ConfigError(
            f"loader batch {index} has {x_norm.shape[1]} channel(s) but mean/std have {mean_t.shape[1]} "
            "value(s); pass the normalization the loader applies, one value per channel"
        )
    x01 = x_norm * std_t + mean_t
    lo, hi = float(x01.min()), float(x01.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ConfigError(
            f"loader batch {index} de-normalizes to [{lo:.4f}, {hi:.4f}] with mean={mean_t.flatten().tolist()} "
            f"std={std_t.flatten().tolist()}; expected pixels in [0, 1]: pass the mean/std the loader normalizes with"
        )
    return x01.clamp(0.0, 1.0)
