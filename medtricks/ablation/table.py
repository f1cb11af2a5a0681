"""Ablation and comparison tables: per-seed values in, mean ± CI, paired deltas and verdicts out.

Two sources of uncertainty are reported side by side:

* **seeds** (the unit that matters for "does this trick help?"): mean with a Student-t interval
  (:func:`medtricks.evaluate.stats.mean_ci`) and a paired test against the reference variant over
  the seeds both share (:func:`medtricks.evaluate.stats.paired_comparison`, paired t or Wilcoxon);
* **images**: a paired bootstrap over the evaluation images of the seed-averaged metric difference
  (same resampled images for both variants and every seed), from the children's saved predictions.

The verdict (helps / hurts / no evidence) comes from the seed-level test.

This module is the tables' public home; the pieces, by concern:

- :mod:`medtricks.ablation.table_metric` -- which logged keys a table metric reads, which direction is better;
- :mod:`medtricks.ablation.seed_stats` -- mean ± CI over seeds and the paired deltas and verdicts;
- :mod:`medtricks.ablation.table_format` -- the tables as Markdown and the forest plot;
- :mod:`medtricks.ablation.compare` -- ``medtricks compare``: runs read from a run store, side by side.

Example::

    >>> import pandas as pd
    >>> runs = pd.DataFrame({"variant": ["baseline"] * 3 + ["+warmup"] * 3, "seed": [0, 1, 2] * 2,
    ...                      "value": [0.80, 0.82, 0.81, 0.84, 0.85, 0.85]})
    >>> table = summarize_groups(runs, ["baseline", "+warmup"])
    >>> table.loc[1, "verdict"]
    'helps'
"""

from __future__ import annotations

from medtricks.ablation.compare import _group_order, _paired_vs_reference, _seed_of, compare_runs, runs_frame  # noqa: F401
from medtricks.ablation.seed_stats import _TEST_NAMES, pairing_gain, summarize_groups  # noqa: F401
from medtricks.ablation.table_format import format_ablation_markdown, format_runs_markdown, forest_figure
from medtricks.ablation.table_metric import _LOWER_IS_BETTER, higher_is_better, metric_keys  # noqa: F401
from medtricks.evaluate.markdown import markdown_table

# image_bootstrap_delta and load_predictions moved to evaluate/paired.py; importable from here as before
from medtricks.evaluate.paired import image_bootstrap_delta, load_predictions, stored_image_set  # noqa: F401
from medtricks.rundir import PREDICTIONS_ARTIFACT_DIR, PREDICTIONS_FILE, RunDir, best_key, ci_keys  # noqa: F401

__all__ = [
    "metric_keys",
    "higher_is_better",
    "summarize_groups",
    "pairing_gain",
    "image_bootstrap_delta",
    "format_ablation_markdown",
    "format_runs_markdown",
    "forest_figure",
    "markdown_table",
    "compare_runs",
    "runs_frame",
    "load_predictions",
    "PREDICTIONS_FILE",
]

# Where a run leaves its per-image predictions on an evaluation split (``{split}`` = val | test):
# an .npz with ``y_true`` (N,) int labels and ``probs`` (N, K) softmax probabilities, written in the
# run folder and logged as the store artifact ``RunDir.predictions_artifact(split)`` (names: medtricks.rundir).
