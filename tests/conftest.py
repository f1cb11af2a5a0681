"""Shared pytest fixtures: isolation (every test writes only to temporary folders), MLflow stores, and the
helpers more than one test file uses; tiny runs, the engine's toy problem and stand-ins are in tests/fixtures/.

A helper two test files share lives here, in tests/fixtures/ or in a subfolder's conftest.py and reaches the tests
as a fixture; no test file imports another. A plain helper is exposed by a session-scoped fixture that returns
the function (``tiny_recipe(tmp_path, "train.epochs=1")``). torch, mlflow and medtricks are imported inside the
helpers, so a file that needs none of them (tests/docs) does not pay for them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The shared fixtures by concern, in tests/fixtures/ (imported from there: tests/ is on sys.path, pytest's default
# "prepend" import mode puts it there for this file).
pytest_plugins = ["fixtures.engine", "fixtures.runs", "fixtures.stand_ins"]

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Root of the real chest X-ray data (``../shared/data``), or skip.

    Real-data tests run only when ``MEDTRICKS_REAL_DATA`` points at that folder (``.ci/run`` sets
    it); the default suite must pass on a clean clone without it.
    """
    value = os.environ.get("MEDTRICKS_REAL_DATA")
    if not value:
        pytest.skip("real data not configured: set MEDTRICKS_REAL_DATA=../shared/data to run this test")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} (from MEDTRICKS_REAL_DATA) does not exist")
    return path


# ------------------------------------------------------------------------------- isolation, MLflow
def _mlflow_template_path() -> Path:
    """An empty, migrated MLflow sqlite store, made once per machine and MLflow version (creating
    one runs the schema migrations, ~10 s) and copied wherever a test needs a fresh store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = Path(tempfile.gettempdir()) / f"medtricks-test-mlflow-{mlflow.__version__}.db"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def mlflow_template() -> Path:
    return _mlflow_template_path()


def _fresh_sqlite_uri(folder: Path) -> str:
    """A new, empty sqlite MLflow store in ``folder`` (a copy of the migrated template)."""
    db = Path(folder) / "mlflow.db"
    if not db.exists():
        shutil.copy(_mlflow_template_path(), db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def fresh_sqlite_uri():
    """``fresh_sqlite_uri(folder)``: a new, empty sqlite MLflow store in ``folder``, as a tracking URI."""
    return _fresh_sqlite_uri


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite store, also set as MLFLOW_TRACKING_URI; the test runs inside tmp_path."""
    uri = _fresh_sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session", autouse=True)
def _session_outside_the_checkout(tmp_path_factory):
    """Module- and session-scoped fixtures run before the per-test isolation below: they get a scratch
    working folder, MLflow store and cache of their own, so nothing lands where pytest was started."""
    scratch = tmp_path_factory.mktemp("session-cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(scratch)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{scratch / 'mlflow.db'}")
        patch.setenv("MEDTRICKS_CACHE", str(scratch / "cache"))
        patch.setenv("MEDTRICKS_ALLOW_PLUGINS", "0")
        yield scratch


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Never let a test write into the working directory (MLflow's sqlite stores put artifacts in
    ``./mlruns`` of the folder they are opened in), its mlflow.db or the user's cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))
    # Plug-ins are opt-in; a test that opts in (--allow-plugins sets this) must not leak it to the next.
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "0")  # restored (unset) after the test
    yield


# The suite must leave the folder it runs in as it found it (issue 34: a run once left 2.3 GB in ./mlruns).
# Compared: its entries, and everything under the run-output folders that already exist there. pytest's
# and ruff's own caches are theirs, not the tests'.
_OWN_CACHES = {".pytest_cache", ".ruff_cache", "__pycache__"}
_OUTPUT_FOLDERS = ("mlruns", "mlartifacts", "runs")
_WORKING_FOLDER = pytest.StashKey[tuple]()


def _working_folder_listing(folder: Path) -> set[str]:
    names = {p.name for p in folder.iterdir() if p.name not in _OWN_CACHES}
    for name in _OUTPUT_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(folder / name):
            names.update(os.path.relpath(os.path.join(dirpath, n), folder) for n in dirnames + filenames)
    return names


def pytest_configure(config):
    # pytest-xdist (two workers by default, see pyproject.toml): one intra-op thread per worker, so the
    # workers do not oversubscribe a 2-core machine (torch reads this when it is first imported).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if "torch" in sys.modules:  # imported already (a plug-in or fixture module): set it directly
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_sessionstart(session):
    folder = Path(session.config.invocation_params.dir)
    session.config.stash[_WORKING_FOLDER] = (folder, _working_folder_listing(folder))


def pytest_sessionfinish(session, exitstatus):
    folder, before = session.config.stash.get(_WORKING_FOLDER, (None, None))
    if folder is None or session.testscollected == 0 or session.config.option.collectonly:
        return
    created = sorted(_working_folder_listing(folder) - before)
    if created:
        shown = ", ".join(created[:10]) + (f" and {len(created) - 10} more" if len(created) > 10 else "")
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(
            f"FAILED: the tests wrote into the folder pytest runs in ({folder}): {shown}. "
            "Tests must write only to their temporary folders (tmp_path, tmp_path_factory).",
            red=True,
            bold=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------------------------------------ models, data
def _randomize_norms(model, seed: int = 0):
    """Give every BatchNorm2d "pretrained-like" values: γ in [0.5, 1.5], β != 0 (timm zero-inits some γ)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def randomize_norms():
    """``randomize_norms(model, seed=0)``: pretrained-like BatchNorm γ and β, in place (returns the model)."""
    return _randomize_norms


def _binary_phantom_card(folder: Path, name: str = "binary-phantoms", classes=("normal", "pneumonia")) -> Path:
    """A binary card for two-class synthetic phantoms (the shipped phantom card with two classes)."""
    import yaml

    card = yaml.safe_load((REPO_ROOT / "data_cards" / "synthetic-phantoms.yaml").read_text())
    card.update(name=name, task="binary", classes=list(classes))
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


@pytest.fixture(scope="session")
def binary_phantom_card():
    """``binary_phantom_card(folder, name=..., classes=...)``: the path of a two-class phantom card."""
    return _binary_phantom_card


# ------------------------------------------------------------------------------------ command line
def _one_line_error(capsys, command="run") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"medtricks {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(capsys, command="run")``: the one ``medtricks COMMAND: error:`` line on stderr (and
    no traceback)."""
    return _one_line_error


@pytest.fixture(scope="session")
def set_args():
    """``set_args(*overrides)``: ``["--set", o1, "--set", o2, ...]`` for the command line."""
    return lambda *overrides: [a for o in overrides for a in ("--set", o)]


# A trick whose only act is to SIGKILL its own process at the end of the first epoch of the child
# with seed 1 -- once: the marker file says it happened (and which process it killed).
