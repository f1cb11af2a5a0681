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

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm
from torch import nn

from medtricks.errors import ConfigError

__all__ = ["launched", "world_size", "rank", "local_rank", "is_main", "local_device", "process_group", "barrier",
           "main_first", "broadcast", "sum_across", "wrap", "sync_batchnorm", "TIMEOUT"]

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
            raise ConfigError(f"train.device={requested!r}: under torchrun each process uses cuda:LOCAL_RANK; set "
                              "train.device to auto or cuda and pick the GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started process LOCAL_RANK={local_rank()} but this machine shows "
                              f"{torch.cuda.device_count()} GPU(s): use --nproc-per-node <= the GPU count")
        return torch.device("cuda", local_rank())
    if device.type == "cpu":
        return device
    raise ConfigError(f"train.device={requested!r} ({device.type}): data-parallel training under torchrun runs on "
                      "CUDA (nccl) or CPU (gloo)")


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
        raise ConfigError(f"train.sync_bn=true needs CUDA: torch {torch.__version__}'s SyncBatchNorm refuses CPU "
                          "tensors (gloo). On CPU set train.sync_bn=false (each process then normalizes with the "
                          "statistics of its own train.batch_size images)")
    return convert_sync_batchnorm(model)
