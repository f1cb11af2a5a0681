"""What Noisy Student self-training returns and leaves behind: :class:`SelfTrainResult` (one row per round),
its Markdown table, the per-round plot, and the files written into the self-training folder and onto the
parent run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from medtricks.evaluate.markdown import fmt_mean_ci, fmt_num, is_finite, markdown_table

__all__ = ["SelfTrainResult", "plot_rounds"]

_METRICS = ("auroc", "accuracy")  # a round's row: these on val (and test), best checkpoint, with CIs
_COLUMNS = [
    "round",
    "model",
    "teacher_round",
    "val_auroc",
    "val_auroc_ci_low",
    "val_auroc_ci_high",
    "val_accuracy",
    "val_accuracy_ci_low",
    "val_accuracy_ci_high",
    "test_auroc",
    "test_auroc_ci_low",
    "test_auroc_ci_high",
    "test_accuracy",
    "test_accuracy_ci_low",
    "test_accuracy_ci_high",
    "pseudo_kept",
    "run_id",
    "run_dir",
    "ran",
]


@dataclass
class SelfTrainResult:
    """What :func:`run_self_train` returns: ``table`` has one row per round (columns ``round``, ``model``,
    ``teacher_round``, ``val_auroc`` / ``val_accuracy`` with ``_ci_low`` / ``_ci_high``, the same for
    ``test_`` when the recipe has a test split, ``pseudo_kept``, ``run_id``, ``run_dir``, ``ran``: False
    for a round finished by an earlier call)."""

    table: pd.DataFrame
    self_train_id: str
    rounds: int
    parent_run_id: Optional[str] = None
    output_dir: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    @property
    def final_run_dir(self) -> Optional[str]:
        """The last round's run folder (the promoted student)."""
        return None if self.table.empty else str(self.table["run_dir"].iloc[-1])

    def markdown(self) -> str:
        """The table as Markdown with a title and notes (what ``medtricks self-train`` prints)."""
        has_test = self.table["test_auroc"].map(is_finite).any() if len(self.table) else False
        header = ["round", "model", "teacher", "val AUROC [CI]", "val accuracy [CI]"]
        if has_test:
            header += ["test AUROC [CI]", "test accuracy [CI]"]
        header += ["pseudo kept"]
        rows = []
        for r in self.table.itertuples():
            row = [
                r.round,
                r.model,
                "-" if r.teacher_round is None or not is_finite(r.teacher_round) else f"round {int(r.teacher_round)}",
                fmt_mean_ci(r.val_auroc, r.val_auroc_ci_low, r.val_auroc_ci_high),
                fmt_mean_ci(r.val_accuracy, r.val_accuracy_ci_low, r.val_accuracy_ci_high),
            ]
            if has_test:
                row += [
                    fmt_mean_ci(r.test_auroc, r.test_auroc_ci_low, r.test_auroc_ci_high),
                    fmt_mean_ci(r.test_accuracy, r.test_accuracy_ci_low, r.test_accuracy_ci_high),
                ]
            row += [fmt_num(r.pseudo_kept, 3)]
            rows.append(row)
        notes = list(self.notes)
        notes.append(
            "val: the split that also chose each round's checkpoint, not held out"
            + ("" if has_test else "; set data.test_fraction for held-out numbers")
        )
        notes.append("pseudo kept: share of unlabelled images above tricks.pseudo_label.threshold in the last epoch")
        title = f"Noisy Student self-training {self.self_train_id} ({self.rounds} student round(s))"
        return "\n".join([f"### {title}", "", markdown_table(header, rows), "", *[f"- {n}" for n in notes]])


def plot_rounds(table: pd.DataFrame):
    """Val (and test, when present) AUROC and accuracy per round, with their CIs: a matplotlib Figure
    on the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 + 0.4 * len(table), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rounds = table["round"].astype(int).tolist()
    styles = {"val": "-", "test": "--"}
    for split in ("val", "test"):
        for metric, marker in zip(_METRICS, ("o", "s")):
            col = f"{split}_{metric}"
            values = pd.to_numeric(table[col], errors="coerce")
            if not values.map(is_finite).any():
                continue
            low = pd.to_numeric(table[f"{col}_ci_low"], errors="coerce")
            high = pd.to_numeric(table[f"{col}_ci_high"], errors="coerce")
            err = [(values - low).clip(lower=0).fillna(0).tolist(), (high - values).clip(lower=0).fillna(0).tolist()]
            ax.errorbar(
                rounds,
                values.tolist(),
                yerr=err,
                marker=marker,
                linestyle=styles[split],
                capsize=3,
                label=f"{split} {metric}",
            )
    ax.set_xticks(rounds)
    ax.set_xticklabels(["0\n(teacher)" if r == 0 else str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("metric (best checkpoint)")
    ax.set_title("Noisy Student: metrics per round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _write_outputs(result: SelfTrainResult, parent, say) -> None:
    """Markdown, CSV and the per-round plot into the self-training folder and onto the parent run."""
    out = result.output_dir
    md = result.markdown()
    (out / "self_train_table.md").write_text(md + "\n")
    result.table.to_csv(out / "self_train_rounds.csv", index=False)
    files = [out / "self_train_table.md", out / "self_train_rounds.csv"]
    fig = plot_rounds(result.table)
    fig.savefig(out / "rounds.png", dpi=120)
    files.append(out / "rounds.png")
    say("")
    say(md)
    say(f"table, CSV and plot: {out}")
    say(f"final student (promoted): {result.final_run_dir}")
    for path in files:
        parent.log_artifact(path, "self_train")
    final = result.table.iloc[-1]
    parent.set_tags(
        {
            "self_train.status": "complete",
            "self_train.final_run_dir": str(final["run_dir"]),
            "self_train.final_run_id": str(final["run_id"]),
        }
    )
    parent.end("FINISHED")
