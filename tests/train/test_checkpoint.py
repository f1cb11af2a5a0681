"""Checkpoints (medtricks/train/checkpoint.py): the RNG state round-trips; a planted pickle payload in a run folder
is refused on resume and runs nothing; a full disk keeps the previous checkpoint and leaves no temporary file."""

import os
from pathlib import Path

import pytest
import torch

from medtricks.errors import ConfigError, ResourceError
from medtricks.recipe import dump_recipe, load_recipe
from medtricks.run import run_recipe
from medtricks.tracking import NullStore
from medtricks.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

ROOT = Path(__file__).resolve().parents[2]
MARKER = {"ran": False}


class _Payload:
    def __reduce__(self):  # what an attacker's pickle does: call something on load
        return (MARKER.__setitem__, ("ran", True))


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    save_checkpoint({"rng": state}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_planted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    MARKER["ran"] = False
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=24",
            "data.synth.size=32",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=2",
            "schedule.warmup_epochs=0.5",
            "train.batch_size=8",
            "eval.n_bootstrap=0",
            "train.progress=false",
            f"data.root={tmp_path / 'phantoms'}",
            f"experiment.output_dir={tmp_path / 'runs'}",
        ],
    )
    planted = tmp_path / "runs" / "quickstart" / "29990101-000000-evil00"
    (planted / "checkpoints").mkdir(parents=True)
    torch.save({"model": _Payload()}, planted / "checkpoints" / "last.pt")
    (planted / "recipe.yaml").write_text("")  # a planted folder with another recipe is not resumed at all
    with pytest.raises(ConfigError, match="recipe differs"):
        run_recipe(recipe, resume="auto", tracker=NullStore(), quiet=True)
    (planted / "recipe.yaml").write_text(dump_recipe(recipe))  # one that copies the recipe reaches the checkpoint
    with pytest.raises(RuntimeError, match="cannot be read safely"):
        run_recipe(recipe, resume="auto", tracker=NullStore(), quiet=True)
    assert MARKER["ran"] is False


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    """torch's own file writer turns ENOSPC into an opaque RuntimeError; through a Python file it is a
    one-line ResourceError naming the checkpoint, and the previous checkpoint survives."""
    import builtins

    import medtricks.train.checkpoint as checkpoint
    from medtricks.errors import ResourceError

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint({"epoch": 1}, path)
    real_open = builtins.open
    monkeypatch.setattr(
        checkpoint,
        "open",
        lambda f, mode="r", *a, **k: real_open("/dev/full" if "w" in mode else f, mode, *a, **k),
        raising=False,
    )
    with pytest.raises(
        ResourceError,
        match=r"last\.pt could not be written \(No space left on device\); the "
        r"previous checkpoint there is kept",
    ) as info:
        checkpoint.save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, path)
    assert "\n" not in str(info.value)
    assert checkpoint.load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_save_checkpoint_leaves_no_tmp_file_when_the_disk_is_full(disk_full_after_a_few_bytes, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(torch, "save", lambda state, f, *a, **k: disk_full_after_a_few_bytes(f.name))
    with pytest.raises(ResourceError, match="No space left"):  # one line naming the checkpoint (not an OSError)
        save_checkpoint({"epoch": 2}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}  # the last good checkpoint is intact
