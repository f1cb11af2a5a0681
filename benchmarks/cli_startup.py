"""CLI start-up time: ``medtricks --help`` in a fresh process, median of several runs (target < 1 s).

Contenders, each a new subprocess timed from start to exit:

- ``medtricks --help``: the installed console script next to this Python (else the one on PATH);
- ``python -m medtricks.cli --help``: the same code without the console-script wrapper;
- ``python -c pass``: the interpreter's own start-up, the floor;
- ``python -c "import torch"``: what ``--help`` would cost if the CLI imported torch eagerly.

The JSON also lists the slowest imports of ``medtricks --help`` (``python -X importtime``), so a
regression names its cause.

Run (from the repository root)::

    python -m benchmarks.cli_startup            # full: 10 runs each
    python -m benchmarks.cli_startup --quick    # 2 runs each
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `medtricks` importable
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

NAME = "cli_startup"
TARGET_S = 1.0


def console_script() -> Optional[str]:
    """The ``medtricks`` entry point installed for this Python (not a pyenv shim), else PATH's, else None."""
    beside = Path(sys.executable).with_name("medtricks")
    if beside.is_file():
        return str(beside)
    return shutil.which("medtricks")


def commands() -> dict[str, list[str]]:
    """Name -> argv of every contender available here."""
    found = {}
    script = console_script()
    if script:
        found["medtricks --help"] = [script, "--help"]
    found["python -m medtricks.cli --help"] = [sys.executable, "-m", "medtricks.cli", "--help"]
    found["python -c pass"] = [sys.executable, "-c", "pass"]
    found["python -c 'import torch'"] = [sys.executable, "-c", "import torch"]
    return found


def _env() -> dict[str, str]:
    # The repository first on the path, so the checkout is what gets timed even without an install.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def time_once(argv: list[str]) -> float:
    """Seconds from spawning ``argv`` to its exit; raises if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=120)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def parse_importtime(stderr: str, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` top-level imports with the largest cumulative time from ``python -X importtime``
    output (lines ``import time: self [us] | cumulative | imported package``)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3:
            continue
        name = parts[2].rstrip()
        if name.startswith(" " * 2):  # indented: imported by another module, counted in its parent
            continue
        rows.append({"module": name.strip(), "self_ms": int(parts[0]) / 1000, "cumulative_ms": int(parts[1]) / 1000})
    return sorted(rows, key=lambda r: r["cumulative_ms"], reverse=True)[:top]


def slowest_imports(top: int = 10) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "medtricks.cli", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=120,
    )
    return parse_importtime(proc.stderr, top)


def _parser():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per command (median; default 10)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.repeats = 2
    machine = machine_info()
    print(f"CLI start-up on {machine['cpu']} ({machine['logical_cpus']} CPUs), load {machine['loadavg_start']}")
    cmds = commands()
    for argv_ in cmds.values():  # one untimed run each: compile .pyc files, fill the OS file cache
        time_once(argv_)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for order in interleaved_order(list(cmds), args.repeats):
        for name in order:
            times[name].append(time_once(cmds[name]))
    summary = {name: summarize(values) for name, values in times.items()}
    main_name = "medtricks --help" if "medtricks --help" in summary else "python -m medtricks.cli --help"
    floor = summary["python -c pass"]["median"]
    help_s = summary[main_name]["median"]
    payload = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "method": "wall time of a fresh subprocess from spawn to exit; interleaved runs; median",
        "config": {"repeats": args.repeats, "console_script": console_script(), "commands": cmds},
        "target": {"help_seconds_below": TARGET_S},
        "help_seconds": help_s,
        "target_met": help_s < TARGET_S,
        "help_minus_interpreter_s": help_s - floor,
        "help_vs_torch_import": ratio(help_s, summary["python -c 'import torch'"]["median"]),
        "seconds": summary,
        "slowest_imports": slowest_imports(),
        "machine": machine,
    }
    rows = [
        {"command": name, "median s": s["median"], "min s": s["min"], "max s": s["max"], "runs": s["n"]}
        for name, s in summary.items()
    ]
    print(format_table(rows, list(rows[0])))
    print(f"{main_name}: {help_s:.3f} s median (target < {TARGET_S:.0f} s: {'met' if help_s < TARGET_S else 'MISSED'})")
    path = write_results(payload, results_dir(args.out, args.quick), NAME)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
