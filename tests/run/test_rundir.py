"""The run folder (medtricks/rundir.py): its state file survives a full disk."""

from pathlib import Path

import pytest

from medtricks.rundir import RunDir


def test_write_state_leaves_no_tmp_file_when_the_disk_is_full(disk_full_after_a_few_bytes, tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.write_state(status="running", run_id="abc")
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: disk_full_after_a_few_bytes(self))
    with pytest.raises(OSError, match="No space left"):
        run.write_state(status="finished")
    monkeypatch.undo()
    assert sorted(p.name for p in run.path.iterdir()) == ["state.json"]
    assert run.read_state() == {"status": "running", "run_id": "abc"}
