"""`--resume` (medtricks/run/resume.py): a resume refuses what it cannot honour -- a changed recipe, a finished
run, other data (issues 15 and 31) --, logs replayed steps and epochs once, trains a run folder in one process at
a time, and keeps the tie-break of the selection metric."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medtricks.run
from medtricks.data import build_manifest
from medtricks.errors import ConfigError, ResourceError
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.rundir import RunDir


# ---- item 4: resume
def test_resume_refuses_a_changed_recipe_and_keeps_the_stored_one(tiny_recipe, kill_run, tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path)
    real_fit = kill_run(monkeypatch, after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    unfinished = find_resumable_run_dir(recipe)
    stored = (unfinished / "recipe.yaml").read_text()
    changed = tiny_recipe(tmp_path, "optim.lr=0.004")
    with pytest.raises(ConfigError, match=r"optim.lr: 0.4 -> 0.004.*undo these changes, or run without --resume"):
        run_recipe(changed, resume="auto", quiet=True)
    with pytest.raises(ConfigError, match="optim.lr"):
        run_recipe(changed, resume=str(unfinished), quiet=True)
    assert (unfinished / "recipe.yaml").read_text() == stored  # nothing rewritten
    # What does not change training may differ: the run resumes and finishes.
    result = run_recipe(tiny_recipe(tmp_path, "eval.n_bootstrap=10", "train.log_every=2"), resume="auto", quiet=True)
    assert result.run_dir == unfinished and json.loads((unfinished / "state.json").read_text())["status"] == "finished"


def test_resume_of_a_finished_run_refuses_and_leaves_it_finished(tiny_recipe, tmp_path):
    result = run_recipe(tiny_recipe(tmp_path, "train.epochs=1", "schedule.warmup_epochs=0"), quiet=True)
    with pytest.raises(ConfigError, match="already finished"):
        run_recipe(
            tiny_recipe(tmp_path, "train.epochs=1", "schedule.warmup_epochs=0"), resume=str(result.run_dir), quiet=True
        )
    assert json.loads((result.run_dir / "state.json").read_text())["status"] == "finished"


def test_steps_replayed_after_a_resume_are_logged_once(tiny_recipe, killed_then_resumed, tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path)  # 48 phantoms: 41 train images, 3 updates per epoch at batch 16
    # killed mid epoch 2: step 4 is logged, the epoch is not checkpointed
    result = killed_then_resumed(monkeypatch, recipe, at_step=4)
    store = result.tracker
    steps = [step for step, _ in store.metric_history(store.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # step 4 was replayed after the resume, and logged once


def test_an_epoch_checkpointed_but_not_logged_is_logged_once_after_the_resume(
    tiny_recipe, killed_then_resumed, tmp_path, monkeypatch
):
    """Killed after epoch 1's checkpoint but before its metrics reached the store (kill -9, a lost Ray
    worker): the resumed run logs epoch 1 from the checkpoint, and every epoch exactly once."""
    recipe = tiny_recipe(tmp_path, "train.epochs=3")
    # killed with last.pt of epoch 1 on disk but its metrics not logged
    result = killed_then_resumed(monkeypatch, recipe, before_logging_epoch=1)
    store = result.tracker
    epochs = [value for _, value in store.metric_history(store.run_id, "epoch")]
    assert epochs == [1.0, 2.0, 3.0], epochs
    assert len(store.metric_history(store.run_id, "val/auroc")) == 3
    # and a resume after a logged epoch does not log it twice (the replay is skipped)
    recipe2 = tiny_recipe(tmp_path, "train.epochs=3", f"experiment.output_dir={tmp_path / 'runs2'}")
    again = killed_then_resumed(monkeypatch, recipe2)
    assert [v for _, v in again.tracker.metric_history(again.tracker.run_id, "epoch")] == [1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def killed_after_epoch_1(kill_run):
    """``killed_after_epoch_1(monkeypatch, recipe)``: run ``recipe``, kill it after its first epoch; the
    unfinished run folder."""

    def run(monkeypatch, recipe) -> Path:
        real_fit = kill_run(monkeypatch, after_epoch=1)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, quiet=True)
        monkeypatch.setattr(medtricks.run, "fit", real_fit)
        return find_resumable_run_dir(recipe)

    return run


def _files(folder: Path) -> dict[str, bytes]:
    """Every file the run folder holds that a refused resume must leave alone (the lock files aside)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("run.lock")
    }


# ---- item 8: a resume refuses other data
def test_resume_on_changed_data_is_refused_naming_the_change_and_keeps_the_run_folder(
    tiny_recipe, killed_after_epoch_1, tmp_path, monkeypatch
):
    recipe = tiny_recipe(tmp_path)
    folder = killed_after_epoch_1(monkeypatch, recipe)
    before = _files(folder)
    assert "data_fingerprint" in torch.load(folder / "checkpoints" / "last.pt", weights_only=True)

    # delete 6 images (and their rows): 3 of the validation split, 3 of the training split
    data = tmp_path / "phantoms"
    table = pd.read_csv(data / "phantoms.csv")
    manifest = build_manifest(
        recipe.data.card, data, split_seed=recipe.data.split_seed, val_fraction=recipe.data.val_fraction
    )  # the run's split
    split_of = {Path(p).relative_to(data.resolve()).as_posix(): s for p, s in zip(manifest["path"], manifest["split"])}
    assert set(split_of) == set(table["path"])
    gone = [p for p in sorted(split_of) if split_of[p] == "val"][:3] + [
        p for p in sorted(split_of) if split_of[p] == "train"
    ][:3]
    kept = {rel: (data / rel).read_bytes() for rel in gone}
    for rel in gone:
        (data / rel).unlink()
    table[~table["path"].isin(gone)].to_csv(data / "phantoms.csv", index=False)

    with pytest.raises(ConfigError) as err:
        run_recipe(recipe, resume="auto", quiet=True)
    message = str(err.value)
    assert f"cannot resume {folder}: its data changed" in message
    # fewer patients re-draw the patient-level split: both splits changed, and the images moved are named
    assert "train: 41 -> " in message and "val: 7 -> " in message and "run without --resume" in message
    assert "(3 no longer in the data)" in message and "added e.g. images/img_" in message
    assert "removed e.g. i_" in message and "by their image_id in the run's artifacts/split_manifest.csv" in message
    assert _files(folder) == before  # split_manifest.csv, recipe.yaml, state.json, store: untouched

    # the data back, but one image edited under its own name (same files, labels, splits): a change too
    table.to_csv(data / "phantoms.csv", index=False)
    for rel, content in kept.items():
        (data / rel).write_bytes(content)
    edited = data / gone[0]
    pixels = np.array(Image.open(edited))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(edited)
    with pytest.raises(
        ConfigError,
        match=r"val: 7 -> 7 images \(0 removed, 0 added, 1 with other image bytes; "
        rf"rewritten e.g. {gone[0]}\)",
    ):
        run_recipe(recipe, resume=str(folder), quiet=True)
    assert _files(folder) == before


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning_unless_its_split_manifest_differs(
    tiny_recipe, killed_after_epoch_1, tmp_path, monkeypatch
):
    """Older last.pt files: checked against the run's split_manifest.csv (files, labels, splits) -- a resume
    on the same data warns and finishes; on other data it is refused like a fingerprinted one."""
    recipe = tiny_recipe(tmp_path)
    folder = killed_after_epoch_1(monkeypatch, recipe)
    last = folder / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["data_fingerprint"], state["best_tiebreak"], state["best_tiebreak_value"]
    torch.save(state, last)
    manifest = pd.read_csv(folder / "artifacts" / "split_manifest.csv")
    changed = manifest.copy()
    changed.loc[changed.index[changed["split"] == "val"][0], "split"] = "train"
    changed.to_csv(folder / "artifacts" / "split_manifest.csv", index=False)
    with pytest.raises(ConfigError, match=r"data changed.*val: \d+ -> \d+ images \(0 removed, 1 added"):
        run_recipe(recipe, resume="auto", quiet=True)
    manifest.to_csv(folder / "artifacts" / "split_manifest.csv", index=False)
    with pytest.warns(RuntimeWarning, match="older medtricks without a data fingerprint; the data matches"):
        result = run_recipe(recipe, resume="auto", quiet=True)
    assert result.run_dir == folder and RunDir(folder).is_finished()
    assert "data_fingerprint" in torch.load(last, weights_only=True)  # the next last.pt has one


# ---- item 9: one process per run folder
_HOLD = """
import sys, time
from medtricks.rundir import RunDir
with RunDir(sys.argv[1]).locked():
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_folder_in_use_is_refused_at_once_and_a_killed_holder_does_not_block(
    tiny_recipe, killed_after_epoch_1, tmp_path, monkeypatch
):
    recipe = tiny_recipe(tmp_path)
    folder = killed_after_epoch_1(monkeypatch, recipe)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(ResourceError) as err:
            run_recipe(recipe, resume="auto", quiet=True)
        assert time.perf_counter() - started < 5  # at once: before the data is read or the model built
        assert str(err.value) == (
            f"run folder {folder} is in use by another medtricks process (pid {holder.pid} on "
            f"{os.uname().nodename}); wait for it to end, or stop it"
        )
        holder.send_signal(signal.SIGKILL)  # kill -9: the OS drops its lock; its pid file stays behind
        holder.wait(timeout=30)
        assert (folder / "run.lock").exists() and (folder / "run.lock.pid").exists()
    finally:
        holder.kill()
        holder.stdout.close()
    result = run_recipe(recipe, resume="auto", quiet=True)
    assert result.run_dir == folder and RunDir(folder).is_finished()
    assert not (folder / "run.lock.pid").exists()  # the last holder took its pid with it
    epochs = [v for _, v in result.tracker.metric_history(result.tracker.run_id, "epoch")]
    assert epochs == [1.0, 2.0]


def test_a_second_resume_while_the_run_trains_fails_and_the_epochs_are_logged_once(
    tiny_recipe, killed_after_epoch_1, tmp_path, monkeypatch
):
    """Two `--resume auto` at once: the second finds the folder the first trains into and fails at once."""
    recipe = tiny_recipe(tmp_path, "train.epochs=3")
    folder = killed_after_epoch_1(monkeypatch, recipe)
    real_fit = medtricks.run.fit
    seen = []

    def fit_with_a_rival(*args, on_epoch=None, **kwargs):
        def epoch_then_rival(step, metrics):
            on_epoch(step, metrics)
            if metrics["epoch"] == 2.0:
                with pytest.raises(ResourceError, match=f"run folder {folder} is in use .*pid {os.getpid()}") as err:
                    real_run(recipe, resume="auto", quiet=True)
                seen.append(str(err.value))

        return real_fit(*args, on_epoch=epoch_then_rival, **kwargs)

    real_run = medtricks.run.run_recipe
    monkeypatch.setattr(medtricks.run, "fit", fit_with_a_rival)
    result = run_recipe(recipe, resume="auto", quiet=True)
    assert len(seen) == 1 and "\n" not in seen[0]
    assert [v for _, v in result.tracker.metric_history(result.tracker.run_id, "epoch")] == [1.0, 2.0, 3.0]


def test_a_resumed_run_with_the_tie_break_matches_an_uninterrupted_one(
    tiny_recipe, killed_then_resumed, tmp_path, monkeypatch
):
    full = run_recipe(tiny_recipe(tmp_path, "train.epochs=3"), quiet=True)
    resumed = killed_then_resumed(
        monkeypatch, tiny_recipe(tmp_path, "train.epochs=3", f"experiment.output_dir={tmp_path / 'r2'}")
    )
    assert resumed.best_epoch == full.best_epoch
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)
    card = (resumed.run_dir / "model" / "MODEL_CARD.md").read_text()
    assert "ties broken by val/loss, min" in card
