"""Helpers shared by the benchmark scripts: command-line options, machine description, robust
summaries, interleaved run orders, peak memory, Markdown tables and JSON results.

Every script takes ``--quick`` (a tiny configuration that finishes in seconds, for the slow test that
keeps the scripts from rotting) and ``--out DIR``. Full runs write ``benchmarks/results/<name>.json``
(committed); quick runs without ``--out`` write under ``benchmarks/results/quick/`` (git-ignored),
so a smoke run never overwrites the committed figures.

Example::

    from benchmarks.common import summarize, interleaved_order
    summarize([3.0, 1.0, 2.0])["median"]          # 2.0
    interleaved_order(["a", "b", "c"], 2)          # [['a', 'b', 'c'], ['b', 'c', 'a']]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "base_parser",
    "results_dir",
    "machine_info",
    "load_average",
    "summarize",
    "ratio",
    "interleaved_order",
    "peak_rss_mb",
    "current_rss_mb",
    "now",
    "format_table",
    "write_results",
    "cached_row",
]


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark script shares (``--quick``, ``--out``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny configuration that runs in seconds (smoke test, not a measurement)"
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for the JSON result (default {RESULTS_DIR.relative_to(REPO_ROOT)}, "
        f"or {QUICK_RESULTS_DIR.relative_to(REPO_ROOT)} with --quick)",
    )
    return parser


def results_dir(out: Optional[str], quick: bool) -> Path:
    """The folder a result goes to: ``out`` if given, else the committed or the git-ignored quick one."""
    if out is not None:
        folder = Path(out).expanduser()
    elif quick:
        folder = QUICK_RESULTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        ignore = folder / ".gitignore"
        if not ignore.exists():  # same trick as .pytest_cache: the folder ignores itself
            ignore.write_text("# quick benchmark runs are smoke tests, never committed\n*\n")
    else:
        folder = RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none). The machine is shared, so
    every result records the load it ran under."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def machine_info(**extra: Any) -> dict[str, Any]:
    """Where and when a result was measured: CPU, cores, library versions, commit, load average."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "measured_at": now(),
        "loadavg_start": load_average(),
    }
    for name in ("timm", "torchvision", "monai", "albumentations", "pydicom", "PIL"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", None)
    info.update(extra)
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """Median, min, max and count of repeated measurements (median: robust to a noisy neighbour)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize() needs at least one measurement, got none")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def ratio(numerator: float, denominator: float) -> Optional[float]:
    """``numerator / denominator``, or None when the denominator is not positive."""
    return numerator / denominator if denominator and denominator > 0 else None


def interleaved_order(names: Sequence[str], repeats: int) -> list[list[str]]:
    """One run order per repeat, each a rotation of ``names``, so every contender goes first, second
    and last equally often and slow drifts in machine load hit all of them alike."""
    names = list(names)
    if not names:
        raise ValueError("interleaved_order() needs at least one name")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(repeats)]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> Optional[float]:
    """This process's resident set size now, in MiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``; floats get 3 significant
    digits below 10 and one decimal above, None prints as ``-``. Paste-ready for the docs pages."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_results(payload: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Write ``payload`` (plus the load average at the end) to ``out_dir/<name>.json``; return the path."""
    payload = dict(payload)
    machine = dict(payload.get("machine", {}))
    machine["loadavg_end"] = load_average()
    payload["machine"] = machine
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def cached_row(path: Path, make) -> dict[str, Any]:
    """A resumable step of a benchmark: the JSON at ``path`` if an earlier call finished it, else ``make()``'s
    result, written there once it finishes (a killed benchmark re-runs only what it had not finished)."""
    path = Path(path)
    if path.is_file():
        print(f"  {path.stem}: done earlier", flush=True)
        return json.loads(path.read_text())
    row = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2))
    return row
