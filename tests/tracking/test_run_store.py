"""The run store's read side: the local store (tracking.backend: none) round-trips and survives a kill;
ablation resume, compare, load_trained, evaluate and audit work on it; the MLflow store reads without
creating a database."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import medtricks.run  # noqa: E402
from medtricks.rundir import RunDir  # noqa: E402
from medtricks.tracking import LocalStore, NullStore, RunNotFoundError, create_store, find_run

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ local store
def _log_run(store, run_dir, *, variant, value, status="FINISHED", parent=None):
    run_id = store.start(
        experiment="exp",
        run_name=f"{variant} run",
        tags={"variant": variant, "run_dir": str(run_dir)},
        parent_run_id=parent,
    )
    store.log_params({"optim.lr": 0.1, "nothing": None})
    store.log_metrics({"val/auroc": value - 0.1, "skipped": float("nan")}, step=1)
    store.log_metrics({"val/auroc": value, "best/val/auroc": value}, step=2)
    store.end(status)
    return run_id


def test_local_store_round_trips_params_metrics_tags_and_artifacts(tmp_path):
    store = create_store("none", root=tmp_path / "runs")
    assert isinstance(store, LocalStore) and isinstance(store, NullStore) and create_store is create_store
    run_id = store.start(experiment="exp", run_name="first", tags={"variant": "baseline", "seed": 0})
    run = RunDir(store.local_run_dir(run_id))
    assert run.path.parent == tmp_path / "runs" / "exp" and len(run_id) == 32  # a new folder under the root
    store.log_params({"optim.lr": 0.1, "none": None})
    store.log_params({"optim.lr": 0.5})  # like MLflow: a param keeps its first value
    store.log_metrics({"train/loss": 1.0, "nan": float("nan")}, step=1)
    store.log_metrics({"train/loss": 0.5}, step=2)
    store.log_metrics({"train/loss": 0.7}, step=1)  # a late, lower step does not become the latest value
    (tmp_path / "preds.npz").write_bytes(b"npz")
    store.log_artifact(tmp_path / "preds.npz", "predictions")
    run.artifacts.mkdir(exist_ok=True)
    in_place = run.artifacts / "split_manifest.csv"
    in_place.write_text("a,b\n")
    store.log_artifact(in_place, "data")  # already in its home: nothing copied
    fig = plt.figure()
    store.log_figure(fig, "plots/roc.png")
    plt.close(fig)
    store.log_text("hello", "notes/a.txt")
    store.set_tags({"best_epoch": 2})
    store.end()

    # the in-memory view, as NullStore's
    assert store.params["optim.lr"] == 0.1 and store.metrics["train/loss"] == [(1, 1.0), (2, 0.5), (1, 0.7)]
    assert store.status == "FINISHED" and store.tags["best_epoch"] == "2"
    assert set(store.artifacts) >= {"predictions/preds.npz", "data/split_manifest.csv", "plots/roc.png", "notes/a.txt"}

    # read back by a fresh store on the same root
    reader = LocalStore(tmp_path / "runs")
    record = reader.get_run(run_id)
    assert record.run_name == "first" and record.experiment == "exp" and record.status == "FINISHED"
    assert record.params == {"optim.lr": "0.1", "none": "None"}
    assert record.metrics == {"train/loss": 0.5}
    assert record.tags == {"variant": "baseline", "seed": "0", "best_epoch": "2"}
    assert Path(record.run_dir) == run.path and record.start_time > 0
    assert reader.metric_history(run_id, "train/loss") == [(1, 1.0), (2, 0.5), (1, 0.7)]
    got = reader.download_artifact(run_id, "predictions/preds.npz", tmp_path / "dl")
    assert got == run.artifact_for("predictions/preds.npz") and got.read_bytes() == b"npz"
    assert reader.download_artifact(run_id, RunDir.manifest_artifact(), tmp_path / "dl") == in_place
    assert run.artifact_for("plots/roc.png").read_bytes()[:4] == b"\x89PNG"
    assert run.artifact_for("notes/a.txt").read_text() == "hello"
    assert reader.download_artifact(run_id, "plots/missing.png", tmp_path / "dl") is None
    assert reader.has_run(run_id) and not reader.has_run("0" * 32) and not reader.has_run("runs/x")
    with pytest.raises(RunNotFoundError, match="run id 'nope' not found in the local run store"):
        reader.get_run("nope")


def test_local_store_searches_by_experiment_tags_and_status(tmp_path):
    root = tmp_path / "runs"
    parent = _log_run(LocalStore(root), root / "ablation", variant="parent", value=0.5)
    ids = {}
    for i, (variant, status) in enumerate([("baseline", "FINISHED"), ("+warmup", "FINISHED"), ("+warmup", "FAILED")]):
        ids[i] = _log_run(
            create_store("none"),
            root / "deep" / f"child{i}",
            variant=variant,
            value=0.8 + i / 100,
            status=status,
            parent=parent,
        )  # no root: the run_dir tag says where
    other = LocalStore(root)
    other.start(experiment="other", run_name="x", tags={})
    other.end()
    store = LocalStore(root)
    assert store.experiments() == ["exp", "other"]
    runs = store.search_runs("exp")
    assert [r.run_id for r in runs] == [parent, ids[0], ids[1], ids[2]]  # oldest first
    warm = store.search_runs("exp", tags={"variant": "+warmup"})
    assert [r.run_id for r in warm] == [ids[1], ids[2]]
    finished = store.search_runs("exp", tags={"variant": "+warmup"}, statuses=["FINISHED"])
    assert [r.run_id for r in finished] == [ids[1]] and finished[0].parent_run_id == parent
    assert finished[0].metrics["best/val/auroc"] == pytest.approx(0.81)
    assert store.search_runs("exp", tags={"variant": "it's"}) == []
    assert [r.run_id for r in store.get_runs(run_ids=[ids[2], ids[0]])] == [ids[2], ids[0]]
    with pytest.raises(RunNotFoundError, match="experiment 'missing' not found.*experiments there: exp, other"):
        store.search_runs("missing")
    with pytest.raises(RunNotFoundError, match="not in experiment 'other'"):
        store.get_runs(experiment="other", run_ids=[ids[0]])
    assert find_run(ids[1], runs_dirs=[root]).get_run(ids[1]).run_name == "+warmup run"
    assert find_run("unknown-id", runs_dirs=[root]) is None


def test_local_store_without_a_folder_stays_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = create_store("none")
    assert store.start(experiment="e", run_name="r", tags={"a": "b"}) is None
    store.log_metrics({"x": 1.0}, step=2)
    store.end()
    assert store.metrics["x"] == [(2, 1.0)] and store.status == "FINISHED"
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_in_a_used_folder_keeps_the_old_one_out_of_searches(tmp_path):
    first = _log_run(LocalStore(), tmp_path / "run", variant="a", value=0.7, status="FAILED")
    second = _log_run(LocalStore(), tmp_path / "run", variant="a", value=0.9)
    store = LocalStore(tmp_path)
    assert [r.run_id for r in store.search_runs("exp")] == [second] and not store.has_run(first)


def test_local_store_read_after_a_kill_mid_line_and_resume(tmp_path):
    store = LocalStore(tmp_path)
    run_id = store.start(experiment="exp", run_name="killed", tags={"run_dir": str(tmp_path / "run")})
    store.log_metrics({"train/loss": 1.0}, step=1)
    run = RunDir(tmp_path / "run")
    with open(run.store_metrics, "a") as f:  # the process died inside a write
        f.write('{"key": "train/loss", "st')
    reader = LocalStore(tmp_path)
    with pytest.warns(RuntimeWarning, match="last line is cut off"):
        record = reader.get_run(run_id)
    assert record.status == "RUNNING" and record.metrics == {"train/loss": 1.0}
    # resuming the run starts a new line: the cut line stays skipped, nothing else is lost
    again = LocalStore()
    assert (
        again.start(experiment="exp", run_name="killed", tags={"run_dir": str(run.path)}, resume_run_id=run_id)
        == run_id
    )
    again.log_metrics({"train/loss": 0.25}, step=2)
    again.end()
    with pytest.warns(RuntimeWarning, match="line 2 is not a metric record"):
        assert reader.metric_history(run_id, "train/loss") == [(1, 1.0), (2, 0.25)]
        assert reader.get_run(run_id).status == "FINISHED"
    with pytest.raises(RunNotFoundError, match="cannot resume"):
        LocalStore(tmp_path).start(experiment="exp", run_name="x", tags={}, resume_run_id="f" * 32)


_WRITER = """
import sys, time
from medtricks.tracking import LocalStore
store = LocalStore()
store.start(experiment="exp", run_name="victim", tags={"run_dir": sys.argv[1]})
store.log_params({"lr": 0.1})
step = 0
while True:
    step += 1
    store.log_metrics({f"m{i}": float(step) for i in range(50)}, step=step)
    store.set_tags({"step": step})
    if step == 20:
        print("ready", flush=True)
"""


def test_local_store_is_readable_after_kill_9(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cut last line is allowed
        (record,) = LocalStore(tmp_path).search_runs("exp")
        history = LocalStore(tmp_path).metric_history(record.run_id, "m0")
    assert record.status == "RUNNING" and record.params == {"lr": "0.1"} and int(record.tags["step"]) >= 20
    steps = [s for s, _ in history]
    assert steps[:20] == list(range(1, 21)) and steps == sorted(steps) and record.metrics["m0"] >= 20


# ----------------------------------------------------------------------------------- MLflow store
def test_mlflow_store_reads_without_creating_a_database(tmp_path, mlflow_uri):
    missing = f"sqlite:///{tmp_path / 'nothing.db'}"
    store = create_store("mlflow", missing)
    assert not store.has_run("0" * 32) and store.experiments() == []
    with pytest.raises(RunNotFoundError, match="experiment 'exp' not found in MLflow"):
        store.search_runs("exp")
    assert not (tmp_path / "nothing.db").exists()

    writer = create_store("mlflow", mlflow_uri)
    run_id = writer.start(experiment="exp", run_name="r", tags={"run_dir": str(tmp_path), "variant": "a"})
    writer.log_metrics({"train/loss": 1.0}, step=1)
    writer.log_metrics({"train/loss": 0.5}, step=2)
    writer.end()
    reader = create_store("mlflow", mlflow_uri)
    assert reader.has_run(run_id) and not reader.has_run("runs/x") and not reader.has_run("abc")
    assert reader.metric_history(run_id, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert reader.get_run(run_id).run_dir == str(tmp_path) and reader.local_run_dir(run_id) == tmp_path
    assert [r.run_id for r in reader.search_runs("exp", tags={"variant": "a"}, statuses=["FINISHED"])] == [run_id]
    assert find_run(run_id, tracking_uri=mlflow_uri, runs_dirs=[tmp_path / "runs"]).describe().startswith("MLflow")


# ------------------------------------------------------------------- ablation, compare, evaluate, audit
@pytest.fixture(scope="module")
def local_ablation(tmp_path_factory):
    """A real 2-variant ablation with tracking.backend none whose second child is interrupted after its
    first epoch, then the same ablation run again."""
    from medtricks.ablation import run_ablation
    from medtricks.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("local-ablation")
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=48",
            "data.synth.size=32",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=2",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "eval.plots=false",
            "tracking.backend=none",
            "experiment.name=abl",
            f"experiment.output_dir={tmp / 'runs'}",
            f"data.root={tmp / 'phantoms'}",
        ],
    )
    real_log = LocalStore.log_metrics
    real_run = medtricks.run.run_recipe
    calls = []

    def interrupting_log(self, metrics, step=None):
        real_log(self, metrics, step)
        if self.tags.get("variant_index") == "1" and any(k.startswith("val/") for k in metrics):
            raise KeyboardInterrupt  # after the first epoch's checkpoint

    def spy(recipe, **kwargs):
        calls.append((kwargs["extra_tags"]["variant"], recipe.experiment.seed))
        return real_run(recipe, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setattr(medtricks.run, "run_recipe", spy)
        mp.setattr(LocalStore, "log_metrics", interrupting_log)
        with pytest.raises(KeyboardInterrupt):
            run_ablation(recipe, ["mixup=0.2"], seeds=1, quiet=True)
        first_calls = list(calls)
        mp.setattr(LocalStore, "log_metrics", real_log)
        calls.clear()
        result = run_ablation(recipe, ["mixup=0.2"], seeds=1, quiet=True)
    return {"tmp": tmp, "recipe": recipe, "first_calls": first_calls, "calls": calls, "result": result}


def test_local_store_ablation_resumes_after_an_interruption(local_ablation):
    tmp, result = local_ablation["tmp"], local_ablation["result"]
    assert local_ablation["first_calls"] == [("baseline", 0), ("+mixup=0.2", 0)]
    assert local_ablation["calls"] == [("+mixup=0.2", 0)]  # the finished child is skipped
    assert result.skipped == [("baseline", 0)] and not result.failed
    assert sorted(result.children["variant"]) == ["+mixup=0.2", "baseline"] and result.parent_run_id
    store = LocalStore(tmp / "runs")
    parent = store.get_run(result.parent_run_id)
    assert parent.tags["medtricks.role"] == "ablation_parent" and parent.status == "FINISHED"
    kids = store.search_runs("abl", tags={"medtricks.role": "ablation_child"})
    assert len(kids) == 2 and {k.parent_run_id for k in kids} == {result.parent_run_id}
    assert all(k.status == "FINISHED" for k in kids)
    warm = next(k for k in kids if k.tags["variant"] == "+mixup=0.2")
    assert RunDir(warm.run_dir).read_state()["run_id"] == warm.run_id  # the interrupted run continued, same id
    child_runs = list(RunDir.experiment_dir(RunDir(warm.run_dir).output_dir, "abl").iterdir())
    assert child_runs == [Path(warm.run_dir)]  # in its own folder: no second run was started
    epochs = [v for _, v in store.metric_history(warm.run_id, "epoch")] or [
        s for s, _ in store.metric_history(warm.run_id, "val/loss")
    ]
    assert len(epochs) >= 2
    assert RunDir(result.output_dir).store_meta.is_file() and not (tmp / "mlflow.db").exists()
    assert "baseline" in result.markdown()


def test_compare_prints_the_local_store_table(local_ablation, capsys):
    from medtricks.ablation import compare_runs
    from medtricks.cli import main

    tmp = local_ablation["tmp"]
    text = compare_runs(experiment="abl", runs_dir=tmp / "runs", group_by="variant")
    assert "## val/auroc in experiment 'abl' (2 runs)" in text and "| +mixup=0.2 " in text
    assert "1 ablation parent run(s) not listed" in text
    assert main(["compare", "--experiment", "abl", "--runs-dir", str(tmp / "runs")]) == 0
    out = capsys.readouterr().out
    assert "baseline \\| seed 0" in out and "+mixup=0.2 \\| seed 0" in out and "FINISHED" in out
    assert main(["compare", "--experiment", "nope", "--runs-dir", str(tmp / "runs")]) == 2
    assert "experiment 'nope' not found in the local run store" in capsys.readouterr().err


def test_load_trained_evaluate_and_audit_on_local_store_runs(local_ablation, monkeypatch):
    from medtricks.posthoc import audit_trained, evaluate_trained
    from medtricks.posthoc.load import load_trained

    tmp, result = local_ablation["tmp"], local_ablation["result"]
    monkeypatch.chdir(tmp)
    runs = tmp / "runs"
    child = result.children.set_index("variant").loc["baseline"]
    by_id = load_trained(child["run_id"], runs_dir=runs)
    assert by_id.run_id == child["run_id"] and Path(by_id.run_dir) == Path(child["run_dir"])
    assert isinstance(by_id.store, LocalStore)
    with pytest.raises(FileNotFoundError, match="neither a run folder.*local run store"):
        load_trained("f" * 32, runs_dir=runs)

    report = evaluate_trained(
        child["run_id"],
        card="synthetic-phantoms",
        root=str(tmp / "phantoms"),
        split="val",
        n_bootstrap=10,
        progress=False,
        runs_dir=runs,
    )
    store = LocalStore(runs)
    evaluation = store.get_run(report.run_id)
    assert evaluation.parent_run_id == child["run_id"] and evaluation.tags["medtricks.kind"] == "evaluation"
    assert evaluation.metrics["eval/auroc"] == pytest.approx(report.metrics.values["auroc"])
    assert "the local run store" in report.logged_to
    saved = store.download_artifact(report.run_id, RunDir.predictions_artifact("eval"), tmp / "dl")
    with np.load(saved) as data:
        assert np.array_equal(data["y_true"], report.y_true)

    audit = audit_trained(
        child["run_id"],
        attacks="fgsm",
        eps="0,2/255",
        corruptions="none",
        n=8,
        progress=False,
        device="cpu",
        runs_dir=runs,
    )
    assert audit.run_id == child["run_id"]  # logged onto the audited run itself
    audited = store.get_run(child["run_id"])
    assert audited.status == "FINISHED" and any(k.startswith("audit/") for k in audited.metrics)
    assert not (tmp / "mlflow.db").exists()
