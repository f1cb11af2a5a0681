"""The MLflow store (issue 15): a tracker that goes away mid-run does not stop training, what it could not send is
kept and replayed; two processes creating the same sqlite store do not race.

Failures are faked on ``MlflowClient`` methods (the messages MLflow raises for a locked sqlite database
or a server that is down); one test uses a real dead HTTP address. Slow tests (``-m slow``): a real
``mlflow server`` killed mid-run and restarted, and two processes creating fresh databases repeatedly.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

import medtricks.tracking.mlflow_store as mt
from medtricks.rundir import RunDir
from medtricks.tracking import TrackingUnavailableError, TrackingWarning, create_store, replay_unsent
from medtricks.tracking.replay import main as replay_main

ROOT = Path(__file__).resolve().parents[2]
WRITES = ("log_batch", "set_tag", "log_artifact", "log_text", "log_figure", "set_terminated", "get_run")


class Outage:
    """Switchable failures of MlflowClient's write methods; records every call that got through."""

    def __init__(self, monkeypatch, error=None):
        self.down = False
        self.error = error or (
            lambda: MlflowException(
                "API request to http://tracking:5000/api/2.0/mlflow/runs/log-batch failed with exception "
                "ConnectionError('Connection refused')"
            )
        )  # what mlflow raises for a server that is down
        self.attempts = 0
        self.depth = 0
        self.sent: list[str] = []
        for name in WRITES:
            original = getattr(MlflowClient, name)
            monkeypatch.setattr(MlflowClient, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def method(client, *args, **kwargs):
            if self.depth:  # a call MlflowClient makes inside another (log_text -> log_artifact)
                return original(client, *args, **kwargs)
            self.attempts += 1
            if self.down:
                raise self.error()
            self.sent.append(name)
            self.depth += 1
            try:
                return original(client, *args, **kwargs)
            finally:
                self.depth -= 1

        return method


@pytest.fixture(scope="module")
def make_store(fresh_sqlite_uri):
    """``make_store(tmp_path, cooldown=(0, 0))``: a started MlflowStore on a fresh sqlite db, with the run folder
    tmp_path/run, retrying instantly -- ``(store, uri, run_dir)``."""

    def make(tmp_path, *, cooldown=(0.0, 0.0)):
        uri = fresh_sqlite_uri(tmp_path)
        run_dir = tmp_path / "run"
        (run_dir / "store").mkdir(parents=True)
        store = create_store("mlflow", uri)
        store.retry_delays = (0.0, 0.0)
        store.final_retry_delays = (0.0, 0.0)
        store.cooldown_s = cooldown
        store.start(experiment="exp", run_name="r", tags={"run_dir": str(run_dir)})
        return store, uri, run_dir

    return make


def _spool_ops(run_dir):
    path = run_dir / "store" / "unsent.jsonl"
    return [json.loads(line)["op"] for line in path.read_text().splitlines()] if path.is_file() else []


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    return fig


# ------------------------------------------------------------------------------ item 6: the tracker
def test_a_locked_database_is_retried_and_the_write_lands(make_store, tmp_path, monkeypatch):
    store, uri, run_dir = make_store(tmp_path)
    fails = {"left": 2}
    original = MlflowClient.log_batch

    def locked_twice(client, *args, **kwargs):
        if fails["left"]:
            fails["left"] -= 1
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return original(client, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", locked_twice)
    store.log_metrics({"train/loss": 0.5}, step=1)
    assert fails["left"] == 0 and store.unsent == 0 and not _spool_ops(run_dir)
    store.end()
    run = MlflowClient(uri).get_run(store.run_id)
    assert run.data.metrics == {"train/loss": 0.5} and run.info.status == "FINISHED" and not store.degraded


def test_retries_per_write_are_bounded(make_store, tmp_path, monkeypatch):
    store, _, run_dir = make_store(tmp_path)
    store.retry_delays = (0.2, 0.2, 0.2, 0.2, 0.2)
    store.retry_budget_s = 0.5  # at most ~0.5 s of waiting per write, whatever the delays say
    outage = Outage(monkeypatch)
    outage.down = True
    began = time.monotonic()
    with pytest.warns(TrackingWarning, match="training goes on"):
        store.log_metrics({"train/loss": 0.5}, step=1)
    assert time.monotonic() - began < 1.5
    assert outage.attempts == 3  # tries at 0, 0.2, 0.4 s; the next would start after the budget
    assert _spool_ops(run_dir) == ["metrics"]


def test_server_down_mid_run_keeps_writes_and_sends_them_in_order_when_back(make_store, tmp_path, monkeypatch):
    store, uri, run_dir = make_store(tmp_path)
    outage = Outage(monkeypatch)
    report = tmp_path / "report.csv"
    report.write_text("a,b\n1,2\n")
    outage.down = True
    with pytest.warns(TrackingWarning, match="training goes on"):
        store.log_params({"optim.lr": 0.1, "none": None})
    for step in (1, 2, 3):  # training goes on: every call returns
        store.log_metrics({"train/loss": 1.0 / step}, step=step)
    store.set_tags({"tricks": "warmup"})
    store.log_artifact(report, "tricks")
    store.log_text("# card", "model/MODEL_CARD.md")
    store.log_figure(_figure(), "plots/roc.png")
    assert _spool_ops(run_dir) == ["params", "metrics", "metrics", "metrics", "tags", "artifact", "text", "artifact"]
    assert store.unsent == 8 and store.unsent_path == run_dir / "store" / "unsent.jsonl"
    assert outage.sent == []

    outage.down = False
    with pytest.warns(TrackingWarning, match="answers again: sent 8"):
        store.log_metrics({"train/loss": 0.2}, step=4)
    # kept writes first, in order, then the new one
    assert outage.sent == [
        "get_run",
        "log_batch",
        "log_batch",
        "log_batch",
        "log_batch",
        "set_tag",
        "log_artifact",
        "log_text",
        "log_artifact",
        "log_batch",
    ]
    assert store.unsent == 0 and not (run_dir / "store" / "unsent.jsonl").exists()
    assert not (run_dir / "store" / "unsent").exists()  # the saved figure went, its folder too
    store.end()
    client = MlflowClient(uri)
    run = client.get_run(store.run_id)
    assert run.info.status == "FINISHED" and not store.degraded
    assert run.data.params == {"optim.lr": "0.1", "none": "None"} and run.data.tags["tricks"] == "warmup"
    history = client.get_metric_history(store.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]
    assert history[0].timestamp <= history[1].timestamp <= history[3].timestamp  # logged times kept
    listed = {a.path for folder in ("tricks", "model", "plots") for a in client.list_artifacts(store.run_id, folder)}
    assert listed == {"tricks/report.csv", "model/MODEL_CARD.md", "plots/roc.png"}


def test_an_away_server_is_left_alone_during_the_cooldown_but_end_tries_it(make_store, tmp_path, monkeypatch):
    store, uri, run_dir = make_store(tmp_path, cooldown=(60.0, 60.0))
    outage = Outage(monkeypatch)
    outage.down = True
    with pytest.warns(TrackingWarning):
        store.log_metrics({"train/loss": 1.0}, step=1)
    tried = outage.attempts
    assert tried == 3  # first try + the two (instant) retries
    for step in range(2, 12):
        store.log_metrics({"train/loss": 1.0}, step=step)
    assert outage.attempts == tried  # no call: the next try waits for the cooldown
    assert store.unsent == 11
    outage.down = False
    with pytest.warns(TrackingWarning, match="answers again"):
        store.end()  # the final flush does not wait for the cooldown
    assert MlflowClient(uri).get_run(store.run_id).info.status == "FINISHED" and not store.degraded
    assert len(MlflowClient(uri).get_metric_history(store.run_id, "train/loss")) == 11


def test_end_without_the_server_marks_the_run_degraded_and_replay_sends_it_later(
    make_store, tmp_path, monkeypatch, capsys
):
    store, uri, run_dir = make_store(tmp_path)
    outage = Outage(monkeypatch)
    outage.down = True
    with pytest.warns(TrackingWarning):
        store.log_metrics({"train/loss": 0.5}, step=1)
        store.set_tags({"medtricks.error": "none"})
    with pytest.warns(TrackingWarning, match="degraded") as caught:
        store.end("FINISHED")  # returns: the run is over whether or not MLflow heard it
    message = str(caught[-1].message)
    assert str(run_dir / "store" / "unsent.jsonl") in message
    assert f"python -m medtricks.tracking.replay {run_dir}" in message
    assert store.degraded and store.unsent_path == run_dir / "store" / "unsent.jsonl"
    assert _spool_ops(run_dir) == ["metrics", "tags", "end"]
    RunDir(run_dir).write_state(status="finished", tracking="degraded")  # what run.py does with store.degraded
    outage.down = False
    assert MlflowClient(uri).get_run(store.run_id).info.status == "RUNNING"

    outage.down = True  # still away: nothing is lost, the error says what is left
    with pytest.raises(TrackingUnavailableError, match="3 writes remain"):
        replay_unsent(run_dir, retry_delays=())
    assert _spool_ops(run_dir) == ["metrics", "tags", "end"]

    outage.down = False
    assert replay_main([str(run_dir)]) == 0
    assert "sent 3 kept writes" in capsys.readouterr().out
    run = MlflowClient(uri).get_run(store.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train/loss": 0.5}
    assert run.data.tags["medtricks.error"] == "none"
    assert not (run_dir / "store" / "unsent.jsonl").exists()
    assert RunDir(run_dir).read_state()["tracking"] == "replayed"
    assert replay_unsent(run_dir) == 0  # twice is harmless


def test_a_crash_loses_nothing_the_resumed_run_sends_what_was_kept(make_store, tmp_path, monkeypatch):
    store, uri, run_dir = make_store(tmp_path)
    outage = Outage(monkeypatch)
    outage.down = True
    with pytest.warns(TrackingWarning):
        for step in (1, 2):
            store.log_metrics({"train/loss": float(step)}, step=step)
    run_id = store.run_id
    del store  # the process dies here: no end()
    with open(run_dir / "store" / "unsent.jsonl", "a") as fh:
        fh.write('{"run_id": "' + run_id + '", "op": "met')  # killed mid-line
    outage.down = False
    again = create_store("mlflow", uri)
    with pytest.warns(TrackingWarning) as caught:
        again.start(experiment="exp", run_name="r", tags={"run_dir": str(run_dir)}, resume_run_id=run_id)
    said = " | ".join(str(w.message) for w in caught)
    assert "skipping a line cut short" in said and "sending 2 writes an earlier process" in said
    assert again.unsent == 0 and not (run_dir / "store" / "unsent.jsonl").exists()
    again.end()
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")] == [1, 2]


def test_replay_runs_from_anywhere_and_refuses_a_store_without_the_run(fresh_sqlite_uri, tmp_path, monkeypatch):
    from medtricks.tracking import RunNotFoundError

    work = tmp_path / "work"
    work.mkdir()
    fresh_sqlite_uri(work)
    monkeypatch.chdir(work)
    store = create_store("mlflow", "sqlite:///mlflow.db")  # the default: relative to the training folder
    store.retry_delays, store.final_retry_delays = (), ()
    run_dir = Path("runs") / "exp" / "run1"
    store.start(experiment="exp", run_name="r", tags={"run_dir": str(run_dir)})
    outage = Outage(monkeypatch)
    outage.down = True
    with pytest.warns(TrackingWarning):
        store.log_metrics({"train/loss": 0.5}, step=1)
        store.end()
    outage.down = False
    spool = work / run_dir / "store" / "unsent.jsonl"
    assert json.loads(spool.read_text().splitlines()[0])["uri"] == f"sqlite:///{work / 'mlflow.db'}"
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    wrong = fresh_sqlite_uri(other)
    with pytest.raises(RunNotFoundError, match="--uri"):
        replay_unsent(work / run_dir, uri=wrong)
    assert _spool_ops(work / run_dir) == ["metrics", "end"]  # untouched
    assert replay_main([str(work / run_dir / "store" / "unsent.jsonl")]) == 0
    assert MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(store.run_id).info.status == "FINISHED"
    assert replay_main([str(tmp_path / "no-such-run")]) == 1


def test_a_real_dead_http_server_is_kept_too(make_store, tmp_path, monkeypatch):
    """The errors a real client raises for a server that is gone (no fake): the write is kept."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    store, uri, run_dir = make_store(tmp_path)
    alive = store.client
    store.client = MlflowClient("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.warns(TrackingWarning, match="training goes on"):
        store.log_metrics({"train/loss": 0.5}, step=1)
        store.log_text("x", "notes/a.txt")
    assert _spool_ops(run_dir) == ["metrics", "text"]
    store.client = alive
    with pytest.warns(TrackingWarning, match="answers again"):
        store.end()
    assert MlflowClient(uri).get_run(store.run_id).data.metrics == {"train/loss": 0.5}


def test_start_still_fails_fast_and_a_wrong_write_is_still_raised(make_store, tmp_path, monkeypatch):
    store, uri, run_dir = make_store(tmp_path)
    monkeypatch.setattr(
        MlflowClient,
        "log_batch",
        lambda *a, **k: (_ for _ in ()).throw(
            MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
        ),
    )
    with pytest.raises(MlflowException, match="not allowed"):
        store.log_params({"a": 1})
    assert store.unsent == 0 and not _spool_ops(run_dir)

    def down(*args, **kwargs):
        raise MlflowException("API request failed with exception ConnectionError")

    monkeypatch.setattr(MlflowClient, "search_experiments", down)
    began = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match="not reachable"):
        create_store("mlflow", uri).start(experiment="exp", run_name="r2", tags={"run_dir": str(run_dir)})
    assert time.monotonic() - began < 5


def test_the_spool_survives_a_full_disk_in_memory(make_store, tmp_path, monkeypatch):
    store, uri, run_dir = make_store(tmp_path)
    outage = Outage(monkeypatch)
    outage.down = True
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("unsent.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.warns(TrackingWarning) as caught:
        store.log_metrics({"train/loss": 0.5}, step=1)
    assert any("kept in memory only" in str(w.message) for w in caught)
    monkeypatch.setattr("builtins.open", real_open)
    store.log_metrics({"train/loss": 0.4}, step=2)  # disk has room again: the spool is written whole
    assert _spool_ops(run_dir) == ["metrics", "metrics"]
    outage.down = False
    with pytest.warns(TrackingWarning, match="answers again"):
        store.end()
    assert len(MlflowClient(uri).get_metric_history(store.run_id, "train/loss")) == 2


# ---------------------------------------------------------------- item 8: creating a sqlite store
def test_creating_a_sqlite_store_waits_for_the_lock_next_to_the_database(tmp_path, monkeypatch):
    from filelock import FileLock

    created = []

    class FakeClient:
        def __init__(self, uri):
            created.append(uri)

    monkeypatch.setattr(mt, "MlflowClient", FakeClient)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mt.creation_lock_path(uri) == tmp_path / "mlflow.db.lock"
    assert mt.creation_lock_path("http://host:5000") is None
    held = FileLock(str(tmp_path / "mlflow.db.lock"))
    held.acquire()  # another process is creating the database
    worker = threading.Thread(target=lambda: mt.MlflowStore(uri)._client())
    worker.start()
    time.sleep(0.5)
    assert created == [] and worker.is_alive()
    held.release()
    worker.join(10)
    assert created == [uri]
    mt.MlflowStore("http://127.0.0.1:9")._client()  # a server needs no lock
    assert created == [uri, "http://127.0.0.1:9"]


RACE_WORKER = textwrap.dedent("""
    import os, sys, time
    from medtricks.tracking.mlflow_store import MlflowStore
    me, sync, *dbs = sys.argv[1:]
    for i, db in enumerate(dbs):
        open(os.path.join(sync, f"{i}-{me}"), "w").close()
        while not all(os.path.exists(os.path.join(sync, f"{i}-{w}")) for w in ("a", "b")):
            time.sleep(0.001)
        MlflowStore(f"sqlite:///{db}")._client().search_experiments()
    print("created", len(dbs))
""")


def _race(tmp_path, rounds):
    sync = tmp_path / "sync"
    sync.mkdir()
    dbs = [str(tmp_path / f"fresh{i}" / "mlflow.db") for i in range(rounds)]
    for db in dbs:
        Path(db).parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_WORKER, name, str(sync), *dbs],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0 and f"created {rounds}" in out, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    # every database is whole: a third client opens it and finds the default experiment
    return [len(MlflowClient(f"sqlite:///{db}").search_experiments()) for db in dbs]


@pytest.mark.slow
def test_two_processes_create_the_same_fresh_sqlite_store_at_once(tmp_path):
    experiments = _race(tmp_path, rounds=4)
    assert len(experiments) == 4 and all(n >= 1 for n in experiments)


# ------------------------------------------------------------------- item 6 with a real server (slow)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve(fresh_sqlite_uri):
    """``serve(tmp_path, port)``: an ``mlflow server`` on a sqlite store in tmp_path, once it answers."""

    def serve(tmp_path, port):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                fresh_sqlite_uri(tmp_path),
                "--artifacts-destination",
                str(tmp_path / "artifacts"),
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                MlflowClient(f"http://127.0.0.1:{port}").search_experiments(max_results=1)
                return proc
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        proc.kill()
        raise RuntimeError("mlflow server did not start")

    return serve


def _stop(proc):
    os.killpg(proc.pid, 9)
    proc.wait(30)


@pytest.mark.slow
def test_a_real_server_killed_mid_run_and_restarted(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = serve(tmp_path, port)
    run_dir = tmp_path / "run"
    try:
        store = create_store("mlflow", uri)
        store.retry_delays, store.final_retry_delays, store.cooldown_s = (0.1,), (0.1,), (0.0, 0.0)
        store.start(experiment="exp", run_name="r", tags={"run_dir": str(run_dir)})
        store.log_metrics({"train/loss": 1.0}, step=1)
        _stop(server)
        with pytest.warns(TrackingWarning):
            store.log_metrics({"train/loss": 0.5}, step=2)
            store.log_text("card", "model/MODEL_CARD.md")
            store.end()
        assert store.degraded and _spool_ops(run_dir) == ["metrics", "text", "end"]
        server = serve(tmp_path, port)  # same database: the server is back
        assert replay_unsent(run_dir) == 3
        client = MlflowClient(uri)
        assert client.get_run(store.run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(store.run_id, "train/loss")] == [1, 2]
        assert [a.path for a in client.list_artifacts(store.run_id, "model")] == ["model/MODEL_CARD.md"]
    finally:
        _stop(server)
