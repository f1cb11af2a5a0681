"""`ablate --executor ray`: children as Ray tasks on a local 2-worker cluster, a worker killed mid-run
and retried (the child resumes, its MLflow run stays one run), results in the same parent and table;
settings refused with the key that is wrong; a Ray address that cannot be joined is one line, in seconds."""

import http.server
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medtricks.ablation import run_ablation
from medtricks.ablation.executors import ExecutorSettings
from medtricks.cli import build_parser, main
from medtricks.errors import ConfigError
from medtricks.recipe import load_recipe
from medtricks.tricks.base import unregister_trick

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
QUICKSTART_ARG = str(RECIPES / "quickstart.yaml")
TINY = [
    "data.synth.n=60",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "train.max_steps_per_epoch=2",
    "eval.n_bootstrap=0",
    "train.progress=false",
    "eval.plots=false",
    "tracking.log_model=false",
    "tricks.bn_gamma.strategy=none",
    "experiment.name=abl",
]


def test_executor_settings_refuse_what_does_not_apply():
    ExecutorSettings()  # the local default
    ExecutorSettings(name="ray", address="auto", cpus_per_run=2, gpus_per_run=1, retries=0)
    ExecutorSettings(name="ray", address="ray://head:10001")
    with pytest.raises(ConfigError, match="executor must be one of"):
        ExecutorSettings(name="dask")
    with pytest.raises(ConfigError, match="jobs=2 is for the local executor"):
        ExecutorSettings(name="ray", jobs=2)
    with pytest.raises(ConfigError, match="address, cpus_per_run: Ray-only setting"):
        ExecutorSettings(address="auto", cpus_per_run=2)
    with pytest.raises(ConfigError, match="cpus_per_run must be a number >= 0"):
        ExecutorSettings(name="ray", cpus_per_run=-1)
    with pytest.raises(ConfigError, match="needs cpus_per_run > 0 or gpus_per_run > 0"):
        ExecutorSettings(name="ray", cpus_per_run=0)
    with pytest.raises(ConfigError, match="retries must be an int >= 0"):
        ExecutorSettings(name="ray", retries=-1)
    with pytest.raises(ConfigError, match="address must be 'auto'"):
        ExecutorSettings(name="ray", address="head-node")


def test_cli_passes_the_executor_options():
    args = build_parser().parse_args(
        [
            "ablate",
            "r.yaml",
            "--executor",
            "ray",
            "--address",
            "auto",
            "--cpus-per-run",
            "2",
            "--gpus-per-run",
            "1",
            "--retries",
            "3",
        ]
    )
    assert (args.executor, args.address, args.cpus_per_run, args.gpus_per_run, args.retries) == (
        "ray",
        "auto",
        2.0,
        1.0,
        3,
    )


def test_recipe_section_and_missing_ray_are_clear(tmp_path, monkeypatch):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        overrides=[
            *TINY,
            f"experiment.output_dir={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}",
            "ablation.executor=ray",
            "ablation.cpus_per_run=1",
        ],
    )
    assert recipe.ablation.executor == "ray"
    with pytest.raises(Exception, match="ablation.executor"):
        load_recipe(RECIPES / "quickstart.yaml", overrides=["ablation.executor=slurm"])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'medtricks\[ray\]'"):
        run_ablation(recipe, ["mixup=0.2"], seeds=1, executor="ray", quiet=True)


@pytest.fixture
def kill_plugin(kill_once_source, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_ALLOW_PLUGINS", "1")  # the user opted in; Ray workers get it forwarded
    path = tmp_path / "kill_once_trick.py"
    path.write_text(kill_once_source)
    yield path
    unregister_trick("kill_once")


@pytest.mark.slow  # ~60 s; CI runs the same kill-and-retry through tests/tracking/test_team_server.py
def test_ray_two_workers_retry_a_killed_child(mlflow_uri, tmp_path, kill_plugin):
    """2 variants x 2 seeds on a local Ray with 2 one-CPU workers; the seed-1 child that trains first is
    SIGKILLed after its first epoch. Ray starts it again, it resumes, and every child is one FINISHED
    MLflow run under the one parent; the table has both seeds of both variants."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'medtricks[ray]')")
    marker = tmp_path / "killed.pid"
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        overrides=[
            *TINY,
            f"experiment.output_dir={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}",
            f"experiment.plugins=[{kill_plugin}]",
            f"tricks.kill_once={marker}",
        ],
    )
    result = run_ablation(recipe, ["mixup=0.2"], seeds=2, executor="ray", cpus_per_run=1, retries=2, quiet=True)

    assert marker.is_file(), "the kill trick never fired: the retry was not exercised"
    assert not result.failed and result.table["n_seeds"].tolist() == [2, 2]
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("abl").experiment_id])
    parents = [r for r in runs if r.data.tags.get("medtricks.role") == "ablation_parent"]
    kids = [r for r in runs if r.data.tags.get("medtricks.role") == "ablation_child"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in kids) == [
        ("+mixup=0.2", "0"),
        ("+mixup=0.2", "1"),
        ("baseline", "0"),
        ("baseline", "1"),
    ]
    assert all(r.info.status == "FINISHED" for r in kids)
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parents[0].info.run_id}
    for kid in kids:  # the killed child's retry continued its run: each epoch logged exactly once
        epochs = sorted(m.value for m in client.get_metric_history(kid.info.run_id, "epoch"))
        assert epochs == [1.0, 2.0], (kid.data.tags["variant"], kid.data.tags["seed"], epochs)

    # Re-running the same command finds every child finished: nothing trains, nothing is retried.
    again = run_ablation(recipe, ["mixup=0.2"], seeds=2, executor="ray", cpus_per_run=1, quiet=True)
    assert len(again.skipped) == 4 and again.parent_run_id == result.parent_run_id


# ---- item 15: Ray addresses
@pytest.fixture(scope="module")
def ablate_cli(set_args):
    """``ablate_cli(tmp_path, *args)``: ``medtricks ablate --tricks mixup=0.2 --seeds 1 --executor ray *args``."""

    def run(tmp_path, *args):
        return main(
            [
                "ablate",
                QUICKSTART_ARG,
                "--tricks",
                "mixup=0.2",
                "--seeds",
                "1",
                "--executor",
                "ray",
                *args,
                *set_args(f"experiment.output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'phantoms'}"),
            ]
        )

    return run


@pytest.mark.parametrize(
    "address,message", [("127.0.0.1:{closed}", "Connection refused"), ("garbage::::", "address must be 'auto'")]
)
def test_a_ray_address_that_cannot_be_joined_is_one_line_before_the_parent_run(
    ablate_cli, one_line_error, closed_port, tmp_path, capsys, address, message
):
    pytest.importorskip("ray")
    started = time.monotonic()
    assert ablate_cli(tmp_path, "--address", address.format(closed=closed_port())) == 2
    assert message in one_line_error(capsys, "ablate")
    assert time.monotonic() - started < 60 and not (tmp_path / "runs").exists()


def test_a_ray_client_address_without_ray_client_is_one_line(ablate_cli, one_line_error, tmp_path, capsys):
    pytest.importorskip("ray")
    import importlib.util

    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("ray[client] is installed here")
    assert ablate_cli(tmp_path, "--address", "ray://127.0.0.1:10001") == 2
    assert "pip install 'ray[client]'" in one_line_error(capsys, "ablate")


def test_a_ray_port_that_never_answers_or_is_not_ray_times_out(silent_port, answering_handler):
    pytest.importorskip("ray")
    from medtricks.ablation.executors import ExecutorSettings

    with silent_port() as port:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="no answer within 1 s"):
            ExecutorSettings(name="ray", address=f"127.0.0.1:{port}").check_reachable(timeout=1.0)
        assert time.monotonic() - started < 5
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), answering_handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match="not as a Ray server"):
            ExecutorSettings(name="ray", address=f"127.0.0.1:{server.server_address[1]}").check_reachable(2.0)
    finally:
        server.shutdown()
        server.server_close()
