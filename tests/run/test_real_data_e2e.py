"""Real chest X-rays end to end: fine-tune on a slice of Kermany, evaluate and audit on held-out files.

Runs only with ``MEDTRICKS_REAL_DATA`` (``.ci/run`` sets it); kept to ~10 s with 32 px images.
"""

import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medtricks.posthoc import audit_trained, evaluate_trained
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe


ROOT = Path(__file__).resolve().parents[2]


def _copy_slice(source: Path, target: Path, start: int, count: int) -> None:
    for folder in ("NORMAL", "PNEUMONIA"):
        (target / folder).mkdir(parents=True)
        for path in sorted((source / folder).iterdir())[start : start + count]:
            shutil.copy(path, target / folder / path.name)


@pytest.mark.realdata
def test_kermany_slice_trains_then_evaluates_and_audits_on_held_out_files(fresh_sqlite_uri, real_data_dir, tmp_path):
    source = real_data_dir / "kermany224" / "train"
    if not source.is_dir():
        pytest.skip(f"{source} is missing (see ../shared/data/README.md)")
    _copy_slice(source, tmp_path / "train", 0, 16)
    _copy_slice(source, tmp_path / "test", 200, 6)  # a later slice: other patients, like a test folder
    uri = fresh_sqlite_uri(tmp_path)
    recipe = load_recipe(
        ROOT / "recipes" / "kermany_pneumonia.yaml",
        overrides=[
            f"data.root={tmp_path / 'train'}",
            "data.image_size=32",
            "data.val_fraction=0.3",
            "train.epochs=1",
            "train.batch_size=8",
            "train.progress=false",
            "eval.n_bootstrap=20",
            "eval.plots=false",
            f"experiment.output_dir={tmp_path / 'runs'}",
            f"tracking.uri={uri}",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    assert result.metrics.values["n"] >= 6

    report = evaluate_trained(
        result.run_id,
        card="kermany-pneumonia",
        root=str(tmp_path / "test"),
        tta="flip",
        n_bootstrap=20,
        tracking_uri=uri,
        progress=False,
    )
    assert report.n_images == 12
    assert 0.0 <= report.metrics.values["auroc"] <= 1.0 and math.isfinite(report.metrics.values["accuracy"])
    assert MlflowClient(uri).get_run(report.run_id).data.tags["mlflow.parentRunId"] == result.run_id

    audit = audit_trained(
        str(result.run_dir),
        card="kermany-pneumonia",
        root=str(tmp_path / "test"),
        attacks="fgsm",
        eps="0,2/255",
        corruptions="none",
        n=8,
        log=False,
        progress=False,
    )
    assert audit.n_images == 8 and "fgsm" in audit.table
