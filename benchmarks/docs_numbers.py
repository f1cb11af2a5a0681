"""The numbers the docs quote about the quickstart, measured by running it as the README says.

    python -m benchmarks.docs_numbers              # ~1 min on 2 CPU cores; writes benchmarks/results/quickstart_numbers.json
    python -m benchmarks.docs_numbers --quick --out /tmp/dn    # 1 epoch on 60 phantoms: a smoke run, not the numbers

Runs the README's command, ``medtricks run recipes/quickstart.yaml``, in a fresh process and a fresh working folder
(a copy of ``recipes/``; MLflow's default store ``sqlite:///mlflow.db`` there), the way a new user runs it, and
records what docs/getting-started.md and the README quote: the recipe's size (images, pixels, epochs), the
validation AUROC after every epoch, the epoch the run kept, its validation metrics with their 95 % intervals,
the command's wall time and peak memory, and the machine and its load. tests/docs/test_docs_numbers.py fails when a
page's number differs from this file; after rerunning the script, update the pages it names.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from benchmarks.common import REPO_ROOT, base_parser, machine_info, now, results_dir, write_results  # noqa: E402
from medtricks.recipe import load_recipe, recipe_digest  # noqa: E402

NAME = "quickstart_numbers"
COMMAND = ["medtricks", "run", "recipes/quickstart.yaml"]
QUICK = ["--set", "train.epochs=1", "--set", "data.synth.n=60", "--set", "eval.n_bootstrap=50"]
METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1", "ece")
QUICKSTART = REPO_ROOT / "recipes" / "quickstart.yaml"


def recipe_fingerprint(path: Path = QUICKSTART) -> str:
    """The resolved quickstart recipe's id (its ``base:`` recipes included, comments and key order not): the
    numbers describe that experiment, and tests/docs/test_docs_numbers.py asks for a rerun when it changes."""
    return recipe_digest(load_recipe(str(path)))


def _command(quick: bool) -> list[str]:
    found = shutil.which("medtricks")  # the console script the README's user types; else the same entry point
    head = [found] if found else [sys.executable, "-m", "medtricks"]
    return head + COMMAND[1:] + (QUICK if quick else [])


def _run(workdir: Path, quick: bool) -> tuple[float, float, str]:
    """Run the quickstart in workdir; return (wall seconds, peak RSS GiB of the command, its stdout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MEDTRICKS_CACHE")}
    started = time.perf_counter()
    proc = subprocess.run(_command(quick), cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"the quickstart failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child: the run itself
    return wall, peak_kib / 1024**2, proc.stdout


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def read_run(workdir: Path) -> dict[str, Any]:
    """The numbers of the one quickstart run in workdir (its run folder and the MLflow store there)."""
    (run_dir,) = sorted((workdir / "runs" / "quickstart").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(state["run_id"])
    metrics = run.data.metrics
    epochs = _history(client, run.info.run_id, "epoch")
    auroc = {int(epochs[step]): value for step, value in _history(client, run.info.run_id, "val/auroc").items()}
    top = max(auroc.values())
    return {
        "run_folder": str(run_dir.relative_to(workdir)),
        "recipe": {
            "images": recipe["data"]["synth"]["n"],
            "image_size": recipe["data"]["image_size"],
            "epochs": recipe["train"]["epochs"],
            "seed": recipe["experiment"]["seed"],
            "model": recipe["model"]["name"],
            "bn_gamma": recipe["tricks"]["bn_gamma"]["strategy"],
            "best_tiebreak": recipe["train"].get("best_tiebreak"),
        },
        "val_images": int(metrics["best/val/n"]),
        "val_auroc_by_epoch": [auroc[e] for e in sorted(auroc)],
        "epochs_at_top_val_auroc": [e for e in sorted(auroc) if auroc[e] == top],
        "best_epoch": int(run.data.tags["best_epoch"]),
        "best_val": {
            name: {
                "value": metrics[f"best/val/{name}"],
                "ci_low": metrics.get(f"best/val/{name}_ci_low"),
                "ci_high": metrics.get(f"best/val/{name}_ci_high"),
            }
            for name in METRICS
        },
        "phase_seconds": {k[len("time/") : -2]: v for k, v in metrics.items() if k.startswith("time/")},
    }


def main(argv=None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="medtricks-docs-numbers-") as tmp:
        workdir = Path(tmp)
        shutil.copytree(REPO_ROOT / "recipes", workdir / "recipes")
        wall, peak_gib, stdout = _run(workdir, args.quick)
        numbers = read_run(workdir)
    payload = {
        "name": NAME,
        "quick": args.quick,
        "machine": info,
        "command": " ".join(COMMAND + (QUICK if args.quick else [])),
        "recipe_digest": recipe_fingerprint(),
        "method": "the README's command in a fresh process and working folder (a copy of recipes/, MLflow's default "
        "sqlite:///mlflow.db there, no MLFLOW_TRACKING_URI); wall time of the whole command, peak RSS of "
        "it (ru_maxrss of the child); metrics from the run's MLflow record",
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_gib, 2),
        **numbers,
        "printed_tail": stdout.strip().splitlines()[-25:],
        "finished_at": now(),
    }
    path = write_results(payload, results_dir(args.out, args.quick), NAME)
    best = numbers["best_val"]
    print(
        f"quickstart: {wall:.0f} s, peak {peak_gib:.2f} GiB, best epoch {numbers['best_epoch']}, "
        f"val accuracy {best['accuracy']['value']:.3f}, AUROC {best['auroc']['value']:.3f}, "
        f"ECE {best['ece']['value']:.3f} -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
