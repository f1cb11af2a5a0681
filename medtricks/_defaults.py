"""Defaults that several layers share, defined once at the bottom of the package (imports nothing).

The recipe schema (:mod:`medtricks.recipe`) uses them for its defaults; code below or beside it (the
engine, plots, the command line, the ablation tables) uses the same constant, so a default is changed in
one place.
"""

from __future__ import annotations

__all__ = ["DEFAULT_METRIC"]

#: The metric that picks the best checkpoint (``train.best_metric``), that ablations tabulate
#: (``ablation.metric``) and that ``medtricks compare`` sorts by: the validation AUROC.
DEFAULT_METRIC = "val/auroc"
