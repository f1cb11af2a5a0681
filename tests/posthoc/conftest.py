"""A tiny finished run for the tests of what predict, export and ensemble write, trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[2]
SALT = "hardening-outputs-salt"  # the run's split manifest and the overlap checks hash with one salt


@pytest.fixture(scope="session")
def salted_run(tmp_path_factory):
    """One tiny multiclass run on 32 px phantoms (resnet18 from scratch, one epoch, no tracking), its patients
    hashed with ``run_salt``: ``(run folder, folder)`` -- the phantoms are in ``folder / "phantoms"``."""
    tmp = tmp_path_factory.mktemp("outputs")
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=48",
            "data.synth.size=32",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=0",
            "eval.plots=false",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"data.root={tmp / 'phantoms'}",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
        ],
    )
    with pytest.MonkeyPatch.context() as mp:  # session scope: the per-test cache fixture is not active yet
        mp.setenv("MEDTRICKS_CACHE", str(tmp / "cache"))
        mp.setenv("MEDTRICKS_PATIENT_SALT", SALT)
        result = run_recipe(recipe, quiet=True)
    return result.run_dir, tmp


@pytest.fixture(scope="session")
def run_salt() -> str:
    """The patient salt ``salted_run`` was trained with (set it to check overlaps against its split manifest)."""
    return SALT


@pytest.fixture(scope="session")
def entries():
    """``entries(folder)``: the sorted names in ``folder``."""
    return lambda folder: sorted(p.name for p in Path(folder).iterdir())
