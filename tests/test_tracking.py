"""RunStore backends: MLflow against a temporary sqlite store, the null tracker, early failure."""

import pytest
from mlflow.tracking import MlflowClient

from medtricks.tracking import NullStore, create_store
from medtricks.tracking.mlflow_store import TrackingUnavailableError

from conftest import fresh_sqlite_uri


def test_mlflow_tracker_roundtrip(tmp_path):
    uri = fresh_sqlite_uri(tmp_path)
    tracker = create_store("mlflow", uri)
    run_id = tracker.start(experiment="exp", run_name="r1", tags={"tricks": "warmup"})
    tracker.log_params({f"p{i}": i for i in range(150)} | {"none": None})
    tracker.log_metrics({"train/loss": 0.5, "val/auroc": float("nan")}, step=3)
    tracker.log_text("hello", "notes/a.txt")
    tracker.end()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["p149"] == "149" and run.data.params["none"] == "None"
    assert run.data.metrics == {"train/loss": 0.5}  # NaN is not logged
    assert run.data.tags["tricks"] == "warmup"
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "notes")] == ["notes/a.txt"]
    # resume the same run: params are not re-logged (MLflow params are immutable)
    again = create_store("mlflow", uri)
    assert again.start(experiment="exp", run_name="r1", tags={}, resume_run_id=run_id) == run_id
    again.log_params({"p1": 1, "new": 2})
    again.end("FAILED")
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_unreachable_server_fails_at_start():
    tracker = create_store("mlflow", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(TrackingUnavailableError, match="not reachable"):
        tracker.start(experiment="e", run_name="r", tags={})


def test_null_tracker_records_in_memory():
    tracker = create_store("none")
    assert isinstance(tracker, NullStore)
    tracker.start(experiment="e", run_name="r", tags={"a": "b"})
    tracker.log_metrics({"x": 1.0}, step=2)
    tracker.end()
    assert tracker.metrics["x"] == [(2, 1.0)] and tracker.status == "FINISHED"
    with pytest.raises(ValueError, match="backend"):
        create_store("wandb")


def test_mlflow_telemetry_is_off_unless_opted_in():
    import os
    import subprocess
    import sys

    # mlflow's own switch (its CI/pytest detection would hide the opt-in from is_telemetry_disabled())
    code = (
        "import medtricks.tracking.mlflow_store; from mlflow.environment_variables import "
        "MLFLOW_DISABLE_TELEMETRY; print(MLFLOW_DISABLE_TELEMETRY.get())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert off.stdout.strip().endswith("True"), off.stderr
    opted_in = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert opted_in.stdout.strip().endswith("False"), opted_in.stderr
