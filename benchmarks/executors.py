"""Where an ablation's children train (issue 18): the wall time of one small phantom ablation
(2 variants x 2 seeds) with ``--executor local`` (one child after another, all cores) vs
``--executor local --jobs 2`` (two spawned worker processes, one thread each) vs ``--executor ray
--cpus-per-run 1`` (a local Ray started by the command, two one-CPU workers). Each contender is a fresh
``python -m medtricks ablate`` process, so the figures include Python and torch start-up and, for Ray,
the cluster's start-up and its workers' imports -- what a user waits for. Ray's bare start-up
(``ray.init`` + one no-op task + ``ray.shutdown``) is measured alone too.

    python -m benchmarks.executors                      # ~15 min on 2 cores
    python -m benchmarks.executors --repeats 1 --quick --out /tmp/b

Contenders run in interleaved order (each goes first once per rotation); the summary is the median.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    format_table,
    interleaved_order,
    machine_info,
    ratio,
    results_dir,
    summarize,
    write_results,
)

CONTENDERS = {
    "local": [],
    "local --jobs 2": ["--jobs", "2"],
    "ray --cpus-per-run 1": ["--executor", "ray", "--cpus-per-run", "1"],
}
# Each child: resnet18 from scratch on 200 64-px phantoms, 3 epochs (~20 s on 2 cores).
FULL = ["data.synth.n=200", "data.synth.size=64", "data.image_size=64", "train.epochs=3"]
QUICK = [
    "data.synth.n=60",
    "data.synth.size=32",
    "data.image_size=32",
    "train.epochs=2",
    "train.max_steps_per_epoch=1",
]  # 2 epochs: the quickstart recipe warms up for 1
COMMON = [
    "model.name=resnet18",
    "model.weights=none",
    "train.batch_size=16",
    "eval.n_bootstrap=0",
    "train.progress=false",
    "eval.plots=false",
    "tracking.backend=none",
    "tricks.bn_gamma.strategy=none",
]


def _ablate(contender: str, work: Path, sizes: list[str]) -> float:
    """One ablation in a fresh process; returns its wall-clock seconds (every child must finish)."""
    folder = work / contender.replace(" ", "_")
    shutil.rmtree(folder, ignore_errors=True)
    overrides = [*COMMON, *sizes, f"data.root={work / 'phantoms'}", f"experiment.output_dir={folder}"]
    cmd = [
        sys.executable,
        "-m",
        "medtricks",
        "ablate",
        str(REPO_ROOT / "recipes" / "quickstart.yaml"),
        "--tricks",
        "mixup=0.2",
        "--seeds",
        "2",
        *CONTENDERS[contender],
        *(a for o in overrides for a in ("--set", o)),
    ]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "0 to run" in done.stdout:
        raise RuntimeError(
            f"{contender}: ablate failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return seconds


def _ray_startup() -> float:
    code = (
        "import time; t = time.perf_counter(); import ray; ray.init(num_cpus=2, include_dashboard=False, "
        "log_to_driver=False); ray.get(ray.remote(lambda: 1).remote()); ray.shutdown(); "
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ray start-up failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats per contender (default 2)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="medtricks-executors-"))
    info = machine_info()
    try:
        # The phantoms once, before any timing (every contender reads the same files).
        synth = dict(o[len("data.synth.") :].split("=") for o in sizes if o.startswith("data.synth."))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "medtricks",
                "data",
                "synth",
                str(work / "phantoms"),
                "--n",
                synth["n"],
                "--size",
                synth["size"],
            ],
            cwd=work,
            check=True,
            capture_output=True,
            timeout=600,
        )
        seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for order in interleaved_order(list(CONTENDERS), args.repeats):
            for name in order:
                seconds[name].append(_ablate(name, work, sizes))
                print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
        startup = summarize([_ray_startup() for _ in range(args.repeats)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    local = summarize(seconds["local"])["median"]
    rows = [
        {
            "executor": name,
            "wall_s": summarize(v)["median"],
            "min_s": min(v),
            "max_s": max(v),
            "x_local": ratio(local, summarize(v)["median"]),
        }
        for name, v in seconds.items()
    ]
    print(format_table(rows, ["executor", "wall_s", "min_s", "max_s", "x_local"]))
    print(f"Ray start-up alone (init + one no-op task + shutdown): {startup['median']:.1f} s")
    payload = {
        "machine": info,
        "quick": args.quick,
        "config": {
            "ablation": "recipes/quickstart.yaml --tricks mixup=0.2 --seeds 2 (2 variants x 2 seeds)",
            "child_overrides": [*COMMON, *sizes],
            "repeats": args.repeats,
            "contenders": {k: " ".join(v) for k, v in CONTENDERS.items()},
        },
        "method": "wall clock of one `python -m medtricks ablate` process per contender (start-up, "
        "Ray start-up and worker imports included), interleaved order, median over repeats",
        "seconds": {k: summarize(v) for k, v in seconds.items()},
        "table": rows,
        "ray_startup_seconds": startup,
        "os_cpu_count": os.cpu_count(),
    }
    path = write_results(payload, results_dir(args.out, args.quick), "executors")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
