"""The ``tricks.drloc`` section, its ablation name and tag; the head and the loss are :mod:`medtricks.tricks.drloc`
(torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["DrlocConfig", "DrlocKeys", "MODES"]

MODES = ("l1", "ce")


class _DrlocSection(Section):
    @property
    def weight(self) -> float:
        """``lambda``, the term's weight (``lambda`` is a Python keyword: read it here)."""
        return getattr(self, "lambda")


# A field literally named ``lambda`` (a class body cannot declare it): the recipe key, the resolved
# recipe.yaml, the MLflow params and pydantic's errors all say ``tricks.drloc.lambda``.
DrlocConfig = create_model(
    "DrlocConfig",
    __base__=_DrlocSection,
    __module__=__name__,
    **{
        "lambda": (float, Field(0.0, ge=0.0, description="weight of the DRLoc term in the batch loss (>= 0); 0 = off")),
        "pairs": (
            int,
            Field(64, ge=1, description="pairs of grid positions drawn per image and batch (with replacement)"),
        ),
        "mode": (
            Literal[MODES],
            Field(
                "l1",
                description="l1: regress the pair's offset normalised by the grid size (the paper's); ce: "
                "classify the row and the column offset (the authors' code's ce mode)",
            ),
        ),
    },
)  # type: ignore[valid-type]
DrlocConfig.__doc__ = """``tricks.drloc``: DRLoc, the dense relative localization loss (Liu et al., NeurIPS 2021): a
small MLP predicts the offset between two positions of the final grid of embeddings from their two embeddings, a
self-supervised term that helps vision transformers trained on little data."""


@register_trick
class DrlocKeys(Trick):
    """DRLoc relative-localization loss on the final grid of embeddings."""

    name = "drloc"
    # Its transform_batch arms the feature hook: it must come after every transform_batch that runs the model
    # (adversarial, 75); the hook then keeps the first pass through the feature module, the training
    # forward, and not the later passes of TRADES (75) or pseudo-labelling (86) in extra_loss.
    order = 95
    fields = {
        "drloc": (DrlocConfig, Field(default_factory=DrlocConfig, description="DRLoc relative-localization loss"))
    }
    ablation = {
        "drloc": AblationName(
            "tricks.drloc.lambda",
            "0.1",
            "DRLoc relative-localization loss on the final token grid (Liu et al. 2021); "
            "drloc=LAMBDA (pairs/mode: tricks.drloc.*)",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.drloc import Drloc  # torch: loaded when a run builds its tricks

        return Drloc if cls is DrlocKeys else cls

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.drloc
        if cfg.weight == 0:
            return []
        return [f"drloc={cfg.weight:g}" + ("" if cfg.mode == "l1" else f"({cfg.mode})")]
