"""Inference over a loader: targets, class probabilities and mean loss."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from medtricks.errors import ConfigError

__all__ = ["predict", "autocast_context", "resolve_device", "resolve_amp"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU. A device this machine does not have (``cuda`` without CUDA,
    ``cuda:N`` past the GPU count, ``mps`` off Apple silicon) or a name that is no device is a
    :class:`ConfigError` here, before a model, a run folder or a tracked run exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {str(device)!r} is not a device: expected auto, cpu, mps, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else ", a CPU-only build"
            raise ConfigError(
                f"device {str(device)!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}{build}); use cpu, or auto (CUDA when there is one)"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"device {str(device)!r}: this machine shows {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(
                f"device {str(device)!r}: MPS (Apple-silicon GPU) is not available on this machine; use cpu, or auto"
            )
    return resolved


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``train.amp``: none | auto | fp16 | bf16 (fp16 needs CUDA)."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp='fp16' needs a CUDA device; on CPU use 'bf16' or 'none'")
        return torch.float16
    raise ConfigError(f"train.amp must be none, auto, fp16 or bf16, got {amp!r}")


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run ``model`` in eval mode over ``loader``; return (targets, softmax probs, mean CE loss).

    Runs under ``torch.inference_mode()`` (no autograd bookkeeping at all; ``benchmarks/cpu_paths.py``:
    not slower than ``torch.no_grad()``). Everything it returns is numpy or a float, so no caller can
    backpropagate through it; a tensor a model would create and keep during this forward pass would be an
    inference tensor, unusable in a later training step (no medtricks model keeps one)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    targets, probs = [], []
    total_loss, count = 0.0, 0
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc=desc, leave=False)
    try:
        for images, labels in iterator:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            with autocast_context(device, amp_dtype):
                logits = model(images)
            logits = logits.float()
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            targets.append(labels.cpu().numpy())
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("the evaluation loader is empty (no validation images?)")
    return np.concatenate(targets), np.concatenate(probs), total_loss / count
