"""Issue 31, items 2, 8, 9, 12: run names stay inside the output folder, a resume refuses other data, a run
folder trains in one process at a time, and ties of the selection metric are broken by a declared metric."""

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
from torch import nn

import medtricks.run
from medtricks.cli import main
from medtricks.data import build_manifest
from medtricks.errors import ConfigError, ResourceError
from medtricks.recipe import RecipeError, dump_recipe
from medtricks.logged_params import run_params
from medtricks.run import find_resumable_run_dir, run_recipe
from medtricks.rundir import RunDir
from medtricks.train import fit

from test_engine import _setup
from test_hardening_run import ROOT, _killed, _tiny, killed_then_resumed


def _killed_after_epoch_1(monkeypatch, recipe) -> Path:
    """Run ``recipe`` and kill it after its first epoch: the unfinished run folder."""
    real_fit = _killed(monkeypatch, after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, quiet=True)
    monkeypatch.setattr(medtricks.run, "fit", real_fit)
    return find_resumable_run_dir(recipe)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file the run folder holds that a refused resume must leave alone (the lock files aside)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("run.lock")
    }


# ---- item 2: experiment.name names one folder inside experiment.output_dir
@pytest.mark.parametrize(
    "name", ["../../x", "a/../../x", "/tmp/elsewhere", "..", ".", ".hidden", "a\\..\\b", "a/b", ""]
)
def test_a_run_name_that_leaves_the_output_folder_is_refused_at_validation(tmp_path, name):
    with pytest.raises(
        RecipeError,
        match=r"experiment\.name = "
        + repr(name).replace("\\", "\\\\").replace(".", r"\.").replace("/", r"/")
        + r".*cannot name a run folder",
    ):
        _tiny(tmp_path, f"experiment.name={name}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_a_bad_run_name_fails_dry_run_too_and_plain_names_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "run",
                str(ROOT / "recipes" / "quickstart.yaml"),
                "--dry-run",
                "--set",
                "experiment.name=../../x",
                "--set",
                f"experiment.output_dir={tmp_path / 'runs'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "experiment.name" in err and "'../../x'" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no store, nothing
    assert _tiny(tmp_path, "experiment.name=kermany_v2-seed.3").experiment.name == "kermany_v2-seed.3"
    with pytest.raises(ConfigError, match="cannot name a run folder"):  # the folder layer refuses as well
        RunDir.create(tmp_path / "runs", "../x")


# ---- item 8: a resume refuses other data
def test_resume_on_changed_data_is_refused_naming_the_change_and_keeps_the_run_folder(tmp_path, monkeypatch):
    recipe = _tiny(tmp_path)
    folder = _killed_after_epoch_1(monkeypatch, recipe)
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


def test_the_fingerprint_is_the_same_on_every_machine_and_names_only_changed_splits(tmp_path, monkeypatch):
    from medtricks.data.splits import changed_splits, split_fingerprint
    from medtricks.data.synthetic import synthesize_phantoms

    root = tmp_path / "phantoms"
    synthesize_phantoms(root, n=40, size=16, seed=0)
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", "machine-a")
    a = build_manifest("synthetic-phantoms", root, val_fraction=0.3)
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", "machine-b")
    b = build_manifest("synthetic-phantoms", root, val_fraction=0.3)
    assert set(a["patient"]).isdisjoint(b["patient"])  # other salt, other hashes ...
    assert split_fingerprint(a, root) == split_fingerprint(b, root)  # ... the same fingerprint
    fingerprint = json.dumps(split_fingerprint(a, root))
    assert not any(p in fingerprint for p in a["patient"]) and "png" not in fingerprint  # no IDs, no paths
    relabelled = a.copy()
    row = relabelled.index[relabelled["split"] == "val"][0]
    relabelled.loc[row, "label"] = "normal" if relabelled.loc[row, "label"] != "normal" else "covid"
    assert changed_splits(split_fingerprint(a, root), split_fingerprint(relabelled, root)) == ["val"]


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning_unless_its_split_manifest_differs(
    tmp_path, monkeypatch
):
    """Older last.pt files: checked against the run's split_manifest.csv (files, labels, splits) -- a resume
    on the same data warns and finishes; on other data it is refused like a fingerprinted one."""
    recipe = _tiny(tmp_path)
    folder = _killed_after_epoch_1(monkeypatch, recipe)
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


def test_a_run_folder_in_use_is_refused_at_once_and_a_killed_holder_does_not_block(tmp_path, monkeypatch):
    recipe = _tiny(tmp_path)
    folder = _killed_after_epoch_1(monkeypatch, recipe)
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


def test_a_second_resume_while_the_run_trains_fails_and_the_epochs_are_logged_once(tmp_path, monkeypatch):
    """Two `--resume auto` at once: the second finds the folder the first trains into and fails at once."""
    recipe = _tiny(tmp_path, "train.epochs=3")
    folder = _killed_after_epoch_1(monkeypatch, recipe)
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


# ---- item 12: ties of the selection metric
def _scripted(values):
    """An evaluate_fn that returns the next (val/auroc, val/loss) pair at each call."""
    calls = iter(values)

    def evaluate_fn(model):
        auroc, loss = next(calls)
        return {"val/auroc": auroc, "val/loss": loss}

    return evaluate_fn


@pytest.mark.parametrize("tiebreak, expected", [("val/loss", 2), (None, 1)])
def test_a_tie_of_the_selection_metric_is_broken_by_the_declared_metric(tmp_path, tiebreak, expected):
    model, train, val, opt, sched, cfg, _ = _setup(tmp_path, epochs=3)
    cfg.best_metric, cfg.best_tiebreak, cfg.best_tiebreak_mode, cfg.max_steps_per_epoch = (
        "val/auroc",
        tiebreak,
        "min",
        1,
    )
    result = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted([(1.0, 0.5), (1.0, 0.3), (1.0, 0.4)]),
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert result.best_epoch == expected
    assert torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)["epoch"] == expected - 1


def test_the_tie_break_state_is_in_the_checkpoint_and_a_resume_keeps_it(tmp_path):
    values = [(0.9, 0.9), (1.0, 0.5), (1.0, 0.3), (1.0, 0.4), (1.0, 0.35)]
    model, train, val, opt, sched, cfg, _ = _setup(tmp_path, epochs=5)
    cfg.best_metric, cfg.best_tiebreak, cfg.max_steps_per_epoch = "val/auroc", "val/loss", 1
    full = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted(values),
        checkpoint_dir=tmp_path / "full",
    )
    # killed after epoch 3, resumed by a fresh process
    model, train, val, opt, sched, cfg, _ = _setup(tmp_path, epochs=3)
    cfg.best_metric, cfg.best_tiebreak, cfg.max_steps_per_epoch = "val/auroc", "val/loss", 1
    fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted(values[:3]),
        checkpoint_dir=tmp_path / "killed",
    )
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert (state["best_epoch"], state["best_tiebreak"], state["best_tiebreak_value"]) == (3, "val/loss", 0.3)
    model, train, val, opt, sched, cfg, _ = _setup(tmp_path, epochs=5)
    cfg.best_metric, cfg.best_tiebreak, cfg.max_steps_per_epoch = "val/auroc", "val/loss", 1
    resumed = fit(
        model,
        train,
        val,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=_scripted(values[3:]),
        checkpoint_dir=tmp_path / "killed",
        resume=True,
    )
    assert full.best_epoch == resumed.best_epoch == 3
    assert resumed.best_tiebreak_value == full.best_tiebreak_value == 0.3


def test_the_tie_break_is_in_the_resolved_recipe_the_logged_params_and_checked(tmp_path):
    recipe = _tiny(tmp_path)
    assert (recipe.train.best_tiebreak, recipe.train.best_tiebreak_mode) == ("val/loss", "min")
    assert "best_tiebreak: val/loss" in dump_recipe(recipe) and "best_tiebreak_mode: min" in dump_recipe(recipe)
    assert run_params(recipe)["train.best_tiebreak"] == "val/loss"
    with pytest.raises(ConfigError, match=r"train.best_tiebreak 'val/los' .*did you mean 'val/loss'"):
        run_recipe(_tiny(tmp_path, "train.best_tiebreak=val/los"), quiet=True)
    assert not (tmp_path / "runs").exists()
    assert _tiny(tmp_path, "train.best_tiebreak=null").train.best_tiebreak is None


def test_a_resumed_run_with_the_tie_break_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    full = run_recipe(_tiny(tmp_path, "train.epochs=3"), quiet=True)
    resumed = killed_then_resumed(
        monkeypatch, _tiny(tmp_path, "train.epochs=3", f"experiment.output_dir={tmp_path / 'r2'}")
    )
    assert resumed.best_epoch == full.best_epoch
    assert [h["val/loss"] for h in resumed.history] == pytest.approx([h["val/loss"] for h in full.history], abs=1e-6)
    card = (resumed.run_dir / "model" / "MODEL_CARD.md").read_text()
    assert "ties broken by val/loss, min" in card
