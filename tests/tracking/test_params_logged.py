"""Runs log the params of the sections that are on, a `tricks` summary param, and role/variant tags,
so the MLflow compare page's axes are knobs that matter and one filter shows the training runs (issue 21, item 4);
data folders are logged as salted hashes."""

from pathlib import Path

from medtricks.data import folder_id
from medtricks.logged_params import off_sections, run_params
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = [
    "data.synth.n=48",
    "data.synth.size=40",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.n_bootstrap=0",
    "eval.plots=false",
    "train.progress=false",
    "schedule.warmup_epochs=0",
    "tracking.log_model=false",
]


def test_off_sections_keep_only_their_switch():
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=["tricks.bn_gamma.strategy=none"])
    assert {"model.resizer": "enabled", "audit": "enabled", "tricks.bn_gamma": "strategy"}.items() <= off_sections(
        recipe
    ).items()
    params = run_params(recipe)
    assert not [k for k in params if k.startswith("ablation.")]
    assert [k for k in params if k.startswith("audit.")] == ["audit.enabled"] and params["audit.enabled"] is False
    assert [k for k in params if k.startswith("model.resizer.")] == ["model.resizer.enabled"]
    assert [k for k in params if k.startswith("tricks.bn_gamma.")] == ["tricks.bn_gamma.strategy"]
    assert params["tricks"] == (",".join(recipe.tricks_on()) or "none")
    assert params["optim.lr"] == recipe.optim.lr and "data.image_size" in params  # sections that are on: whole
    # bookkeeping that differs between every run of an ablation is no knob (the compare page's axes)
    assert not {"experiment.output_dir", "tracking.uri", "tracking.run_name", "tracking.experiment"} & set(params)
    assert {"experiment.seed", "tracking.log_model"} <= set(params)


def test_sections_that_are_on_are_logged_whole():
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "audit.enabled=true",
            "model.resizer.enabled=true",
            "model.resizer.input_size=64",
            "model.resizer.output_size=32",
            "tricks.bn_gamma.strategy=zero_late",
        ],
    )
    params = run_params(recipe)
    assert {"audit.attacks", "audit.eps", "audit.n", "model.resizer.n_filters", "tricks.bn_gamma.which"} <= set(params)
    assert "zero_late" in params["tricks"] or "bn_gamma" in params["tricks"]


def _tiny(tmp_path, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[*TINY, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}", *extra],
    )


def _check_record(record, recipe):
    assert not [
        k
        for k in record.params
        if k.startswith(("ablation.", "audit.", "model.resizer."))
        and k not in ("audit.enabled", "model.resizer.enabled")
    ]
    assert record.params["audit.enabled"] == "False" and record.params["model.resizer.enabled"] == "False"
    assert record.params["tricks"] == record.tags["tricks"] == (",".join(recipe.tricks_on()) or "none")
    assert record.tags["medtricks.role"] == "train"
    assert record.tags["variant"] == recipe.experiment.name


def test_local_store_run_logs_sections_that_are_on_and_role_tags(tmp_path):
    from medtricks.tracking import LocalStore

    recipe = _tiny(tmp_path, "tracking.backend=none")
    result = run_recipe(recipe, quiet=True)
    record = LocalStore(tmp_path / "runs").get_run(result.run_id)
    _check_record(record, recipe)
    # the full resolved recipe stays the source of truth: ablation and audit settings are in recipe.yaml
    text = (result.run_dir / "recipe.yaml").read_text()
    assert "ablation:" in text and "audit:" in text


def test_mlflow_run_logs_sections_that_are_on_and_one_filter_shows_training_runs(mlflow_uri, tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from mlflow.tracking import MlflowClient

    from medtricks.posthoc import log_evaluation
    from medtricks.tracking.mlflow_store import MlflowStore

    recipe = _tiny(tmp_path, "tracking.backend=mlflow", f"tracking.uri={mlflow_uri}")
    result = run_recipe(recipe, quiet=True)
    _check_record(MlflowStore(mlflow_uri).get_run(result.run_id), recipe)
    client = MlflowClient(mlflow_uri)
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(result.run_id)}

    def save(path):
        np.savez_compressed(path, y_true=np.zeros(2), probs=np.zeros((2, 2)))
        return path

    report = SimpleNamespace(
        rule=None,
        metrics=SimpleNamespace(ci_level=0.95),
        n_images=2,
        image_set="x",
        figures={},
        to_metrics=lambda: {"eval/auroc": 0.5},
        save_predictions=save,
    )
    log_evaluation(
        report,
        uri=mlflow_uri,
        experiment=recipe.experiment.name,
        run_name="eval",
        tags={"medtricks.kind": "evaluation"},
        params={},
    )
    exp = client.get_experiment_by_name(recipe.experiment.name).experiment_id
    assert len(client.search_runs([exp])) == 2
    shown = client.search_runs([exp], filter_string="tags.`medtricks.kind` IS NULL")  # the README's filter
    assert [r.info.run_id for r in shown] == [result.run_id]
    trained = client.search_runs([exp], filter_string="tags.`medtricks.role` = 'train'")
    assert [r.info.run_id for r in trained] == [result.run_id]


def test_data_folders_are_logged_as_salted_hashes(one_step_overrides, one_step_run, tmp_path):
    root = one_step_run.recipe.data.root
    params = one_step_run.tracker.params
    # (the salt is per machine -- here per test -- so the run's hash is checked for its form only)
    assert params["data.root"].startswith("r_") and len(params["data.root"]) == len(folder_id(root))
    assert all(str(root) not in str(v) and "data" != str(v) for v in params.values())
    named = load_recipe(
        QUICKSTART, overrides=[*one_step_overrides, "data.root=/x/Doe_Jane_MRN4711/cxr", "data.cache_dir=/c/Doe"]
    )
    logged = run_params(named)
    assert "Doe" not in " ".join(map(str, logged.values()))
    assert logged["data.root"] == folder_id("/x/Doe_Jane_MRN4711/cxr") != folder_id("/x/other")
