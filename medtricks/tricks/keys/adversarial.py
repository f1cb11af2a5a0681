"""The ``tricks.adversarial`` section, its ablation name and tag; the attacks and the training code are
:mod:`medtricks.tricks.adversarial` (torch)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["AdversarialConfig", "AdversarialTrainingKeys", "METHODS"]

METHODS = ("none", "pgd", "fgsm_rs", "trades")
_DEFAULT_EPS = 1 / 255


class AdversarialConfig(Section):
    """``tricks.adversarial``: train on adversarial images, attacked in ``[0, 1]`` pixel units within an L∞ budget,
    as ``medtricks audit`` attacks them (each method as its authors' reference code does it)."""

    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "none",
        description="none (off); pgd: PGD adversarial training (Madry et al. 2018, ≈ steps + 1 x the cost); "
        "fgsm_rs: one step from a random start (Wong et al. 2020, ≈ 2x); trades: the clean loss plus beta x "
        "KL(adversarial ‖ clean) (Zhang et al. 2019)",
    )
    eps: float = Field(
        _DEFAULT_EPS,
        gt=0.0,
        le=1.0,
        description="the L∞ budget in pixel units, 0 < eps <= 1 (0.00392 = 1/255, the default), the unit "
        "`medtricks audit` reads",
    )
    steps: Optional[int] = Field(
        None, ge=1, description="attack steps per batch; null: pgd 7, trades 10 (fgsm_rs always takes 1)"
    )
    alpha: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="step size in pixel units; null: pgd 2.5 eps / steps, fgsm_rs 1.25 eps, trades eps / 4",
    )
    ratio: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of each batch replaced by adversarial images, 0 < ratio <= 1 (pgd, fgsm_rs; 0.5: "
        "half-and-half as Goodfellow et al.); trades attacks every image",
    )
    beta: float = Field(
        6.0, ge=0.0, description="TRADES' weight of the KL term (the paper's 6 for CIFAR-10); trades only"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "AdversarialConfig":
        if self.method == "fgsm_rs" and self.steps not in (None, 1):
            raise ValueError(
                f"tricks.adversarial.steps = {self.steps}: fgsm_rs takes exactly one step; use method: pgd for more"
            )
        if self.method == "trades" and self.ratio != 1.0:
            raise ValueError(
                f"tricks.adversarial.ratio = {self.ratio}: TRADES attacks every image (its KL term "
                "is on the whole batch); leave ratio at 1.0"
            )
        return self

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else {"pgd": 7, "trades": 10}.get(self.method, 1)

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        if self.method == "fgsm_rs":
            return 1.25 * self.eps
        if self.method == "trades":
            return self.eps / 4
        return 2.5 * self.eps / self.resolved_steps()


@register_trick
class AdversarialTrainingKeys(Trick):
    """Adversarial training (PGD, FGSM-RS or TRADES) in pixel space."""

    name = "adversarial"
    order = 75  # after mixup (70): the attack sees the batch the model trains on
    fields = {
        "adversarial": (AdversarialConfig, Field(default_factory=AdversarialConfig, description="adversarial training"))
    }
    ablation = {
        "adversarial": AblationName(
            "tricks.adversarial.method",
            None,
            "adversarial training: pgd, fgsm_rs or trades (eps: tricks.adversarial.eps, default 1/255)",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.adversarial import AdversarialTraining  # torch: loaded when a run builds its tricks

        return AdversarialTraining if cls is AdversarialTrainingKeys else cls

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.adversarial
        return [] if cfg.method == "none" else [f"adversarial={cfg.method}@{cfg.eps * 255:.3g}/255"]
