"""The command line: fast help, version, dry-run, clear errors."""

import subprocess
import sys
import time
from pathlib import Path

from medtricks.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.perf_counter(); from medtricks.cli import main; "
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(time.perf_counter()-t, 'torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]  # lazy imports
    assert float(out[0]) < 1.0


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "medtricks 0.1.0" in capsys.readouterr().out


def test_dry_run_prints_resolved_recipe(capsys):
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--dry-run", "--set", "optim.lr=0.05"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.05" in out and "strategy: zero_late" in out and "base:" not in out


def test_recipe_typo_is_one_clear_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lrr: 0.1}\n")
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrr'" in err and "did you mean 'lr'" in err and "Traceback" not in err


def test_console_script_entry_point():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "medtricks.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "medtricks run" in out.stdout
    assert time.perf_counter() - started < 10
