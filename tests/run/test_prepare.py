"""Preparing a run (medtricks/run/prepare.py): a bad recipe, card, data folder or tracking store fails before a
run folder or a tracked run exists; settings that cannot work together warn."""

import time
from pathlib import Path

import pytest
import torch

import medtricks.run
from medtricks.cli import main
from medtricks.errors import ConfigError, MedtricksError
from medtricks.recipe import RecipeError
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def _runs(tmp_path):
    base = tmp_path / "runs"
    return sorted(p for p in base.rglob("state.json")) if base.exists() else []


# ---- item 5: fail before a run folder or tracked run exists
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["data.card=no-such-card"], MedtricksError, "no-such-card"),
        (
            ["data.synth=null", "data.root=/no/such/folder"],
            MedtricksError,
            "data.root '/no/such/folder' does not exist",
        ),
        (["schedule.warmup_epochs=2"], RecipeError, "warmup_epochs=2 must be less than train.epochs=2"),
        (["train.best_metric=val/aucroc"], ConfigError, "did you mean 'val/auroc'"),
        (["train.batch_size=64"], ConfigError, r"train.batch_size=64 is larger than the training split \(41 images\)"),
    ],
)
def test_bad_runs_fail_before_any_run_folder(tiny_recipe, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run_recipe(tiny_recipe(tmp_path, *overrides), quiet=True)
    assert _runs(tmp_path) == []


# ---- item 20: freezing a block whose gamma is 0
def test_freezing_zero_gamma_blocks_warns(tiny_recipe, tmp_path):
    recipe = tiny_recipe(tmp_path, "tricks.bn_gamma.strategy=zero_late", "model.freeze=all_but_head")
    with pytest.warns(RuntimeWarning, match="can never learn"):
        medtricks.run.prepare.prepare_run(recipe)


@pytest.fixture(scope="module")
def run_tiny(set_args, tiny_tracked_overrides):
    """``run_tiny(tmp_path, *overrides)``: ``medtricks run`` of the tiny quickstart (tracked); the exit code."""

    def run(tmp_path, *overrides):
        sets = [*tiny_tracked_overrides, f"data.root={tmp_path / 'phantoms'}"]
        sets += [f"experiment.output_dir={tmp_path / 'runs'}", *overrides]
        return main(["run", QUICKSTART, *set_args(*sets)])

    return run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_device_cuda_without_cuda_fails_before_a_run_folder(run_tiny, one_line_error, tmp_path, capsys):
    assert run_tiny(tmp_path, "train.device=cuda", "tracking.backend=none") == 2
    line = one_line_error(capsys)
    assert "'cuda'" in line and "CUDA is not available" in line
    assert not (tmp_path / "runs").exists()


def test_an_unknown_scheme_lists_the_supported_ones_before_a_run_folder(run_tiny, one_line_error, tmp_path, capsys):
    assert run_tiny(tmp_path, "tracking.uri=bogus://x") == 2
    line = one_line_error(capsys)
    assert "'bogus://'" in line and "postgresql://" in line and "sqlite:///" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "phantoms").exists()


def test_an_unreachable_database_fails_in_seconds_before_a_run_folder(
    run_tiny, one_line_error, closed_port, tmp_path, capsys
):
    started = time.monotonic()
    assert run_tiny(tmp_path, f"tracking.uri=postgresql://me:s3cret@127.0.0.1:{closed_port()}/mlflow") == 2
    line = one_line_error(capsys)
    assert "not reachable" in line and "s3cret" not in line and "tracking.backend=none" in line
    assert time.monotonic() - started < 60  # MLflow alone retried for about two minutes
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "command", [["ablate", "--tricks", "mixup=0.2", "--seeds", "1"], ["self-train", "--set", "data.label_fraction=0.5"]]
)
def test_ablate_and_self_train_check_the_tracking_uri_before_their_folder(
    one_line_error, set_args, tmp_path, capsys, command
):
    name, *rest = command
    assert (
        main(
            [
                name,
                QUICKSTART,
                *rest,
                *set_args(
                    f"experiment.output_dir={tmp_path / 'runs'}",
                    f"data.root={tmp_path / 'phantoms'}",
                    "tracking.uri=bogus://x",
                ),
            ]
        )
        == 2
    )
    assert "unknown scheme" in one_line_error(capsys, name)
    assert not (tmp_path / "runs").exists()
