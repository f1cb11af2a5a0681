"""RunStore backends: MLflow against a temporary sqlite store, the null tracker, early failure; tracking URIs that
are unknown, unreachable or never answer fail in seconds (issue 31 item 14)."""

import http.server
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from medtricks.cli import main
from medtricks.tracking import NullStore, check_store, create_store
from medtricks.tracking.mlflow_store import TrackingUnavailableError


def test_mlflow_tracker_roundtrip(fresh_sqlite_uri, tmp_path):
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


@pytest.mark.parametrize("scheme", ["postgresql", "http"])
def test_a_server_that_never_answers_times_out(silent_port, scheme):
    with silent_port() as port:
        started = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match="not reachable"):
            check_store(
                "mlflow",
                f"{scheme}://me@127.0.0.1:{port}/db" if scheme == "postgresql" else f"http://127.0.0.1:{port}",
                timeout=1.0,
            )
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("status,ok", [(200, True), (404, True), (503, False)])
def test_an_http_server_must_answer_below_500(answering_handler, status, ok):
    handler = type("Handler", (answering_handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if ok:
            check_store("mlflow", uri, timeout=2.0)
        else:
            with pytest.raises(TrackingUnavailableError, match="HTTP 503"):
                check_store("mlflow", uri, timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()


def test_local_stores_and_the_local_backend_pass_unchecked(tmp_path):
    check_store("none", "bogus://x")  # tracking.backend: none never reads the URI
    check_store("mlflow", f"sqlite:///{tmp_path / 'x.db'}")
    check_store("mlflow", str(tmp_path / "mlruns"))
    assert not (tmp_path / "x.db").exists()


def test_reading_from_an_unknown_scheme_is_one_line(one_line_error, capsys):
    assert main(["compare", "--experiment", "e", "--tracking-uri", "bogus://x"]) == 2
    assert "unknown scheme" in one_line_error(capsys, "compare")
