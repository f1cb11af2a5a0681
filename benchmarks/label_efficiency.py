"""Label efficiency on real X-rays (issue 17): labelled fractions {2 %, 10 %, 100 %} of the Kermany
training patients x {supervised baseline, bag of tricks, + Noisy Student (2 rounds), + distillation
from the 100 % teacher} x seeds, every number on the held-out *test* split (never seen by training or
checkpoint selection). Prints and saves mean and 95 % t-interval over seeds of AUROC, accuracy,
sensitivity and specificity (at the recipe's operating point: Youden's J on validation), and the paired
Δ AUROC against the supervised baseline of the same fraction.

    python -m benchmarks.label_efficiency                      # real Kermany data (recipe's data.root)
    python -m benchmarks.label_efficiency --seeds 0 1 2
    python -m benchmarks.label_efficiency --quick --out /tmp/b # phantoms, tiny model: a smoke run
    python -m benchmarks.label_efficiency --variants baseline tricks fixmatch   # FixMatch against its references

The variants (recipes/kermany_label_efficiency.yaml, 48 px):

- ``baseline``: the recipe without the bag of tricks' schedule refinements -- step decay at 1/2 and 3/4
  of training, no warmup, weight decay on every parameter (class-weighted loss and the augmentation
  are kept: they are data choices, not tricks under test);
- ``tricks``: the recipe as shipped (warmup, cosine decay, no bias decay);
- ``noisy_student``: ``medtricks self-train --rounds 2`` on the ``tricks`` recipe (round 0, the teacher,
  *is* the ``tricks`` run: the row reuses it); the students are noised with the Noisy Student defaults
  (dropout 0.5, stochastic depth 0.2, ``cxr_shift``) and see the unlabelled pool pseudo-labelled at
  >= 0.95 confidence;
- ``distill``: the ``tricks`` recipe plus ``tricks.distill`` from the 100 % ``tricks`` run of the same
  seed (T = 4, alpha 0.5 on the labelled images) and the same teacher's soft labels on the whole unlabelled
  pool (``tricks.pseudo_label`` with ``teacher``, ``soft``, threshold 0): the teacher had every label, so
  this row is an upper reference for what a label-efficient method could reach, not a method a user
  with few labels can run;
- ``fixmatch`` (issue 33; not in the default ``--variants``, add it by name): ``recipes/kermany_fixmatch.yaml``
  -- the ``tricks`` recipe plus ``tricks.fixmatch`` (threshold 0.95, mu 7, lambda_u 1, strong view
  ``cxr_strong``) on the unlabelled pool; fractions below 100 % only (at 100 % there is no pool);
- ``mpl`` (issue 33; add it by name): ``recipes/kermany_mpl.yaml`` -- the ``tricks`` recipe plus
  ``tricks.mpl`` (Meta Pseudo Labels, first-order teacher update with UDA, mu 7, strong view ``cxr_strong``),
  the last quarter of the epochs (at least 1) fine-tuning the student on the labels; fractions below 100 % only;
- ``mpl_teacher`` (add it by name): ``mpl`` with the teacher starting from the ``tricks`` run of the same labels and
  seed (Noisy Student's round 0) instead of a copy of the ImageNet model (``tricks.mpl.teacher``);
- ``mpl_supervised`` (add it by name): ``mpl_teacher`` with the student also learning from the labelled batch
  during MPL (``tricks.mpl.student_labeled_weight: 1``; the paper: 0);
- ``reinit_late`` (issue 28; add it by name): the ``tricks`` recipe plus ``tricks.reinit_late: {stages: 1}``
  (the last residual stage starts from timm's init after the ImageNet load), as
  ``recipes/kermany_few_labels.yaml`` ships it at 10 %.

Epochs scale with the fraction (100 %: 1, 10 %: 4, 2 %: 12) so that every run makes a similar order
of updates (~30-115 steps of 32 labelled images; what fits a 2-core CPU); the labelled subset is drawn
with ``data.split_seed`` and is the same for every seed (seeds vary the training only).

Resumable: each (fraction, variant, seed) writes ``<out>/label_efficiency_runs/<name>.json`` when it
finishes and ``self-train`` skips its finished rounds; runs use the local run store
(``tracking.backend: none``), one after the other (two trainings on two cores slow each other 5-10x).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    cached_row,
    format_table,
    machine_info,
    now,
    results_dir,
    write_results,
)

RECIPE = REPO_ROOT / "recipes" / "kermany_label_efficiency.yaml"
FIXMATCH_RECIPE = REPO_ROOT / "recipes" / "kermany_fixmatch.yaml"  # RECIPE + tricks.fixmatch
MPL_RECIPE = REPO_ROOT / "recipes" / "kermany_mpl.yaml"  # RECIPE + tricks.mpl
FRACTIONS = {0.02: 12, 0.1: 4, 1.0: 1}  # labelled fraction -> epochs (similar number of updates)
QUICK_FRACTIONS = {0.3: 2, 1.0: 1}
VARIANTS = (
    "baseline",
    "tricks",
    "noisy_student",
    "distill",
    "fixmatch",
    "mpl",
    "mpl_teacher",
    "mpl_supervised",
    "reinit_late",
)
REINIT_LATE = ["tricks.reinit_late.stages=1"]  # recipes/kermany_few_labels.yaml's trick (issue 28)
DEFAULT_VARIANTS = ("baseline", "tricks", "noisy_student", "distill")  # the table in docs/few-labels.md
ROUNDS = 2
DISTILL = [
    "tricks.distill.temperature=4",
    "tricks.distill.alpha=0.5",
    "tricks.pseudo_label.enabled=true",
    "tricks.pseudo_label.soft=true",
    "tricks.pseudo_label.threshold=0.0",
]
QUICK = [
    "data.root={tmp}/phantoms",
    "data.synth.n=120",
    "data.synth.size=32",
    "data.image_size=32",
    "data.card=synthetic-phantoms",
    "model.name=resnet18",
    "model.weights=none",
    "model.in_chans=1",
    "train.batch_size=16",
    "eval.n_bootstrap=50",
    "data.test_by=random",
    "tricks.class_balance=none",
    "eval.threshold=none",
]
METRICS = ("auroc", "accuracy", "sensitivity", "specificity")


def baseline_overrides(epochs: int) -> list[str]:
    """The supervised baseline: step decay at 1/2 and 3/4 of training, no warmup, decay on every parameter."""
    return [
        "schedule.name=step",
        "schedule.warmup_epochs=0",
        "tricks.no_bias_decay=false",
        f"schedule.milestones=[{epochs / 2:g},{epochs * 0.75:g}]",
    ]


def mpl_overrides(epochs: int) -> list[str]:
    """Meta Pseudo Labels: the last quarter of the epochs (at least 1) fine-tunes the student on the labels."""
    return [f"tricks.mpl.finetune_epochs={max(1, math.ceil(epochs / 4))}"]


def _recipe(
    fraction: float, epochs: int, seed: int, extra: list[str], args, out: Path, tmp: Path, recipe: Path = RECIPE
):
    from medtricks.recipe import load_recipe

    overrides = [
        f"experiment.seed={seed}",
        "tracking.backend=none",
        f"experiment.output_dir={out / 'runs'}",
        "train.progress=false",
        f"train.epochs={epochs}",
        f"data.label_fraction={'null' if fraction >= 1.0 else fraction}",
        *extra,
    ]
    if args.quick:
        overrides += [o.format(tmp=tmp) for o in QUICK]
    elif args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    return load_recipe(recipe, overrides=overrides)


def test_metrics(run_dir: str | Path, positive: str) -> dict[str, float]:
    """The run's final held-out test metrics (its local run store): AUROC, and accuracy / sensitivity /
    specificity of ``positive`` at the stored operating point (``best/test/op/...``; at 0.5 without one)."""
    from medtricks.rundir import RunDir

    last: dict[str, float] = {}
    for line in RunDir(run_dir).store_metrics.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            last[item["key"]] = float(item["value"])
    op = "best/test/op/" if "best/test/op/accuracy" in last else "best/test/"
    if "best/test/auroc" not in last:
        raise RuntimeError(f"{run_dir}: no best/test/auroc in its run store (the recipe needs a test split)")
    return {
        "auroc": last["best/test/auroc"],
        "accuracy": last[op + "accuracy"],
        "sensitivity": last.get(f"{op}sensitivity/{positive}", math.nan),
        "specificity": last.get(f"{op}specificity/{positive}", math.nan),
        "n_test": last.get("best/test/n", math.nan),
        "operating_point": op.endswith("op/"),
    }


def _train(recipe) -> tuple[str, float]:
    from medtricks.run import run_recipe

    started = time.perf_counter()
    result = run_recipe(recipe, quiet=True)
    return str(result.run_dir), time.perf_counter() - started


def _self_train(recipe) -> tuple[list[dict[str, Any]], float]:
    from medtricks.self_train import run_self_train

    started = time.perf_counter()
    result = run_self_train(recipe, rounds=ROUNDS, quiet=True)
    rows = [
        {
            "round": int(r["round"]),
            "run_dir": str(r["run_dir"]),
            "pseudo_kept": None
            if r.get("pseudo_kept") is None or r.get("pseudo_kept") != r.get("pseudo_kept")
            else float(r["pseudo_kept"]),
        }
        for r in result.table.to_dict("records")
    ]
    return rows, time.perf_counter() - started


def run_seed(
    seed: int, fractions: dict[float, int], variants, args, out: Path, tmp: Path, positive: str
) -> list[dict[str, Any]]:
    """Every (fraction, variant) of one seed; the 100 % ``tricks`` run first (the distillation teacher)."""
    per_run = out / "label_efficiency_runs"
    per_run.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def plain(fraction: float, variant: str, extra: list[str], recipe: Path = RECIPE) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            print(f"{now()} {variant} @ {fraction:.0%} seed {seed}: training ...", flush=True)
            run_dir, seconds = _train(_recipe(fraction, fractions[fraction], seed, extra, args, out, tmp, recipe))
            row = {
                "fraction": fraction,
                "variant": variant,
                "seed": seed,
                "run_dir": run_dir,
                "train_s": seconds,
                **test_metrics(run_dir, positive),
            }
            print(f"  {seconds:.0f} s, test AUROC {row['auroc']:.3f}", flush=True)
            return row

        return cached_row(per_run / f"{variant}-f{fraction:g}-s{seed}.json", make)

    ordered = sorted(fractions, reverse=True)  # 100 % first: its tricks run teaches the distill rows
    teacher: Optional[str] = None
    for fraction in ordered:
        epochs = fractions[fraction]
        if "baseline" in variants:
            rows.append(plain(fraction, "baseline", baseline_overrides(epochs)))
        if fraction >= 1.0:
            row = plain(fraction, "tricks", [])
            teacher = row["run_dir"]
            if "tricks" in variants:
                rows.append(row)
            if "reinit_late" in variants:
                rows.append(plain(fraction, "reinit_late", REINIT_LATE))
            continue
        if {"tricks", "noisy_student", "mpl_teacher", "mpl_supervised"} & set(variants):

            def make_ns(fraction=fraction, epochs=epochs) -> dict[str, Any]:
                print(f"{now()} self-train ({ROUNDS} rounds) @ {fraction:.0%} seed {seed} ...", flush=True)
                rounds, seconds = _self_train(_recipe(fraction, epochs, seed, [], args, out, tmp))
                print(f"  {seconds:.0f} s for {len(rounds)} runs", flush=True)
                return {"fraction": fraction, "seed": seed, "rounds": rounds, "train_s": seconds}

            ns = cached_row(per_run / f"self_train-f{fraction:g}-s{seed}.json", make_ns)
            by_round = {r["round"]: r for r in ns["rounds"]}
            share = ns["train_s"] / max(len(by_round), 1)  # self-train wall time split evenly over its runs
            if "tricks" in variants:
                rows.append(
                    {
                        "fraction": fraction,
                        "variant": "tricks",
                        "seed": seed,
                        "train_s": share,
                        "run_dir": by_round[0]["run_dir"],
                        **test_metrics(by_round[0]["run_dir"], positive),
                    }
                )
            if "noisy_student" in variants:
                last = by_round[max(by_round)]
                rows.append(
                    {
                        "fraction": fraction,
                        "variant": "noisy_student",
                        "seed": seed,
                        "train_s": share * (len(by_round)),
                        "run_dir": last["run_dir"],
                        "pseudo_kept": [by_round[k]["pseudo_kept"] for k in sorted(by_round) if k > 0],
                        **test_metrics(last["run_dir"], positive),
                    }
                )
        if "distill" in variants:
            if teacher is None:
                raise RuntimeError("the distill variant needs the 100 % fraction (its teacher)")
            rows.append(
                plain(
                    fraction,
                    "distill",
                    [f"tricks.distill.teacher={teacher}", f"tricks.pseudo_label.teacher={teacher}", *DISTILL],
                )
            )
        if "fixmatch" in variants:
            rows.append(plain(fraction, "fixmatch", [], FIXMATCH_RECIPE))
        if "mpl" in variants:
            rows.append(plain(fraction, "mpl", mpl_overrides(epochs), MPL_RECIPE))
        if "mpl_teacher" in variants:  # the teacher starts from the supervised tricks run of these labels
            start = [f"tricks.mpl.teacher={by_round[0]['run_dir']}"]
            rows.append(plain(fraction, "mpl_teacher", [*mpl_overrides(epochs), *start], MPL_RECIPE))
        if "mpl_supervised" in variants:  # ... and the student keeps learning from the labels too
            start = [f"tricks.mpl.teacher={by_round[0]['run_dir']}", "tricks.mpl.student_labeled_weight=1"]
            rows.append(plain(fraction, "mpl_supervised", [*mpl_overrides(epochs), *start], MPL_RECIPE))
        if "reinit_late" in variants:
            rows.append(plain(fraction, "reinit_late", REINIT_LATE))
    return rows


def summarize(rows: list[dict[str, Any]], fractions, variants) -> list[dict[str, Any]]:
    """One line per (fraction, variant): mean [95% t-interval] over seeds, and the paired Δ AUROC vs the
    baseline of the same fraction and vs the 100 % baseline."""
    from medtricks.evaluate.stats import mean_ci, paired_comparison

    def fmt(values: list[float]) -> str:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return "n/a"
        mean, low, high = mean_ci(values)
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{mean:.3f}"

    def delta(mine: list[dict], ref: list[dict]) -> str:
        ref_by_seed = {r["seed"]: r["auroc"] for r in ref}
        pairs = [(r["auroc"], ref_by_seed[r["seed"]]) for r in mine if r["seed"] in ref_by_seed]
        if len(pairs) < 2:
            return "n/a"
        cmp = paired_comparison([a for a, _ in pairs], [b for _, b in pairs])
        return f"{cmp['delta_mean']:+.3f} [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]"

    full_base = [r for r in rows if r["fraction"] >= 1.0 and r["variant"] == "baseline"]
    out = []
    for fraction in sorted(fractions):
        base = [r for r in rows if r["fraction"] == fraction and r["variant"] == "baseline"]
        tricks = [r for r in rows if r["fraction"] == fraction and r["variant"] == "tricks"]
        for variant in variants:
            mine = sorted(
                (r for r in rows if r["fraction"] == fraction and r["variant"] == variant), key=lambda r: r["seed"]
            )
            if not mine:
                continue
            line: dict[str, Any] = {
                "labels": f"{fraction:.0%}",
                "variant": variant,
                "seeds": ",".join(str(r["seed"]) for r in mine),
            }
            for metric in METRICS:
                line[metric] = fmt([r[metric] for r in mine])
            line["Δ AUROC vs baseline"] = "(reference)" if variant == "baseline" else delta(mine, base)
            line["Δ AUROC vs tricks"] = (
                "(reference)" if variant == "tricks" else "n/a" if variant == "baseline" else delta(mine, tricks)
            )
            line["Δ AUROC vs 100% baseline"] = (
                "(reference)" if fraction >= 1.0 and variant == "baseline" else delta(mine, full_base)
            )
            line["train min (median)"] = f"{statistics.median(r['train_s'] for r in mine) / 60:.1f}"
            out.append(line)
    return out


MARKDOWN_COLUMNS = (
    ("labels", "labels"),
    ("variant", "variant"),
    ("seeds", "seeds"),
    ("AUROC", "auroc"),
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("Δ AUROC vs baseline (same labels)", "Δ AUROC vs baseline"),
    ("Δ AUROC vs tricks (same labels)", "Δ AUROC vs tricks"),
    ("Δ AUROC vs 100 % baseline", "Δ AUROC vs 100% baseline"),
    ("min/run", "train min (median)"),
)


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The table as docs/few-labels.md shows it (a true minus sign; tests/docs/test_docs_numbers.py checks the
    page against this file's ``table``)."""

    def cell(line: dict[str, Any], key: str) -> str:
        value = str(line.get(key, "n/a"))
        return value.replace("%", " %") if key == "labels" else value.replace("-", "−")

    head = "| " + " | ".join(title for title, _ in MARKDOWN_COLUMNS) + " |"
    rule = "|" + "---|" * len(MARKDOWN_COLUMNS)
    body = ["| " + " | ".join(cell(line, key) for _, key in MARKDOWN_COLUMNS) + " |" for line in table]
    return "\n".join([head, rule, *body])


def goal(rows: list[dict[str, Any]]) -> Optional[str]:
    """The targets: issue 17 (at 10 % labels, Noisy Student within 0.01 AUROC of fully supervised) and issue 33
    (at 2 % labels a semi-supervised method >= 0.96 test AUROC; at 10 % one within 0.005 of full supervision)."""
    from medtricks.evaluate.stats import mean_ci

    def mean_of(fraction: float, variant: str) -> Optional[float]:
        values = [r["auroc"] for r in rows if r["fraction"] == fraction and r["variant"] == variant]
        return statistics.mean(values) if values else None

    full_means = [m for v in ("baseline", "tricks") if (m := mean_of(1.0, v)) is not None]
    if not full_means:
        return None
    full = max(full_means)
    lines = []
    ns = [r["auroc"] for r in rows if r["fraction"] == 0.1 and r["variant"] == "noisy_student"]
    if ns:
        gap = full - statistics.mean(ns)
        mean, low, high = mean_ci(ns)
        lines.append(
            f"goal (10 % labels, Noisy Student within 0.01 AUROC of the best fully supervised mean): "
            f"{'reached' if gap <= 0.01 else 'not reached'} -- Noisy Student {mean:.3f} [{low:.3f}, {high:.3f}], "
            f"gap {gap:+.3f}"
        )
    semi = [v for v in ("noisy_student", "fixmatch", "mpl") if mean_of(0.02, v) is not None or mean_of(0.1, v)]
    if semi:
        at2 = {v: m for v in semi if (m := mean_of(0.02, v)) is not None}
        at10 = {v: m for v in semi if (m := mean_of(0.1, v)) is not None}
        if at2:
            best = max(at2, key=at2.get)
            lines.append(
                f"goal (2 % labels, a semi-supervised method >= 0.960 test AUROC): "
                f"{'reached' if at2[best] >= 0.96 else 'not reached'} -- best {best} {at2[best]:.3f}"
            )
        if at10:
            best = max(at10, key=at10.get)
            gap = full - at10[best]
            lines.append(
                f"goal (10 % labels, a semi-supervised method within 0.005 of the best fully supervised mean "
                f"{full:.3f}): {'reached' if gap <= 0.005 else 'not reached'} -- best {best} {at10[best]:.3f}, "
                f"gap {gap:+.3f}"
            )
    return "\n".join(lines) or None


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data-root", default=None, help="folder holding train/ (default: the recipe's)")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir shared by every run (decode once)")
    args = parser.parse_args(argv)
    from medtricks.data import load_card
    from medtricks.recipe import load_recipe

    fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
    if args.quick:
        args.seeds = args.seeds[:2]
    out = results_dir(args.out, args.quick)
    tmp = out / "label_efficiency_tmp"
    card = load_recipe(RECIPE, overrides=[o.format(tmp=tmp) for o in QUICK] if args.quick else []).data.card
    positive = load_card(card).classes[-1]
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows += run_seed(seed, fractions, args.variants, args, out, tmp, positive)
    table = summarize(rows, fractions, args.variants)
    print(format_table(table, list(table[0]) if table else []))
    print(markdown_table(table))
    verdict = goal(rows)
    if verdict:
        print(verdict)
    payload = {
        "name": "label_efficiency",
        "quick": bool(args.quick),
        "machine": machine_info(),
        "config": {
            "recipe": str(RECIPE.relative_to(REPO_ROOT)),
            "fractions_epochs": fractions,
            "variants": args.variants,
            "seeds": args.seeds,
            "rounds": ROUNDS,
            "baseline": baseline_overrides(0)[:3],
            "distill": DISTILL,
            "positive_class": positive,
        },
        "method": "each (fraction, variant, seed) trains recipes/kermany_label_efficiency.yaml (fixmatch: "
        "recipes/kermany_fixmatch.yaml; see the module docstring for the variants); metrics from "
        "the run's held-out test split: AUROC, and accuracy/sensitivity/specificity at the stored "
        "operating point; table: mean [95% t-interval] over seeds, paired Δ over seeds; train min = "
        "median wall time per row",
        "goal": verdict,
        "runs": rows,
        "table": table,
    }
    print(f"wrote {write_results(payload, out, 'label_efficiency')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
