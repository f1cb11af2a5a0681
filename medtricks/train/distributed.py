"""Data-parallel training on one node under torchrun: the process group, who is rank 0, and the few
collectives the run needs. Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper is a
no-op for one process, so a plain run takes none of these paths.

    torchrun --nproc-per-node 2 -m medtricks run recipes/quickstart.yaml

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each process it starts. Each process trains
on its own slice of every epoch (a ``DistributedSampler`` in ``run.make_train_loader``) with the model
wrapped in ``DistributedDataParallel`` (:func:`wrap`: gradients are averaged at each backward); rank 0
alone writes the run folder, logs, checkpoints, validates and prints. The backend is ``nccl`` on CUDA
(process ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``) and ``gloo`` on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm
from torch import nn

from medtricks.errors import ConfigError

__all__ = [
    "launched",
    "world_size",
    "rank",
    "local_rank",
    "is_main",
    "local_device",
    "process_group",
    "barrier",
    "main_first",
    "broadcast",
    "sum_across",
    "wrap",
    "sync_batchnorm",
    "TIMEOUT",
    "launch",
    "record_failure",
    "RANK_ERRORS_ENV",
]

#: How long a collective waits for the other processes (rank 0 validates alone while the others wait).
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """True in a process that torchrun started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes training together (1 outside torchrun)."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that owns the run folder, the tracked run, checkpoints and the console."""
    return rank() == 0


def local_device(device: torch.device, requested: str) -> torch.device:
    """The device of this process: under torchrun with CUDA, ``cuda:LOCAL_RANK`` (choose the GPUs with
    ``CUDA_VISIBLE_DEVICES``); CPU stays CPU. ``requested`` is ``train.device``, named in errors."""
    if not launched():
        return device
    if device.type == "cuda":
        if requested not in ("auto", "cuda"):
            raise ConfigError(
                f"train.device={requested!r}: under torchrun each process uses cuda:LOCAL_RANK; set "
                "train.device to auto or cuda and pick the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started process LOCAL_RANK={local_rank()} but this machine shows "
                f"{torch.cuda.device_count()} GPU(s): use --nproc-per-node <= the GPU count"
            )
        return torch.device("cuda", local_rank())
    if device.type == "cpu":
        return device
    raise ConfigError(
        f"train.device={requested!r} ({device.type}): data-parallel training under torchrun runs on "
        "CUDA (nccl) or CPU (gloo)"
    )


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Under torchrun with no process group yet: one for the block (``nccl`` on CUDA, ``gloo`` on CPU),
    destroyed after it. Otherwise (one process, or a caller that made its own group) nothing."""
    if not launched() or _initialized():
        yield
        return
    if not dist.is_available():
        raise ConfigError("torchrun started this process but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors live: the process's GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (they wait): what rank 0 writes there (synthetic
    images, a decode cache) the others then only read."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every process; the others pass anything (``None``) and wait for it.
    With one process, ``obj`` itself."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64); with one process, ``values``."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes train (it broadcasts rank 0's weights and
    buffers, then averages gradients at every backward); ``model`` itself with one process. Train through
    the wrapper; save, average (EMA) and evaluate ``model``."""
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module, device: torch.device, enabled: bool) -> nn.Module:
    """``train.sync_bn``: every BatchNorm computes its batch statistics over the global batch (all
    processes) instead of its own slice. timm's converter (torch's would drop the activation of timm's
    BatchNormAct2d); parameters and buffers are kept, so state dicts stay those of the plain model.
    With one process there is nothing to synchronize and the model is returned unchanged."""
    if not enabled or world_size() == 1:
        return model
    if device.type != "cuda":
        raise ConfigError(
            f"train.sync_bn=true needs CUDA: torch {torch.__version__}'s SyncBatchNorm refuses CPU "
            "tensors (gloo). On CPU set train.sync_bn=false (each process then normalizes with the "
            "statistics of its own train.batch_size images)"
        )
    return convert_sync_batchnorm(model)


# ------------------------------------------------------------------------------- the --nproc launcher
#: Set by :func:`launch` for the processes it starts: a folder where each process that fails leaves what
#: went wrong (``rank<N>.json``), so the launcher says it once instead of N times under torchrun's traceback.
RANK_ERRORS_ENV = "MEDTRICKS_RANK_ERRORS"


def record_failure(message: Optional[str] = None, traceback_text: Optional[str] = None) -> bool:
    """In a process started by :func:`launch`: leave this process's failure for the launcher to report, a
    user-fixable ``message`` (a :class:`~medtricks.errors.MedtricksError` line) or a bug's ``traceback_text``.
    True when it was left (the caller then prints nothing); False outside such a launch or if it could
    not be written (the caller prints as usual)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder or not launched():
        return False
    record = {"rank": int(os.environ.get("RANK", "0")), "message": message, "traceback": traceback_text}
    path = Path(folder) / f"rank{record['rank']}.json"
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def _failures(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else 0):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def _quiet_elastic_logs() -> None:
    """torchrun's agent logs every failed or stopped worker; the launcher reports failures itself."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(argv: list[str]) -> int:
    """``torchrun`` (``torch.distributed.run`` with ``argv``) in this process, reporting a failure once:
    when the processes stopped on a user-fixable error (each said why through :func:`record_failure`),
    its one line (each distinct one once) and exit 2; when one crashed, its traceback; otherwise
    torchrun's own failure summary. ``medtricks run --nproc N`` runs this."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    _quiet_elastic_logs()
    with tempfile.TemporaryDirectory(prefix="medtricks-ranks-") as folder:
        os.environ[RANK_ERRORS_ENV] = folder  # the processes torchrun starts inherit it
        try:
            run(args)
            return 0
        except SignalException as err:  # Ctrl-C / SIGTERM: torchrun stopped its workers (epochs are checkpointed)
            print(
                f"medtricks run: stopped by {err.sigval.name}: the last finished epoch is checkpointed; "
                "continue with --resume auto",
                file=sys.stderr,
            )
            return 130
        except ChildFailedError as err:
            failures = _failures(Path(folder))
            messages = list(dict.fromkeys(f["message"] for f in failures if f.get("message")))
            if messages:  # a user-fixable error; other processes that crashed only stopped with it
                for message in messages:
                    print(message, file=sys.stderr)
                return 2
            crashes = list(dict.fromkeys(f["traceback"] for f in failures if f.get("traceback")))
            for text in crashes:
                print(text, end="" if text.endswith("\n") else "\n", file=sys.stderr)
            if not crashes:  # killed by a signal, out of memory ...: torchrun's summary says which process
                print(err.format_msg(), file=sys.stderr)
            return 1
        finally:
            os.environ.pop(RANK_ERRORS_ENV, None)
