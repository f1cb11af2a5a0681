"""What an ablation returns and leaves behind: :class:`AblationResult` (the table, the children, the notes)
and its outputs -- Markdown, CSVs and the forest plot in the ablation folder and on the parent run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from medtricks.ablation.children import _slug
from medtricks.ablation.table_format import forest_figure, format_ablation_markdown
from medtricks.evaluate.markdown import is_finite

__all__ = ["AblationResult"]


@dataclass
class AblationResult:
    """What :func:`run_ablation` returns.

    Attributes:
        table: one row per variant: ``n_seeds``, ``mean``, ``ci_low``, ``ci_high`` (over seeds),
            ``delta`` / ``delta_ci_low`` / ``delta_ci_high`` / ``delta_p_value`` / ``verdict`` (paired
            vs the baseline), ``boot_*`` (image bootstrap), ``delta_prev*`` (cumulative mode).
        children: one row per finished child run: variant, seed, run_id, value and its bootstrap CI.
        failed: ``{"variant", "seed", "error"}`` for every child that failed in this call.
    """

    table: pd.DataFrame
    children: pd.DataFrame
    metric: str
    mode: str
    ablation_id: str
    variants: list[tuple[str, list[str]]]
    seeds: list[int]
    parent_run_id: Optional[str] = None
    output_dir: Optional[Path] = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    tricks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sequential: Optional[dict[str, Any]] = None  # seeds until the answer is clear: looks, boundary, stop

    def labels(self) -> dict[str, str]:
        """Row labels for display: in cumulative mode only the trick each row adds (``+ cosine``)."""
        if self.mode != "cumulative" or len(self.tricks) != len(self.variants) - 1:
            return {}
        return {name: f"+ {trick}" for (name, _), trick in zip(self.variants[1:], self.tricks)}

    def markdown(self) -> str:
        """The table as Markdown, with a title and the notes (what ``medtricks ablate`` prints)."""
        title = (
            f"Ablation {self.ablation_id} ({self.mode}, {len(self.seeds)} seeds: "
            f"{', '.join(str(s) for s in self.seeds)}) — {self.metric}"
        )
        if self.sequential:
            title += f" — seeds until ±{self.sequential['until_ci']:g} (max {self.sequential['max_seeds']})"
        return format_ablation_markdown(
            self.table, metric=self.metric, title=title, notes=self.notes, labels=self.labels()
        )

    def to_csv(self, path: Optional[str | Path] = None) -> str:
        """The table as CSV text; also written to ``path`` when given."""
        text = self.table.to_csv(index=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def _write_outputs(result: AblationResult, parent, say) -> None:
    """Markdown, CSVs and the forest plot into the ablation folder and onto the parent run."""
    import matplotlib.pyplot as plt

    out = result.output_dir
    md = result.markdown()
    (out / "ablation_table.md").write_text(md)
    result.to_csv(out / "ablation_table.csv")
    result.children.to_csv(out / "children.csv", index=False)
    files = [out / "ablation_table.md", out / "ablation_table.csv", out / "children.csv"]
    if result.table["mean"].map(is_finite).any():
        fig = forest_figure(result.table, metric=result.metric, labels=result.labels())
        fig.savefig(out / "forest.png", dpi=120, bbox_inches="tight")  # keep long labels inside
        plt.close(fig)
        files.append(out / "forest.png")
    say("")
    say(md)
    say(f"table, CSV and forest plot: {out}")
    if parent is None:
        return
    for path in files:
        parent.log_artifact(path, "ablation")
    metrics = {}
    for i, row in result.table.iterrows():
        prefix = f"ablation/v{i:02d}_{_slug(str(row['variant']))}"
        for col in ("mean", "ci_low", "ci_high", "delta", "delta_p_value", "n_seeds"):
            if is_finite(row.get(col)):
                metrics[f"{prefix}/{col}"] = float(row[col])
    parent.log_metrics(metrics)
    complete = not result.failed and len(result.children) == len(result.variants) * len(result.seeds)
    tags = {
        "ablation.status": "complete" if complete else "incomplete",
        "ablation.failed": str(len(result.failed)),
        "ablation.seeds": ",".join(str(s) for s in result.seeds),
    }
    if result.sequential:
        tags.update(
            {
                "ablation.until_ci": f"{result.sequential['until_ci']:g}",
                "ablation.sequential": f"{result.sequential['boundary']}, looks "
                f"{result.sequential['looks']}: {result.sequential['reason']}"[:5000],
            }
        )
    parent.set_tags(tags)
    parent.end("FAILED" if result.failed else "FINISHED")
