"""Robustness trade-off on real X-rays (issue 19): standard training vs fast adversarial training
(FGSM-RS) at ε = 1/255 and 2/255 vs TRADES at 1/255, several seeds, each audited on the run's *test*
split (never seen by training or checkpoint selection) with PGD-20 at ε ∈ {0.5, 1, 2, 4}/255, the
gradient-masking checks, the reduced AutoAttack (``apgd_square``) on a subset, and the corruption
suite. Prints and saves a table with the mean and 95% t-interval over seeds of every column, and the
training cost relative to standard training.

    python -m benchmarks.robust_tradeoff                         # real Kermany data (MEDTRICKS_REAL_DATA)
    python -m benchmarks.robust_tradeoff --seeds 0 1 2 --apgd-n 100
    python -m benchmarks.robust_tradeoff --quick --out /tmp/b    # phantoms, tiny model: a smoke run

Resumable: each (variant, seed) writes ``<out>/robust_tradeoff_runs/<variant>-s<seed>.json`` when it
finishes; a rerun skips those. Runs use the local run store (``tracking.backend: none``), one after
the other (two trainings on two cores slow each other 5-10x).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, base_parser, format_table, machine_info, now, results_dir, write_results

VARIANTS: dict[str, list[str]] = {
    "standard": [],
    "fgsm_rs@1/255": ["tricks.adversarial.method=fgsm_rs", "tricks.adversarial.eps=0.00392157"],
    "fgsm_rs@2/255": ["tricks.adversarial.method=fgsm_rs", "tricks.adversarial.eps=0.00784314"],
    "trades@1/255": [
        "tricks.adversarial.method=trades",
        "tricks.adversarial.eps=0.00392157",
        "tricks.adversarial.steps=3",
    ],  # 3 attack steps, not the paper's 10: a 2-core CPU budget
}
PGD_EPS = (0.5 / 255, 1 / 255, 2 / 255, 4 / 255)
APGD_EPS = (1 / 255,)
QUICK = [
    "data.root={tmp}/phantoms",
    "data.synth.n=80",
    "data.synth.size=32",
    "data.image_size=32",
    "data.card=synthetic-phantoms",
    "model.name=resnet18",
    "model.weights=none",
    "model.in_chans=1",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.n_bootstrap=50",
    "data.test_by=random",
    "tricks.class_balance=none",
    "eval.threshold=none",
    "audit.n_bootstrap=20",
    "audit.square_queries=50",
]


def _audit(run_dir: Path, *, attacks: str, eps, n: int, corruptions: str) -> Any:
    from medtricks.posthoc import audit_trained

    return audit_trained(
        str(run_dir),
        split="test",
        attacks=attacks,
        eps=list(eps),
        corruptions=corruptions,
        n=n,
        log=True,
        device="cpu",
        progress=False,
    ).result


def _one(variant: str, seed: int, args, out: Path, tmp: Path) -> dict[str, Any]:
    from medtricks.recipe import load_recipe
    from medtricks.run import run_recipe

    overrides = [
        f"experiment.seed={seed}",
        "tracking.backend=none",
        f"experiment.output_dir={out / 'runs'}",
        "train.progress=false",
        *VARIANTS[variant],
    ]
    if args.quick:
        overrides += [o.format(tmp=tmp) for o in QUICK]
    elif args.data_root:
        overrides.append(f"data.root={args.data_root}")
    recipe = load_recipe(REPO_ROOT / "recipes" / "kermany_robust.yaml", overrides=overrides)
    started = time.perf_counter()
    result = run_recipe(recipe, quiet=True)
    train_s = time.perf_counter() - started
    # Clean numbers: the run's own evaluation of its whole held-out test split (threshold 0.5).
    test = result.test_metrics.values if result.test_metrics is not None else result.metrics.values
    classes = [k.split("/", 1)[1] for k in test if k.startswith("sensitivity/")]
    started = time.perf_counter()
    pgd = _audit(result.run_dir, attacks="pgd_linf", eps=(0.0, *PGD_EPS), n=args.n, corruptions="none")
    corr = _audit(result.run_dir, attacks="none", eps=(0.0,), n=args.corruption_n, corruptions="all")
    apgd = (
        _audit(result.run_dir, attacks="apgd_square", eps=(0.0, *APGD_EPS), n=args.apgd_n, corruptions="none")
        if args.apgd_n
        else None
    )
    audit_s = time.perf_counter() - started
    row: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "run_dir": str(result.run_dir),
        "train_s": train_s,
        "audit_s": audit_s,
        "clean_accuracy": test["accuracy"],
        "clean_auroc": test["auroc"],
        "clean_sensitivity": test.get(f"sensitivity/{classes[-1]}", math.nan) if classes else math.nan,
        "n_test_images": int(test.get("n", 0)),
        "mean_corruption_accuracy": corr.corruption_summary.get("mean/accuracy", math.nan),
        "corruption_n": int(corr.config["n_images"]),
        "masking_failed": [c["check"] for c in pgd.masking if not c["passed"]],
        "masking": pgd.masking,
        "pgd_n": int(pgd.config["n_images"]),
        "pgd_clean_accuracy": pgd.clean["accuracy"],
    }
    for eps in PGD_EPS:
        row[f"pgd20_acc@{eps * 255:g}"] = pgd.attacks["pgd_linf"][eps]["accuracy"]
    if apgd is not None:
        for eps in APGD_EPS:
            row[f"apgd_square_acc@{eps * 255:g}"] = apgd.attacks["apgd_square"][eps]["accuracy"]
        row["apgd_n"] = int(apgd.config["n_images"])
    return row


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from medtricks.evaluate.stats import mean_ci

    import statistics

    # Medians: one run slowed by other work on the machine must not set the cost ratio.
    base_cost = [r["train_s"] for r in rows if r["variant"] == "standard"]
    base = statistics.median(base_cost) if base_cost else math.nan
    columns = [k for k in rows[0] if k.startswith(("clean_", "pgd20_", "apgd_square_acc", "mean_corruption"))]
    out = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        line: dict[str, Any] = {"variant": variant, "seeds": ",".join(str(r["seed"]) for r in mine)}
        for col in columns:
            values = [r[col] for r in mine if col in r and r[col] is not None and math.isfinite(r[col])]
            if values:
                mean, low, high = mean_ci(values)
                line[col] = f"{mean:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{mean:.3f}"
        line["train cost x"] = f"{statistics.median(r['train_s'] for r in mine) / base:.2f}" if base == base else "n/a"
        line["masking warnings"] = sum(len(r["masking_failed"]) for r in mine)
        out.append(line)
    return out


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n", type=int, default=100, help="test images attacked with PGD-20 (+ masking checks)")
    parser.add_argument("--corruption-n", type=int, default=200, help="test images for the corruption suite")
    parser.add_argument("--apgd-n", type=int, default=16, help="test images for apgd_square (0: skip)")
    parser.add_argument("--data-root", default=None, help="folder holding train/ (default: the recipe's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.n, args.corruption_n, args.apgd_n = args.seeds[:2], 16, 16, 8
    out = results_dir(args.out, args.quick)
    per_run = out / "robust_tradeoff_runs"
    per_run.mkdir(parents=True, exist_ok=True)
    tmp = out / "robust_tradeoff_tmp"
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            path = per_run / f"{variant.replace('/', '_').replace('@', '-')}-s{seed}.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
                print(f"{variant} seed {seed}: done earlier ({path.name})", flush=True)
                continue
            print(f"{now()} {variant} seed {seed}: training + audit ...", flush=True)
            row = _one(variant, seed, args, out, tmp)
            path.write_text(json.dumps(row, indent=2))
            rows.append(row)
            print(
                f"  train {row['train_s']:.0f} s, audit {row['audit_s']:.0f} s, clean AUROC {row['clean_auroc']:.3f}, "
                f"PGD-20@1/255 acc {row['pgd20_acc@1']:.3f}",
                flush=True,
            )
    table = _summary(rows)
    columns = list(table[0]) if table else []
    print(format_table(table, columns))
    payload = {
        "name": "robust_tradeoff",
        "quick": bool(args.quick),
        "machine": machine_info(),
        "config": {
            "recipe": "recipes/kermany_robust.yaml",
            "variants": {v: VARIANTS[v] for v in args.variants},
            "seeds": args.seeds,
            "pgd_eps": list(PGD_EPS),
            "apgd_eps": list(APGD_EPS),
            "n": args.n,
            "corruption_n": args.corruption_n,
            "apgd_n": args.apgd_n,
        },
        "method": "each (variant, seed) trains recipes/kermany_robust.yaml, then audits the run's test split: "
        "clean metrics on all of it (threshold 0.5), PGD-20 + masking checks on the first n images, "
        "corruptions on corruption_n, apgd_square on apgd_n; table: mean [95% t-interval] over seeds; "
        "train cost x = mean training wall time / standard's",
        "runs": rows,
        "table": table,
    }
    print(f"wrote {write_results(payload, out, 'robust_tradeoff')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
