"""A team tracking server: MLflow with a PostgreSQL backend store and a proxied artifact root
(`.ci/team_server.sh` starts one on loopback; `.ci/run` does so before the tests). Against it: a tiny
recipe, an ablation whose children train in 2 Ray workers at once (one of them killed and retried),
`compare` and `evaluate` of a run whose folder is gone (everything read back from the server); then
the database itself is asked whether every child run and every metric value arrived exactly once.

Skipped, saying why, when no such server is given (MEDTRICKS_TEST_MLFLOW_SERVER and
MEDTRICKS_TEST_POSTGRES_URI, which `team_server.sh start` prints)."""

import os
import shutil
import uuid
from pathlib import Path

import pytest

from medtricks.cli import main
from medtricks.tricks.base import unregister_trick

SERVER = os.environ.get("MEDTRICKS_TEST_MLFLOW_SERVER")
POSTGRES = os.environ.get("MEDTRICKS_TEST_POSTGRES_URI")
pytestmark = pytest.mark.skipif(
    not (SERVER and POSTGRES),
    reason="no PostgreSQL-backed MLflow server: start one with "
    '`eval "$(bash .ci/team_server.sh start /tmp/medtricks-server)"` (.ci/run does)',
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
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
    "tricks.bn_gamma.strategy=none",
]


def _sql(query: str, *params):
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'medtricks[server]')")
    with psycopg.connect(POSTGRES) as conn:
        return conn.execute(query, params).fetchall()


def _runs(experiment: str, role: str) -> list[tuple[str, str]]:
    """(run id, status) of the experiment's active runs with tag medtricks.role = role, from PostgreSQL."""
    return _sql(
        "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
        "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'medtricks.role' AND t.value = %s "
        "WHERE e.name = %s AND r.lifecycle_stage = 'active'",
        role,
        experiment,
    )


@pytest.fixture
def kill_plugin_name():
    yield "kill_once"
    unregister_trick("kill_once")  # the recipe's plug-in registered it in this process


def test_recipe_ablation_compare_and_evaluate_against_the_team_server(
    kill_once_source, tmp_path, monkeypatch, capsys, kill_plugin_name
):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'medtricks[ray]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)  # what a lab sets once; tracking.uri works the same
    experiment = f"team-{uuid.uuid4().hex[:8]}"  # the server outlives the test: a fresh experiment
    plugin = tmp_path / "kill_once_trick.py"
    plugin.write_text(kill_once_source)
    common = [
        *TINY,
        f"experiment.name={experiment}",
        f"data.root={tmp_path / 'data'}",
        f"experiment.output_dir={tmp_path / 'runs'}",
        f"tracking.uri={SERVER}",
    ]

    # 1. one tiny recipe, its model logged to the server's artifact store
    assert main(["run", str(RECIPES / "quickstart.yaml"), *(a for o in common for a in ("--set", o))]) == 0
    (single,) = [
        r
        for r in _sql(
            "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e "
            "ON r.experiment_id = e.experiment_id WHERE e.name = %s",
            experiment,
        )
    ]
    assert single[1] == "FINISHED"

    # 2. an ablation, 2 variants x 2 seeds, children in 2 one-CPU Ray workers logging at once; the first
    #    seed-1 child is SIGKILLed after epoch 1 and retried by Ray (it resumes its own run)
    marker = tmp_path / "killed.pid"
    args = [
        "ablate",
        str(RECIPES / "quickstart.yaml"),
        "--allow-plugins",
        "--tricks",
        "mixup=0.2",
        "--seeds",
        "2",
        "--executor",
        "ray",
        "--cpus-per-run",
        "1",
        *(
            a
            for o in [
                *common,
                "tracking.log_model=false",
                f"experiment.plugins=[{plugin}]",
                f"tricks.kill_once={marker}",
            ]
            for a in ("--set", o)
        ),
    ]
    assert main(args) == 0
    assert marker.is_file(), "the kill trick never fired"
    parents = _runs(experiment, "ablation_parent")
    children = _runs(experiment, "ablation_child")
    assert len(parents) == 1 and parents[0][1] == "FINISHED"
    assert len(children) == 4 and {status for _, status in children} == {"FINISHED"}
    ids = [run_id for run_id, _ in children]
    pairs = _sql(
        "SELECT v.value, s.value FROM tags v JOIN tags s ON s.run_uuid = v.run_uuid AND s.key = 'seed' "
        "WHERE v.key = 'variant' AND v.run_uuid = ANY(%s)",
        ids,
    )
    assert sorted(pairs) == [("+mixup=0.2", "0"), ("+mixup=0.2", "1"), ("baseline", "0"), ("baseline", "1")]
    parent_tags = _sql("SELECT DISTINCT value FROM tags WHERE key = 'mlflow.parentRunId' AND run_uuid = ANY(%s)", ids)
    assert parent_tags == [(parents[0][0],)]
    # every metric value exactly once: no (run, key, step) twice -- the killed child's retry included
    assert (
        _sql(
            "SELECT run_uuid, key, step, count(*) FROM metrics WHERE run_uuid = ANY(%s) "
            "GROUP BY run_uuid, key, step HAVING count(*) > 1",
            ids,
        )
        == []
    )
    epochs = _sql(
        "SELECT run_uuid, count(*) FROM metrics WHERE key = 'epoch' AND run_uuid = ANY(%s) GROUP BY run_uuid", ids
    )
    assert sorted(n for _, n in epochs) == [2, 2, 2, 2]  # 2 epochs each, none lost, none doubled
    best = _sql("SELECT count(*) FROM latest_metrics WHERE key = 'best/val/auroc' AND run_uuid = ANY(%s)", ids)
    assert best == [(4,)]
    ablation_metrics = _sql(
        "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key LIKE 'ablation/%%'", parents[0][0]
    )
    assert ablation_metrics[0][0] > 0

    # the same command again: every child is found finished on the server, nothing trains
    capsys.readouterr()
    assert main(args) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    assert len(_runs(experiment, "ablation_child")) == 4

    # 3. compare reads the children back from the server
    assert main(["compare", "--experiment", experiment, "--group-by", "variant", "--tracking-uri", SERVER]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "+mixup=0.2" in out

    # 4. evaluate the single run by id with its folder gone: recipe and model come from the server
    shutil.rmtree(tmp_path / "runs")  # as on another machine: no run folder, no local run store
    assert (
        main(
            [
                "evaluate",
                single[0],
                "--card",
                "synthetic-phantoms",
                "--root",
                str(tmp_path / "data"),
                "--n-bootstrap",
                "0",
                "--tracking-uri",
                SERVER,
            ]
        )
        == 0
    )
    evaluations = _sql("SELECT t.run_uuid FROM tags t WHERE t.key = 'mlflow.parentRunId' AND t.value = %s", single[0])
    assert len(evaluations) == 1
    assert _sql(
        "SELECT count(*) FROM latest_metrics WHERE run_uuid = %s AND key = 'eval/auroc'", evaluations[0][0]
    ) == [(1,)]
