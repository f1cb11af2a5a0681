"""Deploying at a new site, over seeds (issue 30): the shipped Kermany recipe trained once per seed, then its
decision and its model fitted to a labelled site sample (``kermany224_site``: half of the official Kermany test
split, other patients) -- every site number cross-fitted by patient, so each image is scored by a rule or a model
fitted without its patient.

Per seed:

1. ``medtricks run recipes/kermany_pneumonia.yaml --set experiment.seed=S`` (its internal ``id_order`` test
   split's AUROC is kept for reference);
2. ``medtricks calibrate RUN --card kermany-pneumonia --root SITE`` -- the site profile (temperature + Youden
   threshold), cross-fitted in 5 patient folds;
3. ``medtricks adapt RUN --method finetune --card kermany-pneumonia --root SITE`` -- the run fine-tuned on the
   site, cross-fitted in 5 patient folds; its report also scores the run as trained (the "parent") on the same
   images at 0.5 (the recipe's decision rule) and at each fold's Youden threshold.

Prints and saves, over seeds: mean [95 % t-interval] of AUROC, accuracy, sensitivity and specificity of each
decision rule on the site, and the paired Δ AUROC of the fine-tuned model against the run as trained.

    python -m benchmarks.site_deployment --seeds 0 1 2          # real data (the recipe's data.root)
    python -m benchmarks.site_deployment --quick --out /tmp/b    # a smoke run (1 seed, tiny settings; real data)

Resumable: each seed's training, calibration and fine-tuning write ``<out>/site_deployment_runs/<step>-s<seed>.json``
when they finish; runs use the local run store (``tracking.backend: none``), one after the other.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, base_parser, cached_row, format_table, machine_info, now, write_results

RECIPE = REPO_ROOT / "recipes" / "kermany_pneumonia.yaml"
CARD = "kermany-pneumonia"
SITE_ROOT = REPO_ROOT.parent / "shared" / "data" / "kermany224_site"
QUICK = [
    "data.image_size=64",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "eval.n_bootstrap=20",
    "audit.enabled=false",
]
METRICS = ("accuracy", "sensitivity", "specificity")
#: The decision rules on the site, as (row name, where its numbers come from); see rows_of().
RULES = (
    "as trained, 0.5 (the recipe's rule)",
    "as trained, each fold's Youden threshold",
    "calibrate: site profile (temperature + Youden)",
    "finetune, the stored threshold",
    "finetune, each fold's Youden threshold",
)


def train(seed: int, args, out: Path) -> dict[str, Any]:
    from medtricks.recipe import load_recipe
    from medtricks.run import run_recipe

    overrides = [
        f"experiment.seed={seed}",
        "tracking.backend=none",
        f"experiment.output_dir={out / 'runs'}",
        "train.progress=false",
        *(QUICK if args.quick else []),
    ]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    print(f"{now()} seed {seed}: training the shipped recipe ...", flush=True)
    started = time.perf_counter()
    result = run_recipe(load_recipe(RECIPE, overrides=overrides), quiet=True)
    seconds = time.perf_counter() - started
    test_auroc = float(result.test_metrics.values["auroc"])  # the recipe's held-out id_order test split
    print(f"  {seconds:.0f} s, internal test AUROC {test_auroc:.3f}", flush=True)
    return {"run_dir": str(result.run_dir), "train_s": seconds, "internal_test_auroc": test_auroc}


def calibrate(run_dir: str, args) -> dict[str, Any]:
    from medtricks.deploy.calibrate import calibrate_site

    print(f"{now()} calibrate {run_dir} ...", flush=True)
    started = time.perf_counter()
    result = calibrate_site(
        run_dir, card=CARD, root=str(args.site_root), name="site", log=False, progress=False,
        n_bootstrap=20 if args.quick else 200, folds=2 if args.quick else 5,
    )  # fmt: skip
    profile = result.profile
    return {
        "calibrate_s": time.perf_counter() - started,
        "threshold": profile.threshold,
        "temperature": profile.temperature,
        "stored_threshold": profile.stored_threshold,
        "cross_fit": profile.cross_fit,
    }


def finetune(run_dir: str, seed: int, args, out: Path) -> dict[str, Any]:
    from medtricks.deploy.finetune import finetune_run

    print(f"{now()} adapt --method finetune {run_dir} ...", flush=True)
    started = time.perf_counter()
    result = finetune_run(
        run_dir, card=CARD, root=str(args.site_root), log=False, progress=False,
        output_dir=out / "finetune" / f"s{seed}", folds=2 if args.quick else 5, epochs=1 if args.quick else 3,
        n_bootstrap=20 if args.quick else 1000,
        overrides=["train.max_steps_per_epoch=2"] if args.quick else (),
    )  # fmt: skip
    return {"finetune_s": time.perf_counter() - started, "metrics": result.metrics}


def rows_of(seed: int, trained: dict, calibrated: dict, tuned: dict) -> list[dict[str, Any]]:
    """One row per decision rule of one seed: AUROC and the three decision metrics on the site."""
    models = tuned["metrics"]["models"]

    def rule(model: str, name: str) -> dict[str, float]:
        values = models[model]["rules"][name]
        return {m: values[m]["value"] for m in METRICS}

    site = calibrated["cross_fit"]["site"]
    parent_auroc, tuned_auroc = models["parent"]["auroc"]["value"], models["finetuned"]["auroc"]["value"]
    numbers = (
        (parent_auroc, rule("parent", "0.5")),
        (parent_auroc, rule("parent", "youden")),
        (parent_auroc, {m: site[m] for m in METRICS}),
        (tuned_auroc, rule("finetuned", "stored")),
        (tuned_auroc, rule("finetuned", "youden")),
    )
    return [{"seed": seed, "rule": name, "auroc": a, **m} for name, (a, m) in zip(RULES, numbers)]


def summarize(rows: list[dict[str, Any]], seeds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    from medtricks.evaluate.stats import mean_ci, paired_comparison

    def fmt(values: list[float]) -> str:
        mean, low, high = mean_ci(values)
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{mean:.3f}"

    table = []
    for name in RULES:
        mine = [r for r in rows if r["rule"] == name]
        line = {"decision rule on the site": name, "seeds": ",".join(str(r["seed"]) for r in mine)}
        for metric in ("auroc", *METRICS):
            line[metric] = fmt([r[metric] for r in mine])
        table.append(line)
    tuned = [r["auroc"] for r in rows if r["rule"] == RULES[3]]
    parent = [r["auroc"] for r in rows if r["rule"] == RULES[0]]
    delta = paired_comparison(tuned, parent) if len(tuned) >= 2 else None
    extra = {
        "delta_auroc_finetune_vs_as_trained": delta,
        "internal_test_auroc": fmt([s["internal_test_auroc"] for s in seeds]) if seeds else None,
        "train_min": fmt([s["train_s"] / 60 for s in seeds]) if seeds else None,
        "finetune_min": fmt([s["finetune_s"] / 60 for s in seeds]) if seeds else None,
        "calibrate_s": fmt([s["calibrate_s"] for s in seeds]) if seeds else None,
    }
    return table, extra


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The table as docs/deployment.md shows it (tests/docs/test_docs_numbers.py checks the page against it)."""
    columns = ("decision rule on the site", "seeds", "auroc", *METRICS)
    head = "| decision rule on the site | seeds | AUROC | accuracy | sensitivity | specificity |"
    rows = ["| " + " | ".join(str(line[c]).replace("-", "−") for c in columns) + " |" for line in table]
    return "\n".join([head, "|---|---|---|---|---|---|", *rows])


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default=None, help="folder holding train/ (default: the recipe's)")
    parser.add_argument("--site-root", default=str(SITE_ROOT), help="the labelled site sample (card kermany-pneumonia)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if not Path(args.site_root).is_dir():
        raise SystemExit(f"site sample {args.site_root} not found: pass --site-root (the kermany224_site folder)")
    from benchmarks.common import results_dir

    out = results_dir(args.out, args.quick)
    per = out / "site_deployment_runs"
    rows, seeds = [], []
    for seed in args.seeds:
        trained = cached_row(per / f"train-s{seed}.json", lambda: train(seed, args, out))
        calibrated = cached_row(per / f"calibrate-s{seed}.json", lambda: calibrate(trained["run_dir"], args))
        tuned = cached_row(per / f"finetune-s{seed}.json", lambda: finetune(trained["run_dir"], seed, args, out))
        rows += rows_of(seed, trained, calibrated, tuned)
        seeds.append(
            {
                "seed": seed,
                "run_dir": trained["run_dir"],
                "train_s": trained["train_s"],
                "internal_test_auroc": trained["internal_test_auroc"],
                "calibrate_s": calibrated["calibrate_s"],
                "finetune_s": tuned["finetune_s"],
                "stored_threshold": calibrated["stored_threshold"],
                "site_threshold": calibrated["threshold"],
                "site_temperature": calibrated["temperature"],
                "delta_auroc_images": tuned["metrics"]["delta_auroc"],
            }
        )
    table, extra = summarize(rows, seeds)
    print(format_table(table, list(table[0])))
    print(markdown_table(table))
    for key, value in extra.items():
        print(f"{key}: {value}")
    payload = {
        "name": "site_deployment",
        "quick": bool(args.quick),
        "machine": machine_info(),
        "config": {"recipe": str(RECIPE.relative_to(REPO_ROOT)), "card": CARD, "site_root": str(args.site_root)},
        "method": "per seed: the shipped recipe trained once; calibrate (5 patient folds) and adapt --method "
        "finetune (5 patient folds, 3 epochs, lr x 0.1) on the site sample; every site number cross-fitted by "
        "patient; table: mean [95% t-interval] over seeds",
        "seeds": seeds,
        "rows": rows,
        "table": table,
        **extra,
    }
    print(f"wrote {write_results(payload, out, 'site_deployment')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
