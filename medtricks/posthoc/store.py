"""Where a finished run's files are read from and its post-hoc results logged to.

:func:`run_file` reads a file of the run (its folder, else the run store it was found in);
:func:`posthoc_store` is the run store of the run's own recipe; :func:`start_posthoc_run` opens the run
an evaluation, audit, CKA or attention result is logged to.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from medtricks.rundir import RunDir
from medtricks.tracking import create_store

__all__ = ["run_file", "posthoc_store", "start_posthoc_run"]


def run_file(trained, artifact: str, read, tracking_uri: Optional[str] = None):
    """``read(path)`` of a file of the trained run: the run folder's copy of the store artifact
    ``artifact`` (``RunDir.artifact_for``), else that artifact from the store the run was found in
    (runs given by id may live only in MLflow); ``None`` if neither."""
    run = RunDir(trained.run_dir) if trained.run_dir is not None else None
    if run is not None and run.artifact_for(artifact).is_file():
        return read(run.artifact_for(artifact))
    # A real run folder (state.json) is the whole truth; only a copy downloaded from a store (recipe and
    # model only) sends us to the store, so --no-log never touches (or creates) a tracking database.
    if not trained.run_id or (run is not None and run.state_file.is_file()):
        return None
    store = getattr(trained, "store", None)
    if store is None and trained.recipe.tracking.backend == "mlflow":
        store = create_store("mlflow", tracking_uri or trained.recipe.tracking.uri)
    if store is None:
        return None
    with tempfile.TemporaryDirectory(prefix="medtricks-run-file-") as tmp:
        try:
            path = store.download_artifact(trained.run_id, artifact, tmp)
        except Exception:  # noqa: BLE001 - another store, or no tracking at all: treat as absent
            return None
        return None if path is None else read(path)


def posthoc_store(trained, tracking_uri: Optional[str] = None, runs_dir: Optional[str | Path] = None):
    """The run store that results about ``trained`` (evaluations, audits, ensembles) are logged to: the
    backend of the run's own recipe. MLflow at ``tracking_uri`` (else the recipe's URI); for
    ``tracking.backend: none`` the local store rooted at ``runs_dir``, else where the run folder lives
    (its ``experiment.output_dir``), else the recipe's ``experiment.output_dir``."""
    recipe = trained.recipe
    if recipe.tracking.backend == "mlflow":
        return create_store("mlflow", tracking_uri or recipe.tracking.uri)
    if runs_dir is None and trained.run_dir is not None and RunDir(trained.run_dir).state_file.is_file():
        runs_dir = RunDir(trained.run_dir).output_dir
    return create_store(
        recipe.tracking.backend, root=runs_dir if runs_dir is not None else recipe.experiment.output_dir
    )


def start_posthoc_run(store, trained, *, kind: str, tags: dict[str, str]) -> str:
    """Open the run that a result about ``trained`` is logged to: the trained run itself when ``store``
    holds it, else a new run named ``<kind>-<experiment>`` in the run's experiment, tagged with ``tags``
    and ``medtricks.kind``. Returns its id; the caller ends it."""
    recipe = trained.recipe
    if trained.run_id and store.run_exists(trained.run_id):
        return store.start(experiment="", run_name="", tags={}, resume_run_id=trained.run_id)
    return store.start(
        experiment=recipe.tracking.experiment or recipe.experiment.name,
        run_name=f"{kind}-{recipe.experiment.name}",
        tags={**tags, "medtricks.kind": kind},
    )
