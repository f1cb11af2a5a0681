"""`medtricks compare`: side-by-side tables read back from MLflow (sqlite, and a tracking server)."""

import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from medtricks.ablation import compare_runs
from medtricks.tracking import create_store
from medtricks.tracking.query import RunNotFoundError, get_runs

VALUES = {
    ("baseline", 0): 0.80,
    ("baseline", 1): 0.83,
    ("baseline", 2): 0.81,
    ("+warmup", 0): 0.85,
    ("+warmup", 1): 0.86,
    ("+warmup", 2): 0.85,
}


def _log_runs(uri, experiment="exp"):
    """Six finished runs (two variants x three seeds) with bootstrap CIs, a failed run, a parent."""
    ids = {}
    parent = create_store("mlflow", uri)
    parent_id = parent.start(experiment=experiment, run_name="ablation", tags={"medtricks.role": "ablation_parent"})
    parent.end()
    for i, ((variant, seed), value) in enumerate(VALUES.items()):
        t = create_store("mlflow", uri)
        ids[(variant, seed)] = t.start(
            experiment=experiment,
            run_name=f"{variant} | seed {seed}",
            tags={
                "variant": variant,
                "seed": str(seed),
                "tricks": variant.strip("+") or "none",
                "variant_index": "0" if variant == "baseline" else "1",
            },
            parent_run_id=parent_id,
        )
        t.log_params({"eval.ci": 0.95, "experiment.seed": seed, "optim.lr": 0.1 if seed < 2 else 0.05})
        t.log_metrics(
            {
                "best/val/auroc": value,
                "best/val/auroc_ci_low": value - 0.05,
                "best/val/auroc_ci_high": value + 0.04,
                "best/val/ece": 0.1 - value / 10,
            }
        )
        t.end()
    failed = create_store("mlflow", uri)
    ids["failed"] = failed.start(experiment=experiment, run_name="crashed", tags={"variant": "+warmup"})
    failed.end("FAILED")
    return ids


def test_compare_lists_every_run_with_its_bootstrap_ci(mlflow_uri):
    _log_runs(mlflow_uri)
    text = compare_runs(experiment="exp")
    assert "## val/auroc in experiment 'exp' (6 runs)" in text
    lines = text.splitlines()
    rows = [line for line in lines if "| seed " in line and "FINISHED" in line]
    assert len(rows) == 6
    assert rows[0].startswith("| +warmup \\| seed 1") and "0.8600" in rows[0] and "[0.8100, 0.9000]" in rows[0]
    assert "bootstrap 95% CI" in text
    mean, low, high = (
        np.mean(list(VALUES.values())),
        *stats.t.interval(0.95, df=5, loc=np.mean(list(VALUES.values())), scale=stats.sem(list(VALUES.values()))),
    )
    assert f"All 6 runs: mean {mean:.4f} [{low:.4f}, {high:.4f}]" in text
    assert "1 run(s) have no best/val/auroc and are left out: crashed (FAILED)" in text
    assert "1 ablation parent run(s) not listed" in text


def test_compare_groups_by_tag_and_pairs_by_seed(mlflow_uri):
    _log_runs(mlflow_uri)
    text = compare_runs(experiment="exp", group_by="variant")
    base = [VALUES[("baseline", s)] for s in range(3)]
    warm = [VALUES[("+warmup", s)] for s in range(3)]
    mean, low, high = np.mean(warm), *stats.t.interval(0.95, df=2, loc=np.mean(warm), scale=stats.sem(warm))
    diff = np.subtract(warm, base)
    d_low, d_high = stats.t.interval(0.95, df=2, loc=diff.mean(), scale=stats.sem(diff))
    row = next(line for line in text.splitlines() if line.startswith("| +warmup ") and "(reference)" not in line)
    assert "| 3 " in row and f"{mean:.4f} [{low:.4f}, {high:.4f}]" in row
    assert f"{diff.mean():+.4f} [{d_low:+.4f}, {d_high:+.4f}]" in row
    assert f"{stats.ttest_rel(warm, base).pvalue:.3f}" in row
    lines = text.splitlines()
    first_table_rows = [line for line in lines if line.startswith("| baseline ") or line.startswith("| +warmup ")]
    assert "(reference)" in first_table_rows[0]  # baseline first: ablation order from variant_index
    # a lower-is-better metric flips the verdict's direction
    ece = compare_runs(experiment="exp", group_by="variant", metric="val/ece")
    assert "hurts" not in ece and "helps" in ece


def test_compare_by_param_and_by_run_ids(mlflow_uri):
    ids = _log_runs(mlflow_uri)
    by_lr = compare_runs(experiment="exp", group_by="optim.lr")
    assert "| optim.lr " in by_lr and "| 0.05 " in by_lr
    picked = [ids[("baseline", 0)], ids[("+warmup", 0)]]
    text = compare_runs(run_ids=picked)
    assert "2 given run(s) (2 runs)" in text and "0.8000" in text and "0.8500" in text and "0.8300" not in text
    with pytest.raises(RunNotFoundError, match="run id 'nope' not found"):
        compare_runs(run_ids=["nope"])
    with pytest.raises(RunNotFoundError, match="experiment 'missing' not found.*exp"):
        compare_runs(experiment="missing")
    with pytest.raises(ValueError, match="--experiment NAME or --runs"):
        compare_runs()
    with pytest.raises(ValueError, match="val/<name>"):
        compare_runs(experiment="exp", metric="auroc")


def test_query_filters_by_tags_and_status(mlflow_uri):
    ids = _log_runs(mlflow_uri)
    runs = get_runs(experiment="exp", tags={"variant": "+warmup"})
    assert {r.run_id for r in runs} == {ids[("+warmup", s)] for s in range(3)} | {ids["failed"]}
    finished = get_runs(experiment="exp", tags={"variant": "+warmup"}, statuses=["FINISHED"])
    assert len(finished) == 3 and all(r.metrics["best/val/auroc"] >= 0.85 for r in finished)
    assert finished[0].parent_run_id is not None and finished[0].experiment == "exp"
    quoted = get_runs(experiment="exp", tags={"variant": "it's"})
    assert quoted == []


@pytest.mark.slow
def test_compare_against_a_tracking_server(tmp_path, mlflow_template):
    """The same table through `mlflow server` (HTTP), as a team would use it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "server.db"
    shutil.copy(mlflow_template, db)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        _log_runs(uri)
        text = compare_runs(experiment="exp", group_by="variant", tracking_uri=uri)
        assert "| +warmup " in text and "helps" in text and "(6 runs)" in text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_compare_two_runs_pairs_them_on_the_same_images(mlflow_uri, tmp_path):
    from medtricks.evaluate.metrics import paired_bootstrap_delta

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    good = np.clip(np.eye(2)[y] * 0.7 + rng.uniform(0, 0.3, (120, 2)), 0, 1)
    noisy = rng.dirichlet([1, 1], 120)
    probs = {"reference": good / good.sum(1, keepdims=True), "other": noisy}
    ids = {}
    for name, p in probs.items():
        np.savez(tmp_path / "predictions_val.npz", y_true=y, probs=p)
        t = create_store("mlflow", mlflow_uri)
        ids[name] = t.start(experiment="pair", run_name=name, tags={})
        t.log_metrics({"best/val/accuracy": float((p.argmax(1) == y).mean())})
        t.log_artifact(tmp_path / "predictions_val.npz", "predictions")
        t.end()
    text = compare_runs(run_ids=[ids["reference"], ids["other"]], metric="val/accuracy", tracking_uri=mlflow_uri)
    expected = paired_bootstrap_delta(y, probs["other"], probs["reference"], "accuracy", n_bootstrap=1000, seed=0)
    assert "Paired on the same 120 val images: run − reference" in text
    row = next(line for line in text.splitlines() if line.startswith("| other ") and "Δ" not in line and "[" in line)
    assert f"{expected['delta']:+.4f}" in row and f"[{expected['ci_low']:+.4f}, {expected['ci_high']:+.4f}]" in row
