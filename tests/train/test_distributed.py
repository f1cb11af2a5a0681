"""Issue 18 item 1: data-parallel training under torchrun (``medtricks run RECIPE --nproc N``).

The launch test starts real gloo processes on the CPU (``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m medtricks run ...``, what ``--nproc 2`` runs) and compares them with one process
training the same global batch. The rest checks the pieces without a process group.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.utils.data import Dataset

import medtricks.cli.training
import medtricks.run
from medtricks.cli import main
from medtricks.errors import ConfigError
from medtricks.recipe import load_recipe
from medtricks.run import make_train_loader, run_recipe
from medtricks.rundir import RunDir
from medtricks.train import distributed
from medtricks.train.engine import seed_epoch
from medtricks.tricks.class_balance import balanced_sampler

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
QUICKSTART_ARG = str(QUICKSTART)


# ------------------------------------------------------------------------ launch: python -m, --nproc
def test_python_dash_m_medtricks_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "medtricks", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0 and "medtricks 0.1.0" in out.stdout


class _FakeLauncher:
    def __init__(self, command):
        _FakeLauncher.commands.append(command)

    def wait(self):
        return 0


def test_nproc_launches_torchrun_with_the_other_arguments(monkeypatch):
    _FakeLauncher.commands = []
    monkeypatch.setattr(medtricks.cli.training.subprocess, "Popen", _FakeLauncher)
    monkeypatch.setattr(medtricks.run, "run_recipe", lambda *a, **k: pytest.fail("trained in the launcher"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["run", "quickstart", "--set", "optim.lr=0.05", "--nproc", "2", "--resume", "auto"]) == 0
    assert _FakeLauncher.commands == [
        [
            sys.executable,
            "-m",
            "medtricks.train.torchrun",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "medtricks",
            "run",
            "quickstart",
            "--set",
            "optim.lr=0.05",
            "--resume",
            "auto",
        ]
    ]


def test_without_nproc_nothing_is_launched(monkeypatch):
    _FakeLauncher.commands, trained = [], []
    monkeypatch.setattr(medtricks.cli.training.subprocess, "Popen", _FakeLauncher)
    monkeypatch.setattr(medtricks.run, "run_recipe", lambda recipe, resume=None: trained.append(resume))
    assert main(["run", "quickstart", "--resume", "auto"]) == 0
    assert main(["run", "quickstart", "--nproc", "1"]) == 0  # one process: no launcher needed
    assert _FakeLauncher.commands == [] and trained == ["auto", None]


def test_torchrun_launches_only_run_and_not_twice(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["weights", "list"]) == 2
    assert "only `medtricks run`" in capsys.readouterr().err
    assert main(["run", "quickstart", "--nproc", "2"]) == 2
    assert "not both" in capsys.readouterr().err


# ------------------------------------------------------------------------ the pieces, one process
def test_outside_torchrun_every_helper_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with distributed.process_group(torch.device("cpu")):
        assert not distributed.launched() and not torch.distributed.is_initialized()
        assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
        assert distributed.wrap(model, torch.device("cpu")) is model
        assert distributed.sync_batchnorm(model, torch.device("cpu"), True) is model  # nothing to synchronize
        assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.sum_across([1.5, 2.0]) == [1.5, 2.0]
        with distributed.main_first():
            pass
    assert distributed.local_device(torch.device("cpu"), "auto") == torch.device("cpu")


def test_sync_bn_refuses_the_cpu_and_converts_timm_norm_act_layers(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.ReLU))
    keys = set(model.state_dict())
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        distributed.sync_batchnorm(model, torch.device("cpu"), True)
    # torch's SyncBatchNorm refuses CPU tensors in forward (gloo); converting needs no GPU
    converted = distributed.sync_batchnorm(model, torch.device("cuda", 0), True)
    assert type(converted[1]) is nn.SyncBatchNorm and isinstance(converted[2], SyncBatchNormAct)
    assert isinstance(converted[2].act, nn.ReLU)  # torch's converter would drop the activation
    assert set(converted.state_dict()) == keys  # a saved model loads into the plain architecture


def test_torchrun_on_cuda_takes_the_local_rank_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.local_device(torch.device("cuda"), "auto") == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cpu"), "cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        distributed.local_device(torch.device("cuda", 0), "cuda:0")


class _Indices(Dataset):
    def __init__(self, n):
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return index, self.targets[index]


def _epoch_order(loader, seed, epoch, rank):
    seed_epoch(seed, epoch, loader, rank=rank)
    return [int(i) for images, _ in loader for i in images]


def test_each_process_takes_its_slice_of_one_seeded_permutation_per_epoch():
    data = _Indices(10)
    loaders = [make_train_loader(data, batch_size=3, seed=5, num_workers=0, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        orders = [_epoch_order(loader, 5, epoch, rank) for rank, loader in enumerate(loaders)]
        # the permutation of the epoch seed (as one process draws its order from), interleaved over the ranks
        permutation = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 100_003 + epoch)).tolist()
        assert orders == [permutation[0::2], permutation[1::2]]
        # the same seed and epoch give the same order: what a resumed run replays
        assert [_epoch_order(loader, 5, epoch, rank) for rank, loader in enumerate(loaders)] == orders
    assert _epoch_order(loaders[0], 5, 0, 0) != _epoch_order(loaders[0], 5, 1, 0)
    assert len(loaders[0]) == len(loaders[1]) == 2  # 5 images each: the same number of updates
    with pytest.raises(ConfigError, match="class_balance=sampler"):
        make_train_loader(data, batch_size=3, seed=5, num_workers=0, sampler=balanced_sampler, num_replicas=2, rank=0)


def test_seed_epoch_of_rank_zero_is_the_one_process_seeding():
    seed_epoch(3, 2)
    one = torch.rand(3)
    seed_epoch(3, 2, rank=0)
    assert torch.equal(torch.rand(3), one)
    seed_epoch(3, 2, rank=1)
    assert not torch.equal(torch.rand(3), one)  # other ranks draw their own augmentation and dropout


def test_resume_refuses_another_process_count(tmp_path):
    recipe = load_recipe(QUICKSTART, overrides=[f"experiment.output_dir={tmp_path / 'runs'}"])
    run = RunDir.create(tmp_path / "runs", "quickstart")
    run.write_state(status="running", world_size=2)
    run.last_checkpoint.parent.mkdir(parents=True)
    run.last_checkpoint.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\).*--nproc 2"):
        run_recipe(recipe, resume=str(run.path), quiet=True)


# ------------------------------------------------------------------------ two gloo processes
# A BatchNorm-free ViT (LayerNorm normalizes each image alone): without SyncBatchNorm, which torch runs on
# GPUs only, 2 x 16 images then compute exactly what 1 x 32 does. 38 phantoms leave 32 training images:
# one global batch per epoch, so the comparison does not depend on the order the images come in.
TINY = [
    "data.synth.n=38",
    "data.synth.size=32",
    "data.image_size=32",
    "data.augment=none",
    "model.name=vit_tiny_patch16_224",
    "model.weights=none",
    "tricks.bn_gamma.strategy=none",
    "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "train.epochs=2",
    "schedule.warmup_epochs=0",
    "train.progress=false",
    "train.log_every=1",
    "train.best_metric=val/loss",
    "train.best_mode=min",
    "eval.n_bootstrap=0",
    "eval.plots=false",
    "tracking.backend=none",
    "tracking.log_model=false",
]


def _overrides(folder, batch_size, data=None):
    return [
        *TINY,
        f"train.batch_size={batch_size}",
        f"data.root={(data or folder) / 'phantoms'}",
        f"experiment.output_dir={folder / 'runs'}",
    ]


def _torchrun(folder, overrides, *extra, env=None):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m medtricks run`` (what --nproc 2 runs)."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("WORLD_SIZE", None)
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "medtricks",
            "run",
            str(QUICKSTART),
            *sets,
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        timeout=600,
    )


def _only_run(folder) -> RunDir:
    states = sorted((folder / "runs").rglob("state.json"))
    assert len(states) == 1, states
    return RunDir(states[0].parent)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One 2 x 16 launch, shared by the tests below."""
    folder = tmp_path_factory.mktemp("two")
    out = _torchrun(folder, _overrides(folder, 16))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return folder, out


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_trains_and_write_one_run(tmp_path, two_processes):
    folder, out = two_processes
    one = run_recipe(load_recipe(QUICKSTART, overrides=_overrides(tmp_path, 32)), quiet=True)
    printed = out.stdout + out.stderr
    assert printed.count("training vit_tiny_patch16_224 on 32 images") == 1  # rank 0 alone prints
    assert "x 2 processes (global batch 32" in printed

    # one run folder, one local-store run, one set of checkpoints
    run = _only_run(folder)
    assert len(list((folder / "runs").rglob("meta.json"))) == 1
    assert run.read_state()["status"] == "finished" and run.read_state()["world_size"] == 2
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.pt", "last.pt"]
    rows = [json.loads(line) for line in run.store_metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["key"] == "train/loss"] == [1, 2]  # logged once, by rank 0
    params = json.loads(run.store_params.read_text())
    assert params["resolved.world_size"] == "2" and params["resolved.global_batch_size"] == "32"  # stored as text
    single = json.loads(RunDir(one.run_dir).store_params.read_text())
    assert params["resolved.lr"] == single["resolved.lr"]  # linear scaling by the global batch
    assert params["resolved.updates_per_epoch"] == single["resolved.updates_per_epoch"] == "1"

    # the same training: losses (the mean over both processes), validation and weights
    two = torch.load(run.last_checkpoint, weights_only=True)
    for epoch, (a, b) in enumerate(zip(one.history, two["history"])):
        assert b["train/epoch_loss"] == pytest.approx(a["train/epoch_loss"], rel=1e-5), epoch
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-5), epoch
    reference = torch.load(RunDir(one.run_dir).last_checkpoint, weights_only=True)["model"]
    assert max(float((two["model"][k] - v).abs().max()) for k, v in reference.items()) < 1e-5


STOP = """import os
from medtricks.tricks.base import Trick, register_trick


class StopAfterEpoch(Trick):  # rank 0 stops after epoch $STOP_AFTER_EPOCH (its last.pt is written by then)
    name = "stop_after_epoch"

    @classmethod
    def tags(cls, recipe):
        return ["stop_after_epoch"]

    def on_epoch_end(self, epoch, metrics):
        if os.environ.get("STOP_AFTER_EPOCH") == str(epoch + 1) and os.environ.get("RANK") == "0":
            raise KeyboardInterrupt


register_trick(StopAfterEpoch)
"""


@pytest.mark.slow
def test_two_processes_resume_where_they_stopped_and_reach_the_same_weights(tmp_path, two_processes):
    reference = torch.load(_only_run(two_processes[0]).last_checkpoint, weights_only=True)
    (tmp_path / "stop.py").write_text(STOP)
    overrides = [*_overrides(tmp_path, 16, data=two_processes[0]), f"experiment.plugins=[{tmp_path / 'stop.py'}]"]
    stopped = _torchrun(tmp_path, overrides, env={"STOP_AFTER_EPOCH": "1", "MEDTRICKS_ALLOW_PLUGINS": "1"})
    assert stopped.returncode != 0
    run = _only_run(tmp_path)
    assert torch.load(run.last_checkpoint, weights_only=True)["epoch"] == 0

    resumed = _torchrun(tmp_path, overrides, "--resume", "auto", "--allow-plugins")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert _only_run(tmp_path).path == run.path and run.read_state()["status"] == "finished"
    final = torch.load(run.last_checkpoint, weights_only=True)
    assert [h["train/epoch_loss"] for h in final["history"]] == pytest.approx(
        [h["train/epoch_loss"] for h in reference["history"]], rel=1e-6
    )
    assert max(float((final["model"][k] - v).abs().max()) for k, v in reference["model"].items()) < 1e-6
    rows = [json.loads(line) for line in run.store_metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["key"] == "train/loss"] == [1, 2]  # the replayed step is logged once


# ---- item 16: run --nproc says a refusal once
def test_the_nproc_launcher_says_a_refusal_of_every_process_once(monkeypatch, capsys):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from medtricks.train import distributed

    message = "medtricks run: error: train.batch_size=16 is larger than the training split (41 images / 3 processes)"

    def three_processes_refuse(args):
        for rank in range(3):  # what each process's `medtricks run` does on a MedtricksError under the launcher
            monkeypatch.setenv("WORLD_SIZE", "3")
            monkeypatch.setenv("RANK", str(rank))
            assert distributed.record_failure(message=message)
        monkeypatch.delenv("WORLD_SIZE")
        raise ChildFailedError("medtricks", {0: ProcessFailure(0, 1, 2, "<N/A>")})

    monkeypatch.setattr(torchrun, "run", three_processes_refuse)
    assert distributed.launch(["--standalone", "--nproc-per-node", "3", "-m", "medtricks", "run", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count(message) == 1 and "Traceback" not in err and "ChildFailedError" not in err


def test_a_process_under_the_launcher_leaves_its_error_and_prints_nothing(tmp_path, monkeypatch, capsys):
    from medtricks.train.distributed import RANK_ERRORS_ENV

    monkeypatch.setenv(RANK_ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert main(["run", QUICKSTART_ARG, "--set", "experiment.seed=-1"]) == 2
    assert capsys.readouterr().err == ""
    assert "experiment.seed" in (tmp_path / "rank2.json").read_text()


@pytest.mark.slow
def test_run_nproc_3_with_a_too_large_batch_prints_one_message(set_args, tiny_tracked_overrides, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtricks",
            "run",
            QUICKSTART_ARG,
            "--nproc",
            "3",
            *set_args(
                *tiny_tracked_overrides,
                "tracking.backend=none",
                f"data.root={tmp_path / 'phantoms'}",
                f"experiment.output_dir={tmp_path / 'runs'}",
            ),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("train.batch_size=16 is larger") == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) < 10, out.stderr
