"""``run_audit``: attack and corrupt a trained model's evaluation images, score every variant.

One pass over the loader (:mod:`medtricks.audit.sweep`): each batch is de-normalized to ``[0, 1]``, scored
clean, attacked at every ε and corrupted at every severity; the probabilities are collected and scored at
the end (:mod:`medtricks.audit.scoring`) with ``medtricks.evaluate.compute_metrics`` (bootstrap CIs), so
every audit number comes with its CI. The arguments are checked first (:mod:`medtricks.audit.plan`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from medtricks.audit.adversarial import SQUARE_QUERIES, _frozen, normalized_model
from medtricks.audit.plan import plan_audit
from medtricks.audit.report import AuditResult
from medtricks.audit.scoring import score_sweep
from medtricks.audit.sweep import AuditSweep

__all__ = ["run_audit", "DEFAULT_EPS"]

#: Default ε grid in [0, 1] pixel units: 0, 0.5, 1, 2, 4, 8 grey levels of 255.
DEFAULT_EPS = (0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)


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
    plan = plan_audit(
        classes=classes,
        mean=mean,
        std=std,
        attacks=attacks,
        eps=eps,
        pgd_steps=pgd_steps,
        corruptions=corruptions,
        severities=severities,
        n=n,
        surrogate=surrogate,
        target_class=target_class,
        seed=seed,
        n_bootstrap=n_bootstrap,
        square_queries=square_queries,
        masking=masking,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if surrogate is not None and "transfer" not in plan.attacks:
        warnings.warn(
            "run_audit: a surrogate was given but 'transfer' is not in attacks; the surrogate is unused",
            UserWarning,
            stacklevel=2,
        )

    sweep = AuditSweep(plan)
    with contextlib.ExitStack() as stack:
        for module in [model] + ([surrogate] if "transfer" in plan.attacks else []):
            stack.enter_context(_on_device(module, device))
            stack.enter_context(_frozen(module))
        sweep.model = model
        sweep.model01 = normalized_model(model, plan.mean, plan.std)
        if "transfer" in plan.attacks:
            sweep.surrogate01 = normalized_model(surrogate, plan.mean, plan.std)
        sweep.collect(loader, device, progress)
    result = score_sweep(sweep, device=device)
    failed = [c for c in result.masking if not c["passed"]]
    if failed:
        warnings.warn(
            "possible gradient masking -- do not trust the robust accuracy until a stronger attack "
            "confirms it: " + "; ".join(f"{c['check']}: {c['detail']}" for c in failed),
            RuntimeWarning,
            stacklevel=2,
        )
    return result


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
