"""``run_audit``: attack and corrupt a trained model's evaluation images, score every variant.

One pass over the loader: each batch is de-normalized to ``[0, 1]``, scored clean, attacked at every
ε and corrupted at every severity; the probabilities are collected and scored at the end with
``medtricks.evaluate.compute_metrics`` (bootstrap CIs), so every audit number comes with its CI.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from sklearn import config_context
from torch import nn

from medtricks.errors import ConfigError
from medtricks.audit.adversarial import (
    APGD_STEPS,
    ATTACKS,
    RENAMED_ATTACKS,
    SQUARE_QUERIES,
    _check_mean_std,
    _frozen,
    _pgd,
    _is_success,
    apgd,
    apgd_square,
    attack_norm,
    check_perturbation,
    fgsm,
    l2_radius,
    normalized_model,
    square,
)
from medtricks.audit.corruptions import CORRUPTION_PARAMS, corrupt, list_corruptions
from medtricks.audit.masking import LARGE_EPS, fewer_steps, masking_checks
from medtricks.audit.report import AuditExamples, AuditResult, safe_name

# _auroc is the AUROC compute_metrics reports (binary on class 1, else macro one-vs-rest; nan when a
# class is absent, which bootstrap_ci skips), reused so the corruption summary means the same.
from medtricks.evaluate.metrics import _auroc, bootstrap_ci, compute_metrics

__all__ = ["run_audit", "DEFAULT_EPS"]

#: Default ε grid in [0, 1] pixel units: 0, 0.5, 1, 2, 4, 8 grey levels of 255.
DEFAULT_EPS = (0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
from medtricks.audit.attack_names import ATTACK_ALIASES as _ALIASES  # noqa: E402
# De-normalized loader images may overshoot [0, 1] by float round-off; more means wrong mean/std.
_RANGE_TOL = 1e-3
_N_EXAMPLES = 4
_CI = 0.95
_ATTACK_METRICS = ("accuracy", "auroc")
_CORRUPTION_METRICS = ("accuracy", "auroc")


def run_audit(
    model: nn.Module,
    loader: Any,
    *,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    attacks: Union[str, Sequence[str]] = ("fgsm", "pgd_linf"),
    eps: Sequence[float] = DEFAULT_EPS,
    pgd_steps: int = 10,
    corruptions: Union[str, Sequence[str]] = ("all",),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    n: Optional[int] = 500,
    surrogate: Optional[nn.Module] = None,
    target_class: Optional[Union[int, str]] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    n_bootstrap: int = 200,
    progress: bool = True,
    square_queries: int = SQUARE_QUERIES,
    masking: bool = True,
) -> AuditResult:
    """Audit ``model`` against adversarial attacks and image corruptions on ``loader``'s images.

    Args:
        model: the trained classifier; takes *normalized* images, returns ``(N, K)`` logits. Put
            in eval mode (BatchNorm statistics frozen) during the audit; its mode, device and
            ``requires_grad`` flags are restored afterwards.
        loader: yields ``(images, targets)``: images normalized as ``(x - mean) / std`` per channel
            from pixels ``x`` in ``[0, 1]``, targets integer class indices. The first ``n`` images
            are audited (use an unshuffled evaluation loader for a reproducible set).
        classes: the ``K`` class names (logit order).
        mean, std: the loader's per-channel normalization; attacks work on ``x`` in ``[0, 1]``
            with the normalization moved inside the model, so ``eps`` is a pixel intensity.
        attacks: any of ``fgsm``, ``pgd_linf`` (alias ``pgd``), ``pgd_l2``, ``apgd_ce``,
            ``apgd_square`` (a reduced AutoAttack, see :func:`~medtricks.audit.adversarial.apgd_square`), ``square``, ``transfer`` (PGD-L∞ crafted on ``surrogate``, evaluated on
            ``model``); a comma-separated string is accepted; empty = no attacks.
        eps: budgets in ``[0, 1]`` pixel units (L∞; for ``pgd_l2`` the per-pixel RMS, i.e. an L2
            radius of ``eps * sqrt(C*H*W)``). ``0`` reuses the clean predictions, so its metrics
            equal the clean metrics exactly.
        pgd_steps: iterations of PGD and of the transfer attack (APGD: ``APGD_STEPS``).
        corruptions: names from :func:`list_corruptions`, or ``("all",)``; empty = none.
        severities: corruption severities, integers 0..5 (0 = identity).
        n: number of images to audit (``None`` = the whole loader).
        surrogate: a model taking normalized input like ``model`` (another run or checkpoint);
            required by ``transfer``.
        target_class: ``None`` for untargeted attacks; a class index (or name) to push every image
            towards that class (e.g. normal -> pneumonia). Targeted attacks are reported as
            ``<attack>_to_<class>``.
        device: where to run (``"cpu"``, ``"cuda"``, ``"auto"`` = CUDA when available).
        seed: seeds the random starts, noise corruptions and bootstrap.
        n_bootstrap: bootstrap resamples for the CIs (``0`` = no CIs).
        progress: show a tqdm progress bar.
        square_queries: query budget of ``square`` and of Square inside ``apgd_square`` (standard
            AutoAttack: 5000).
        masking: run the gradient-masking checks (:mod:`medtricks.audit.masking`) when the audit has an
            untargeted ``pgd_linf``: PGD with fewer steps, PGD at ε = 64/255 and random sign noise are
            added as probes; a failed check is a ``WARNING`` line in the table and a ``RuntimeWarning``.

        With two or more attacks, a ``worst_case`` row counts an image as correct at an ε only if every
        attack failed on it there (the AutoAttack rule across the audit's attacks).

    Returns:
        An :class:`AuditResult`: ``.metrics`` for MLflow, ``.to_json()``, ``.figures()``, ``.table()``.

    Example:
        >>> res = run_audit(model, val_loader, classes=["normal", "pneumonia"], mean=(0.5,), std=(0.25,),
        ...                 attacks=("fgsm", "pgd_linf"), corruptions=("all",), n=500)
        >>> print(res.table())
        >>> tracker.log_metrics(res.metrics)
    """
    names = _check_classes(classes)
    attack_list = _check_attacks(attacks, surrogate)
    eps_list = _check_eps(eps)
    corruption_list = _check_corruptions(corruptions)
    severity_list = _check_severities(severities)
    if not attack_list:
        eps_list = []
    if not corruption_list:
        severity_list = []
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ConfigError(f"pgd_steps must be an integer >= 1, got {pgd_steps!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ConfigError(f"n must be an integer >= 1 (images to audit) or None for all, got {n!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    if isinstance(square_queries, bool) or not isinstance(square_queries, (int, np.integer)) or square_queries < 1:
        raise ConfigError(f"square_queries must be an integer >= 1, got {square_queries!r}")
    target = _check_target(target_class, names)
    mean_l, std_l = _check_mean_std(mean, std)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if surrogate is not None and "transfer" not in attack_list:
        warnings.warn("run_audit: a surrogate was given but 'transfer' is not in attacks; the surrogate is unused",
                      UserWarning, stacklevel=2)

    labels = {a: (a if target is None else f"{a}_to_{safe_name(names[target])}") for a in attack_list}
    job = _Job(names, attack_list, labels, eps_list, pgd_steps, corruption_list, severity_list, target, seed)
    job.square_queries = int(square_queries)
    job.masking = bool(masking) and target is None and "pgd_linf" in attack_list and any(e > 0 for e in eps_list)
    with contextlib.ExitStack() as stack:
        for module in [model] + ([surrogate] if "transfer" in attack_list else []):
            stack.enter_context(_on_device(module, device))
            stack.enter_context(_frozen(module))
        job.model = model
        job.model01 = normalized_model(model, mean_l, std_l)
        if "transfer" in attack_list:
            job.surrogate01 = normalized_model(surrogate, mean_l, std_l)
        job.collect(loader, n, mean_l, std_l, device, progress)
    result = job.summarize(n_bootstrap, n_requested=n, device=device)
    failed = [c for c in result.masking if not c["passed"]]
    if failed:
        warnings.warn("possible gradient masking -- do not trust the robust accuracy until a stronger attack "
                      "confirms it: " + "; ".join(f"{c['check']}: {c['detail']}" for c in failed), RuntimeWarning,
                      stacklevel=2)
    return result


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _as_names(value: Union[str, Sequence[str]], what: str) -> list[str]:
    if isinstance(value, str):  # "a,b" or "none" (the CLI's way to say: no attacks / no corruptions)
        value = [] if value.strip().lower() == "none" else [v for v in (s.strip() for s in value.split(",")) if v]
    try:
        return [str(v).strip().lower() for v in value]
    except TypeError as err:
        raise ConfigError(f"{what} must be a list of names or a comma-separated string, got {value!r}") from err


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2:
        raise ConfigError(f"classes must be a list of >= 2 class names (logit order), got {classes!r}")
    names = [str(c) for c in classes]
    safe = [safe_name(c) for c in names]
    if len(set(safe)) != len(safe):
        raise ConfigError(f"class names {names} are not unique once made MLflow-safe ({safe}); rename the classes")
    return names


def _check_attacks(attacks: Union[str, Sequence[str]], surrogate: Optional[nn.Module]) -> list[str]:
    out = []
    for name in _as_names(attacks, "attacks"):
        name = _ALIASES.get(name, name)
        if name in RENAMED_ATTACKS:
            raise ConfigError(RENAMED_ATTACKS[name])
        if name not in ATTACKS:
            raise ConfigError(f"unknown attack {name!r}: expected any of {list(ATTACKS)} (or aliases {_ALIASES})")
        if name in out:
            raise ConfigError(f"attack {name!r} is listed twice in attacks={attacks!r}")
        out.append(name)
    if "transfer" in out and surrogate is None:
        raise ConfigError("attack 'transfer' needs a surrogate model (surrogate=..., e.g. another run's checkpoint)")
    if "transfer" in out and not isinstance(surrogate, nn.Module):
        raise ConfigError(f"surrogate must be a torch.nn.Module taking normalized images, got {type(surrogate).__name__}")
    return out


def _check_eps(eps: Sequence[float]) -> list[float]:
    if isinstance(eps, (int, float)):
        eps = [eps]
    values = []
    for e in eps:
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating, np.integer)) or not (0.0 <= float(e) <= 1.0):
            raise ConfigError(f"eps values must be numbers in [0, 1] (pixel intensity; 4/255 = 0.0157), got {e!r} in {list(eps)}")
        values.append(float(e))
    if not values:
        raise ConfigError("eps is empty: give at least one budget, e.g. eps=(0, 1/255, 4/255)")
    labels = [f"{e:.4f}" for e in values]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigError(f"eps values {values} collide in the 4-decimal metric keys ({dupes}); use distinct budgets")
    return sorted(values)


def _check_corruptions(corruptions: Union[str, Sequence[str]]) -> list[str]:
    names = _as_names(corruptions, "corruptions")
    if "all" in names:
        return list_corruptions()
    unknown = [c for c in names if c not in CORRUPTION_PARAMS]
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}: expected 'all' or any of {list_corruptions()}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a corruption is listed twice in corruptions={corruptions!r}")
    return names


def _check_severities(severities: Sequence[int]) -> list[int]:
    values = list(severities) if not isinstance(severities, int) else [severities]
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= 5]
    if bad or not values or len(set(values)) != len(values):
        raise ConfigError(f"severities must be distinct integers 0..5 (0 = identity), got {severities!r}")
    return sorted(int(s) for s in values)


def _check_target(target_class: Optional[Union[int, str]], names: list[str]) -> Optional[int]:
    if target_class is None:
        return None
    if isinstance(target_class, str):
        if target_class not in names:
            raise ConfigError(f"target_class {target_class!r} is not a class: expected an index or one of {names}")
        return names.index(target_class)
    if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)) or not 0 <= target_class < len(names):
        raise ConfigError(f"target_class must be None or a class index 0..{len(names) - 1} ({names}), got {target_class!r}")
    return int(target_class)


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``module`` to ``device`` for the audit and back to where it was afterwards."""
    first = next(iter(list(module.parameters()) + list(module.buffers())), None)
    home = first.device if first is not None else None
    module.to(device)
    try:
        yield
    finally:
        if home is not None:
            module.to(home)


def _sub_seed(*parts: int) -> int:
    """A distinct, reproducible seed per (seed, batch, attack, eps) cell."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# the audit itself
# --------------------------------------------------------------------------------------------
class _Job:
    """State of one audit: the collected probabilities per (attack, eps) and (corruption, severity)."""

    def __init__(self, names, attacks, labels, eps, pgd_steps, corruptions, severities, target, seed):
        self.names, self.attacks, self.labels, self.eps = names, attacks, labels, eps
        self.pgd_steps, self.corruptions, self.severities = pgd_steps, corruptions, severities
        self.target, self.seed = target, seed
        self.model = self.model01 = self.surrogate01 = None
        self.y: list[np.ndarray] = []
        self.clean: list[np.ndarray] = []
        self.adv: dict[tuple[str, float], list[np.ndarray]] = {(a, e): [] for a in attacks for e in eps if e > 0}
        self.corrupted: dict[tuple[str, int], list[np.ndarray]] = {(c, s): [] for c in corruptions for s in severities if s > 0}
        self.examples: Optional[AuditExamples] = None
        self.image_shape: Optional[tuple[int, ...]] = None
        self.max_norm: dict[tuple[str, float], float] = {}
        self.square_queries = SQUARE_QUERIES
        self.masking = False
        # gradient-masking probes: per-image correctness
        self.probe_fewer: list[np.ndarray] = []
        self.probe_large: list[np.ndarray] = []
        self.probe_noise: dict[float, list[np.ndarray]] = {e: [] for e in eps if e > 0}

    # ------------------------------------------------------------------ collection
    def collect(self, loader, n, mean, std, device, progress):
        from tqdm.auto import tqdm

        expected = _expected_images(loader, n)
        units = 1 + len(self.adv) + len(self.corrupted) + (2 if self.masking else 0)
        bar = tqdm(total=expected * units if expected else None, desc="audit", unit="img", disable=not progress,
                   leave=False)
        mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        seen = 0
        try:
            for b, batch in enumerate(loader):
                if n is not None and seen >= n:
                    break
                x_norm, y = _unpack(batch, b, len(self.names))
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
        k = len(y)
        with torch.no_grad():
            logits = self.model(x_norm)  # exactly what predict() computes: eps=0 == clean
        if logits.dim() != 2 or logits.shape[1] != len(self.names):
            raise ConfigError(f"the model returned logits of shape {tuple(logits.shape)} for a batch of {k}; expected "
                             f"({k}, {len(self.names)}) for classes {self.names}")
        clean_probs = torch.softmax(logits.float(), dim=1)
        self.y.append(y.cpu().numpy())
        self.clean.append(clean_probs.cpu().numpy())
        bar.update(k)

        y_attack = y if self.target is None else torch.full_like(y, self.target)
        for ai, attack in enumerate(self.attacks):
            for ei, eps in enumerate(self.eps):
                if eps == 0:
                    continue
                bar.set_postfix_str(f"{attack} eps={eps * 255:.3g}/255")
                x_adv, probs = self._attack(attack, x01, y_attack, eps, _sub_seed(self.seed, b, ai, ei))
                self.adv[(attack, eps)].append(probs.cpu().numpy())
                if b == 0 and self.examples is None and attack == self._example_attack() and eps == self.eps[-1]:
                    self._keep_examples(attack, eps, x01, x_adv, y, clean_probs, probs)
                bar.update(k)
        if self.masking:
            self._masking_probes(b, x01, y, bar)
        for ci, name in enumerate(self.corruptions):
            for severity in self.severities:
                if severity == 0:
                    continue
                bar.set_postfix_str(f"{name} severity {severity}")
                corrupted = corrupt(x01, name, severity, seed=_sub_seed(self.seed, b, 1000 + ci, severity))
                with torch.no_grad():
                    probs = torch.softmax(self.model01(corrupted).float(), dim=1)
                self.corrupted[(name, severity)].append(probs.cpu().numpy())
                bar.update(k)

    def _masking_probes(self, b, x01, y, bar):
        """PGD with fewer steps at the largest ε, PGD at ε = 64/255, random sign noise at every ε."""
        eps_max = max(self.eps)
        for tag, eps, steps in ((0, eps_max, fewer_steps(self.pgd_steps)), (1, LARGE_EPS, self.pgd_steps)):
            bar.set_postfix_str(f"masking probe pgd-{steps} eps={eps * 255:.3g}/255")
            generator = torch.Generator(device=x01.device).manual_seed(_sub_seed(self.seed, b, 2000 + tag))
            _, logits = _pgd(self.model01, x01, y, eps, norm="linf", steps=steps, step_size=None, random_start=True,
                             targeted=False, generator=generator)
            (self.probe_fewer if tag == 0 else self.probe_large).append((logits.argmax(1) == y).cpu().numpy())
            bar.update(len(y))
        generator = torch.Generator(device=x01.device).manual_seed(_sub_seed(self.seed, b, 3000))
        for eps in self.probe_noise:
            broken = torch.zeros_like(y, dtype=torch.bool)
            for _ in range(4):  # four random corners of the ε-ball
                sign = torch.randint(0, 2, x01.shape, generator=generator, device=x01.device).to(x01.dtype) * 2 - 1
                with torch.no_grad():
                    broken |= _is_success(self.model01((x01 + eps * sign).clamp(0.0, 1.0)).float(), y, False)
            self.probe_noise[eps].append((~broken).cpu().numpy())

    def _attack(self, attack, x01, y_attack, eps, seed):
        targeted = self.target is not None
        norm = attack_norm(attack)
        budget = l2_radius(eps, x01.shape[1:]) if norm == "l2" else eps
        logits = None
        if attack in ("pgd_linf", "pgd_l2", "transfer"):
            generator = torch.Generator(device=x01.device).manual_seed(seed)
            source = self.surrogate01 if attack == "transfer" else self.model01
            x_adv, logits = _pgd(source, x01, y_attack, budget, norm=norm, steps=self.pgd_steps, step_size=None,
                                 random_start=True, targeted=targeted, generator=generator)
            if attack == "transfer":
                logits = None  # those are the surrogate's: score on the target model below
        elif attack == "fgsm":
            x_adv = fgsm(self.model01, x01, y_attack, eps, targeted=targeted)
        elif attack == "apgd_ce":
            x_adv = apgd(self.model01, x01, y_attack, eps, loss="ce", steps=APGD_STEPS, targeted=targeted, seed=seed)
        elif attack == "apgd_square":
            x_adv = apgd_square(self.model01, x01, y_attack, eps, targeted=targeted, seed=seed,
                                square_queries=self.square_queries)
        elif attack == "square":
            x_adv = square(self.model01, x01, y_attack, eps, queries=self.square_queries, targeted=targeted, seed=seed)
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
        return "pgd_linf" if "pgd_linf" in self.attacks else self.attacks[0]

    def _keep_examples(self, attack, eps, x01, x_adv, y, clean_probs, adv_probs):
        m = min(_N_EXAMPLES, len(y))
        self.examples = AuditExamples(
            attack=self.labels[attack], eps=eps, clean=x01[:m].cpu().numpy(), adversarial=x_adv[:m].cpu().numpy(),
            labels=y[:m].cpu().numpy(), clean_probs=clean_probs[:m].cpu().numpy(), adversarial_probs=adv_probs[:m].cpu().numpy())

    # ------------------------------------------------------------------ scoring
    def summarize(self, n_bootstrap, *, n_requested, device) -> AuditResult:
        y = np.concatenate(self.y)
        clean_p = np.concatenate(self.clean)

        def scored(probs, keys):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from y: reported as nan
                res = compute_metrics(y, probs, self.names, n_bootstrap=int(n_bootstrap), ci=_CI, seed=self.seed)
            return _flat(res, keys, self.names)

        per_class = [f"{kind}/{c}" for kind in ("sensitivity", "specificity") for c in self.names]
        clean = scored(clean_p, list(_ATTACK_METRICS) + per_class)
        attacks: dict[str, dict[float, dict[str, float]]] = {}
        for attack in self.attacks:
            rows = attacks.setdefault(self.labels[attack], {})
            for eps in self.eps:
                probs = clean_p if eps == 0 else np.concatenate(self.adv[(attack, eps)])
                row = scored(probs, list(_ATTACK_METRICS) + per_class)
                row.update(self._success_rate(y, clean_p, probs, n_bootstrap))
                rows[eps] = row
        if len(self.attacks) >= 2:
            worst = {}
            for eps in self.eps:
                probs = clean_p if eps == 0 else self._worst_case([np.concatenate(self.adv[(a, eps)]) for a in self.attacks], y)
                row = scored(probs, list(_ATTACK_METRICS) + per_class)
                row.update(self._success_rate(y, clean_p, probs, n_bootstrap))
                worst[eps] = row
            attacks["worst_case" if self.target is None else f"worst_case_to_{safe_name(self.names[self.target])}"] = worst
        masking = [c.as_dict() for c in self._masking_checks(y)] if self.masking else []
        corruptions: dict[str, dict[int, dict[str, float]]] = {}
        cells = []
        for name in self.corruptions:
            rows = corruptions.setdefault(name, {})
            for severity in self.severities:
                probs = clean_p if severity == 0 else np.concatenate(self.corrupted[(name, severity)])
                rows[severity] = scored(probs, _CORRUPTION_METRICS)
                cells.append(probs)
        summary = _corruption_summary(y, clean_p, cells, clean, corruptions, n_bootstrap, self.seed) if cells else {}
        return AuditResult(classes=list(self.names), config=self._config(len(y), n_requested, n_bootstrap, device),
                           clean=clean, attacks=attacks, corruptions=corruptions, corruption_summary=summary,
                           examples=self.examples, masking=masking)

    def _worst_case(self, per_attack: list[np.ndarray], y: np.ndarray) -> np.ndarray:
        """Per image, the probabilities of the attack that did the most damage: one that fooled the model
        (untargeted: wrong class; targeted: the target class) over one that did not, then the lowest
        true-class (highest target-class) probability."""
        stack = np.stack(per_attack)  # (attacks, N, K)
        rows = np.arange(len(y))
        if self.target is None:
            fooled = stack.argmax(2) != y[None, :]
            score = fooled * 2.0 + (1.0 - stack[:, rows, y])
        else:
            fooled = stack.argmax(2) == self.target
            score = fooled * 2.0 + stack[:, :, self.target]
        return stack[score.argmax(0), rows]

    def _masking_checks(self, y: np.ndarray):
        def correct(probs):
            return probs.argmax(1) == y

        pgd_rows = {e: correct(np.concatenate(self.adv[("pgd_linf", e)])) for e in self.eps if e > 0}
        black_box = {a: {e: correct(np.concatenate(self.adv[(a, e)])) for e in self.eps if e > 0}
                     for a in ("square", "transfer") if a in self.attacks}
        black_box["random_noise"] = {e: np.concatenate(v) for e, v in self.probe_noise.items()}
        return masking_checks(pgd_rows, pgd_steps=self.pgd_steps, correct_fewer=np.concatenate(self.probe_fewer),
                              black_box=black_box, correct_large=np.concatenate(self.probe_large))

    def _success_rate(self, y, clean_p, probs, n_bootstrap) -> dict[str, float]:
        """Share of originally correct images the attack flips (targeted: to the target class,
        counted over images whose true class is not the target)."""
        correct = clean_p.argmax(1) == y
        pred = probs.argmax(1)
        if self.target is None:
            eligible, success = correct, pred != y
        else:
            eligible, success = correct & (y != self.target), pred == self.target
        s = success[eligible].astype(np.float64)
        out = {"attack_success_rate": float(s.mean()) if s.size else math.nan,
               "attack_success_rate_ci_low": math.nan, "attack_success_rate_ci_high": math.nan}
        if s.size and n_bootstrap:
            low, high = bootstrap_ci(lambda v, _: float(v.mean()), s, s[:, None], n_bootstrap=int(n_bootstrap),
                                     ci=_CI, seed=self.seed)
            out["attack_success_rate_ci_low"], out["attack_success_rate_ci_high"] = low, high
        return out

    def _config(self, n_images, n_requested, n_bootstrap, device) -> dict[str, Any]:
        notes = []
        if "pgd_l2" in self.attacks and self.image_shape:
            notes.append(f"pgd_l2: eps is the per-pixel RMS; L2 radius = eps*sqrt({int(np.prod(self.image_shape))}) "
                         f"(e.g. eps 1/255 -> {l2_radius(1 / 255, self.image_shape):.3f})")
        if "apgd_square" in self.attacks:
            dlr = "APGD-DLR, " if len(self.names) >= 3 and self.target is None else ""
            notes.append(f"apgd_square: APGD-CE ({APGD_STEPS} it.), {dlr}Square ({self.square_queries} queries), L-inf, "
                         "per-image worst case; a reduced AutoAttack: no APGD-T, no FAB-T"
                         f"{'' if self.square_queries >= 5000 else ', fewer Square queries than the standard 5000'}")
        if len(self.attacks) >= 2:
            notes.append("worst_case: an image counts as correct only if every attack failed on it (AutoAttack rule)")
        if "transfer" in self.attacks:
            notes.append(f"transfer: PGD-L-inf-{self.pgd_steps} crafted on the surrogate, scored on the model")
        return {
            "attacks": [self.labels[a] for a in self.attacks],
            "eps": list(self.eps),
            "pgd_steps": self.pgd_steps,
            "pgd_step_size": "2.5 * eps / pgd_steps, random start, best iterate kept",
            "apgd_steps": APGD_STEPS,
            "square_queries": self.square_queries,
            "target_class": None if self.target is None else self.names[self.target],
            "corruptions": list(self.corruptions),
            "severities": list(self.severities),
            "corruption_params": {c: list(CORRUPTION_PARAMS[c]) for c in self.corruptions},
            "n_requested": n_requested,
            "n_images": int(n_images),
            "image_shape": list(self.image_shape or ()),
            "max_perturbation_norm": {f"{self.labels[a]}/{e:.4f}": v for (a, e), v in self.max_norm.items()},
            "seed": self.seed,
            "n_bootstrap": int(n_bootstrap),
            "ci": _CI,
            "device": str(device),
            "notes": notes,
        }


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
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
        what = f"shape {tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"loader batch {index}: images must be a float tensor (N, C, H, W), got {what}")
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or len(targets) != len(images) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ConfigError(f"loader batch {index}: targets must be {len(images)} integer class indices (shape (N,)), got "
                         f"{targets.dtype} of shape {tuple(targets.shape)} (one-hot or soft labels are not supported)")
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
        raise ConfigError(f"loader batch {index}: target {int(targets.max()) if int(targets.max()) >= n_classes else int(targets.min())} "
                         f"is not a class index 0..{n_classes - 1}")
    return images.float(), targets.long()


def _denormalize(x_norm: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor, index: int) -> torch.Tensor:
    if x_norm.shape[1] != mean_t.shape[1]:
        raise ConfigError(f"loader batch {index} has {x_norm.shape[1]} channel(s) but mean/std have {mean_t.shape[1]} "
                         "value(s); pass the normalization the loader applies, one value per channel")
    x01 = x_norm * std_t + mean_t
    lo, hi = float(x01.min()), float(x01.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ConfigError(
            f"loader batch {index} de-normalizes to [{lo:.4f}, {hi:.4f}] with mean={mean_t.flatten().tolist()} "
            f"std={std_t.flatten().tolist()}; expected pixels in [0, 1]: pass the mean/std the loader normalizes with")
    return x01.clamp(0.0, 1.0)


def _flat(res, keys, names) -> dict[str, float]:
    """Selected metrics of a MetricsResult as ``{key, key_ci_low, key_ci_high}`` with MLflow-safe class names."""
    out: dict[str, float] = {}
    for key in keys:
        value = float(res.values.get(key, math.nan))
        low, high = res.ci.get(key, (math.nan, math.nan))
        kind, _, cls = key.partition("/")
        name = f"{kind}/{safe_name(cls)}" if cls else key
        out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = value, float(low), float(high)
    return out


def _corruption_summary(y, clean_p, cells, clean, corruptions, n_bootstrap, seed) -> dict[str, float]:
    """Mean accuracy / AUROC over all corruption cells and the relative drop vs clean, with paired
    bootstrap CIs (the same resampled images for clean and every cell)."""
    stack = np.stack([clean_p] + cells, axis=1).astype(np.float64)  # (N, 1 + cells, K)
    stack /= stack.sum(axis=2, keepdims=True)
    accs = [v["accuracy"] for rows in corruptions.values() for v in rows.values()]
    aurocs = [v["auroc"] for rows in corruptions.values() for v in rows.values()]

    def mean_acc(yy, pp):
        return float((pp[:, 1:].argmax(2) == yy[:, None]).mean())

    def mean_auroc(yy, pp):
        return float(np.mean([_auroc(yy, pp[:, j]) for j in range(1, pp.shape[1])]))

    def drop_acc(yy, pp):
        base = float((pp[:, 0].argmax(1) == yy).mean())
        return (base - mean_acc(yy, pp)) / base if base > 0 else math.nan

    def drop_auroc(yy, pp):
        base = _auroc(yy, pp[:, 0])
        return (base - mean_auroc(yy, pp)) / base

    values = {
        "mean/accuracy": float(np.mean(accs)),
        "mean/auroc": float(np.mean(aurocs)),
        "relative_drop/accuracy": (clean["accuracy"] - float(np.mean(accs))) / clean["accuracy"] if clean["accuracy"] > 0 else math.nan,
        "relative_drop/auroc": (clean["auroc"] - float(np.mean(aurocs))) / clean["auroc"],
    }
    fns = {"mean/accuracy": mean_acc, "mean/auroc": mean_auroc, "relative_drop/accuracy": drop_acc,
           "relative_drop/auroc": drop_auroc}
    out: dict[str, float] = {}
    for key, value in values.items():
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = value, math.nan, math.nan
        if n_bootstrap and math.isfinite(value):
            with warnings.catch_warnings(), config_context(assume_finite=True, skip_parameter_validation=True):
                warnings.simplefilter("ignore", RuntimeWarning)  # resamples missing a class are skipped
                try:
                    out[f"{key}_ci_low"], out[f"{key}_ci_high"] = bootstrap_ci(
                        fns[key], y, stack, n_bootstrap=int(n_bootstrap), ci=_CI, seed=seed)
                except RuntimeError:  # undefined on every resample (tiny sets): no interval
                    pass
    return out
