"""`medtricks evaluate` at the operating point, prior shift, drop vs the internal test split,
per-image predictions of evaluation runs, and `medtricks compare` on evaluation runs."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medtricks.ablation import compare_runs
from medtricks.cli import main
from medtricks.evaluate import compute_metrics, paired_bootstrap_delta
from medtricks.evaluate.operating_point import (
    OPERATING_POINT_FILE,
    OperatingPoint,
    class_priors,
    prior_shift,
    probs_at_threshold,
)
from medtricks.posthoc import evaluate_trained, performance_drop, resolve_decision_rule, unpaired_bootstrap_delta
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe


ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- unpaired bootstrap
def _fixed_accuracy_set(n, accuracy, seed):
    """n binary predictions of which exactly ``accuracy * n`` are right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right = rng.permutation(n) < round(accuracy * n)
    pred = np.where(right, y, 1 - y)
    p1 = np.where(pred == 1, 0.8, 0.2)
    return y, np.c_[1 - p1, p1]


def accuracy(y, p):  # numpy, so thousands of resamples stay fast; "accuracy" (sklearn) is checked below
    return float(np.mean(p.argmax(1) == y))


def test_unpaired_bootstrap_matches_the_normal_approximation():
    ya, pa = _fixed_accuracy_set(2000, 0.9, 0)
    yb, pb = _fixed_accuracy_set(2000, 0.7, 1)
    d = unpaired_bootstrap_delta(ya, pa, yb, pb, accuracy, n_bootstrap=2000, seed=0)
    assert d["value_a"] == pytest.approx(0.9) and d["value_b"] == pytest.approx(0.7)
    assert d["delta"] == pytest.approx(0.2)
    # two independent proportions: SE = sqrt(p1 q1 / n1 + p2 q2 / n2)
    half = 1.96 * np.sqrt(0.9 * 0.1 / 2000 + 0.7 * 0.3 / 2000)
    assert d["ci_low"] == pytest.approx(0.2 - half, abs=0.004)
    assert d["ci_high"] == pytest.approx(0.2 + half, abs=0.004)
    assert d["n_skipped"] == 0


def test_unpaired_bootstrap_of_one_set_against_itself_is_wider_than_paired():
    y, p = _fixed_accuracy_set(1000, 0.8, 2)
    unpaired = unpaired_bootstrap_delta(y, p, y, p, accuracy, n_bootstrap=1000, seed=0)
    paired = paired_bootstrap_delta(y, p, p, accuracy, n_bootstrap=1000, seed=0)
    assert unpaired["delta"] == 0.0 and paired["ci_low"] == paired["ci_high"] == 0.0
    # independent resamples of the same set: the difference of two proportions, SE sqrt(2) x one set's
    half = 1.96 * np.sqrt(2 * 0.8 * 0.2 / 1000)
    assert unpaired["ci_low"] == pytest.approx(-half, abs=0.005)
    assert unpaired["ci_high"] == pytest.approx(half, abs=0.005)
    again = unpaired_bootstrap_delta(y, p, y, p, accuracy, n_bootstrap=1000, seed=0)
    assert again == unpaired  # seeded
    named = unpaired_bootstrap_delta(y[:200], p[:200], y[200:400], p[200:400], "accuracy", n_bootstrap=50, seed=0)
    assert named["metric"] == "accuracy" and named["delta"] == pytest.approx(
        accuracy(y[:200], p[:200]) - accuracy(y[200:400], p[200:400])
    )
    assert named["ci_low"] <= named["delta"] <= named["ci_high"]


def test_performance_drop_values_match_compute_metrics():
    rng = np.random.default_rng(3)
    y_int, y_ext = rng.integers(0, 2, 200), rng.integers(0, 2, 150)
    p_int = np.clip(np.eye(2)[y_int] * 0.6 + rng.uniform(0, 0.4, (200, 2)), 0, 1)
    p_ext = rng.dirichlet([1, 1], 150)
    p_int /= p_int.sum(1, keepdims=True)
    drop = performance_drop(y_int, p_int, y_ext, p_ext, ["normal", "pneumonia"], n_bootstrap=100, seed=0)
    internal = compute_metrics(y_int, p_int, ["normal", "pneumonia"], n_bootstrap=0).values
    external = compute_metrics(y_ext, p_ext, ["normal", "pneumonia"], n_bootstrap=0).values
    rows = {r["metric"]: r for r in drop.rows}
    assert list(rows) == ["accuracy", "auroc", "sensitivity", "specificity"]
    for name, key in [
        ("accuracy", "accuracy"),
        ("auroc", "auroc"),
        ("sensitivity", "sensitivity/pneumonia"),
        ("specificity", "specificity/pneumonia"),
    ]:
        assert rows[name]["value_a"] == pytest.approx(internal[key])
        assert rows[name]["value_b"] == pytest.approx(external[key])
        assert rows[name]["delta"] == pytest.approx(internal[key] - external[key])
        assert rows[name]["ci_low"] <= rows[name]["delta"] <= rows[name]["ci_high"]
    logged = drop.to_metrics()
    assert set(logged) >= {"eval/drop/auroc", "eval/drop/auroc_ci_low", "eval/drop/sensitivity_ci_high"}
    assert "internal test" in drop.table() and "unpaired bootstrap" in drop.table()


def test_unpaired_bootstrap_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="classes"):
        unpaired_bootstrap_delta([0, 1], np.eye(2), [0, 1, 2], np.eye(3), "accuracy")
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2, 2\)"):
        unpaired_bootstrap_delta([0, 1, 1], np.eye(2), [0, 1], np.eye(2), "accuracy")


# ----------------------------------------------------------------------------- decision rules
def _fake_trained(run_dir, classes=("normal", "pneumonia")):
    return SimpleNamespace(
        run_dir=Path(run_dir),
        run_id=None,
        classes=list(classes),
        recipe=SimpleNamespace(tracking=SimpleNamespace(uri=None)),
    )


def test_decision_rule_without_a_stored_operating_point_is_0_5_and_says_so(tmp_path):
    (tmp_path / "model").mkdir()
    rule = resolve_decision_rule(_fake_trained(tmp_path))
    assert rule.threshold == 0.5 and rule.source == "default" and OPERATING_POINT_FILE in rule.description
    with pytest.raises(ValueError, match="--prevalence needs the class priors"):
        resolve_decision_rule(_fake_trained(tmp_path), prevalence=0.3)
    # an old run still has its split manifest: the training priors come from there
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "split_manifest.csv").write_text(
        "image_id,label,target,patient,split\n"
        + "".join(
            f"i{i},x,{t},p{i},{s}\n"
            for i, (t, s) in enumerate(
                [(0, "train"), (1, "train"), (1, "train"), (1, "train"), (0, "val"), (0, "test")]
            )
        )
    )
    rule = resolve_decision_rule(_fake_trained(tmp_path), prevalence=0.3)
    assert rule.train_priors == [0.25, 0.75] and "split_manifest" in rule.priors_source


def test_decision_rule_from_a_stored_operating_point(tmp_path):
    (tmp_path / "model").mkdir()
    OperatingPoint(threshold=0.3, method="youden", train_priors=[0.6, 0.4]).to_json(
        tmp_path / "model" / OPERATING_POINT_FILE
    )
    trained = _fake_trained(tmp_path)
    stored = resolve_decision_rule(trained, prevalence=0.7)
    assert stored.threshold == 0.3 and stored.source == "stored" and stored.train_priors == [0.6, 0.4]
    p = np.array([[0.8, 0.2], [0.65, 0.35], [0.9, 0.1]])
    # prior shift, then the threshold: p' = shift(p); positive iff p'_1 >= 0.3
    expected = prior_shift(p, [0.6, 0.4], 0.7)[:, 1] >= 0.3
    assert np.array_equal(stored.apply(p).argmax(1) == 1, expected)
    assert np.array_equal(stored.apply(p, shift=False).argmax(1) == 1, p[:, 1] >= 0.3)
    assert "0.400 to 0.700" in stored.describe()
    assert resolve_decision_rule(trained, threshold="0.5").threshold == 0.5
    assert resolve_decision_rule(trained, threshold=0.25).source == "given"
    for bad in ("abc", "1.5", "0", "nan"):
        with pytest.raises(ValueError, match=f"--threshold must be .*{bad}"):
            resolve_decision_rule(trained, threshold=bad)
    with pytest.raises(ValueError, match="--prevalence must be .*1.2"):
        resolve_decision_rule(trained, prevalence=1.2)


def test_decision_rule_options_are_refused_for_multiclass(tmp_path):
    trained = _fake_trained(tmp_path, classes=("normal", "bacterial", "covid"))
    assert resolve_decision_rule(trained) is None
    with pytest.raises(ValueError, match="--threshold 0.4 applies to binary models.*3 classes"):
        resolve_decision_rule(trained, threshold="0.4")
    with pytest.raises(ValueError, match="--prevalence applies to binary models"):
        resolve_decision_rule(trained, prevalence=0.2)


# --------------------------------------------------------------------- a tiny trained binary run
def binary_phantoms(folder: Path, binary_phantom_card) -> Path:
    """80 two-class phantoms (normal / pneumonia, 32 px) and a binary card for them; returns the card."""
    from medtricks.data import synthesize_phantoms

    if not (folder / "data").is_dir():
        synthesize_phantoms(folder / "data", n=80, classes=("normal", "pneumonia"), size=32, seed=0)
    return binary_phantom_card(folder)


@pytest.fixture(scope="module")
def binary_run(fresh_sqlite_uri, binary_phantom_card, tmp_path_factory, binary_run_overrides):
    tmp = tmp_path_factory.mktemp("binary")
    uri = fresh_sqlite_uri(tmp)
    card = binary_phantoms(tmp, binary_phantom_card)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=binary_run_overrides(tmp, card, uri))
    result = run_recipe(recipe, quiet=True)
    assert (result.run_dir / "model" / OPERATING_POINT_FILE).is_file()  # the run stores its operating point
    return result, uri, tmp, card


def test_evaluate_reports_the_operating_point_and_the_drop_and_logs_predictions(binary_run, tmp_path):
    result, uri, tmp, card = binary_run
    op = OperatingPoint.from_json(result.run_dir / "model" / OPERATING_POINT_FILE)
    report = evaluate_trained(
        str(result.run_dir), card=str(card), root=str(tmp / "data"), n_bootstrap=20, tracking_uri=uri, progress=False
    )
    y, probs = report.y_true, report.probs
    assert report.rule.source == "stored" and report.rule.threshold == pytest.approx(op.threshold)
    at_op = compute_metrics(y, probs_at_threshold(probs, op.threshold), ["normal", "pneumonia"], n_bootstrap=20)
    assert report.metrics_op.values["accuracy"] == pytest.approx(at_op.values["accuracy"])
    assert report.metrics_op.values["sensitivity/pneumonia"] == pytest.approx(np.mean(probs[y == 1, 1] >= op.threshold))
    assert "ece" not in report.metrics_op.values  # reweighted probabilities are not calibrated scores

    client = MlflowClient(uri)
    run = client.get_run(report.run_id)
    metrics = run.data.metrics
    assert metrics["eval/accuracy"] == pytest.approx(report.metrics.values["accuracy"])
    assert metrics["eval/op/accuracy"] == pytest.approx(at_op.values["accuracy"])
    assert metrics["eval/op/threshold"] == pytest.approx(op.threshold)
    assert {
        "eval/drop/auroc",
        "eval/drop/auroc_ci_low",
        "eval/drop/auroc_ci_high",
        "eval/drop/sensitivity",
        "eval/drop/specificity",
        "eval/drop/accuracy",
    } <= set(metrics)
    with np.load(result.run_dir / "artifacts" / "predictions_test.npz") as test:
        internal_acc = np.mean(probs_at_threshold(test["probs"], op.threshold).argmax(1) == test["y_true"])
    external_acc = np.mean((probs[:, 1] >= op.threshold) == (y == 1))
    assert metrics["eval/drop/accuracy"] == pytest.approx(internal_acc - external_acc)
    assert run.data.params["threshold_source"] == "stored"

    # per-image predictions: y_true, probs, probs at the operating point and an image-set digest; no names
    path = client.download_artifacts(report.run_id, "predictions/predictions_eval.npz", str(tmp_path))
    with np.load(path) as saved:
        assert set(saved.files) == {"y_true", "probs", "probs_op", "image_set"}
        assert np.array_equal(saved["y_true"], y) and np.allclose(saved["probs"], probs, atol=1e-6)
        assert len(str(saved["image_set"])) == 64
    logged_text = " ".join(str(v) for v in run.data.params.values())
    assert "img_" not in logged_text and "PH000" not in logged_text  # no file names, no patient IDs


def test_evaluate_with_prevalence_and_a_given_threshold(binary_run):
    result, uri, tmp, card = binary_run
    op = OperatingPoint.from_json(result.run_dir / "model" / OPERATING_POINT_FILE)
    report = evaluate_trained(
        str(result.run_dir),
        card=str(card),
        root=str(tmp / "data"),
        split="test",
        threshold="0.5",
        prevalence=0.8,
        n_bootstrap=0,
        log=False,
        progress=False,
    )
    priors = op.train_priors or class_priors([0, 1], 2)
    expected = prior_shift(report.probs, priors, 0.8)[:, 1] >= 0.5
    assert np.array_equal(report.probs_op.argmax(1) == 1, expected)
    assert report.rule.prevalence == 0.8 and report.rule.source == "given"
    assert "0.800" in report.table()


def test_evaluate_cli_prints_both_thresholds_and_refuses_bad_options(binary_run, capsys, tmp_path):
    result, uri, tmp, card = binary_run
    code = main(
        [
            "evaluate",
            str(result.run_dir),
            "--card",
            str(card),
            "--root",
            str(tmp / "data"),
            "--n-bootstrap",
            "10",
            "--no-log",
            "--save-predictions",
            str(tmp_path / "p.npz"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "threshold 0.5 (argmax)" in out and "at the operating point" in out and "Drop vs the run's internal" in out
    assert (tmp_path / "p.npz").is_file()
    assert (
        main(
            [
                "evaluate",
                str(result.run_dir),
                "--card",
                str(card),
                "--root",
                str(tmp / "data"),
                "--threshold",
                "high",
                "--no-log",
            ]
        )
        == 2
    )
    assert "--threshold must be stored, youden, sens=S" in capsys.readouterr().err  # the forms predict takes


def test_compare_accepts_eval_metrics_and_pairs_evaluations_of_the_same_images(binary_run):
    result, uri, tmp, card = binary_run
    common = dict(card=str(card), root=str(tmp / "data"), n_bootstrap=10, tracking_uri=uri, progress=False)
    plain = evaluate_trained(str(result.run_dir), **common)
    tta = evaluate_trained(str(result.run_dir), tta="flip", **common)
    val_only = evaluate_trained(str(result.run_dir), split="val", **common)

    text = compare_runs(run_ids=[plain.run_id, tta.run_id], metric="eval/auroc", tracking_uri=uri)
    assert "## eval/auroc in 2 given run(s) (2 runs)" in text
    assert f"{plain.metrics.values['auroc']:.4f}" in text and f"{tta.metrics.values['auroc']:.4f}" in text
    expected = paired_bootstrap_delta(plain.y_true, tta.probs, plain.probs, "auroc", n_bootstrap=1000, seed=0)
    assert f"Paired on the same {plain.n_images} eval images" in text
    row = next(
        line
        for line in text.splitlines()
        if line.startswith("| eval-") and "[" in line and "Δ" not in line and f"{expected['delta']:+.4f}" in line
    )
    assert f"[{expected['ci_low']:+.4f}, {expected['ci_high']:+.4f}]" in row

    at_op = compare_runs(run_ids=[plain.run_id, tta.run_id], metric="eval/op/accuracy", tracking_uri=uri)
    expected = paired_bootstrap_delta(plain.y_true, tta.probs_op, plain.probs_op, "accuracy", n_bootstrap=1000, seed=0)
    assert f"{expected['delta']:+.4f}" in at_op

    other = compare_runs(run_ids=[plain.run_id, val_only.run_id], metric="eval/auroc", tracking_uri=uri)
    assert (
        f"evaluated on other images than {plain.run_id[:12]} ({val_only.n_images} vs {plain.n_images} images)" in other
        and "Paired on the same" not in other
    )

    with pytest.raises(ValueError, match="evaluation runs"):
        from medtricks.ablation.table import metric_keys

        metric_keys("eval/auroc")  # ablations train: they cannot rank by an evaluation metric
