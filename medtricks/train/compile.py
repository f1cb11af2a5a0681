"""``torch.compile`` for the training forward pass, with a clean fall-back to eager.

``compile_for_training(module, mode, device)`` returns ``(model_to_train, report)``:

- ``off``: ``module`` itself, unchanged.
- ``on``: a :class:`GuardedCompile` around ``module`` and ``torch.compile(module)`` (inductor).
  A failure when ``torch.compile`` is called, or when inductor compiles lazily at a call (no C++
  compiler, an op it cannot lower, a ``torch._dynamo`` error, a backward graph it cannot compile),
  never stops the run: the wrapper computes that batch eagerly, stays eager from then on and emits
  one ``RuntimeWarning`` that names the reason.
- ``auto``: ``on`` where the measurement below says compiling pays, else ``off`` (see
  :func:`auto_compiles`).

``report`` is ``{"mode", "compiled", "reason"}`` for logging. The wrapper updates the same dict when it
falls back at a call, so a logger that reads it after the first update sees the final state.

The wrapper holds the module outside its own submodules: ``state_dict()``, ``load_state_dict()``,
``parameters()``, ``buffers()``, ``modules()``, ``train()``/``eval()`` and ``to()`` are the module's
own (no ``_orig_mod.`` prefix), so a checkpoint saved from either is the same. Still, like DDP, the
engine should keep the unwrapped module for checkpoints, tricks, EMA and evaluation and use the
wrapper only for the training forward pass (``train_model(images)``); evaluation under
``torch.inference_mode()`` through the wrapper would compile a second graph.

What the guard cannot undo: when a graph fails only after part of the model ran (a graph break
before the failing subgraph), BatchNorm running statistics of that part are updated twice on that one
batch. A failure in the backward *kernels at run time* (not their compilation) surfaces in
``loss.backward()``, outside the wrapper: the backward graph is compiled at the forward call
(``torch._functorch.config.force_non_lazy_backward_lowering``) so that its compile errors are caught.

The ``auto`` decision and the numbers behind it
-----------------------------------------------
Measured with ``python -m benchmarks.cpu_paths`` (``benchmarks/results/cpu_paths.json``) on the
2-vCPU development machine (AMD EPYC, 2 torch threads, torch 2.14.1), batch 32, one-channel input,
random init, SGD step; measured 2026-12-06 at load average 1.2-1.9 (the machine is shared):

| model, 1×input         | eager img/s | compile × | cold compile s | break-even | warm s | break-even | channels_last × | bf16 × |
|------------------------|-------------|-----------|----------------|------------|--------|------------|-----------------|--------|
| efficientnet_lite0/128 | 38.7        | 1.12      | 80.9           | 907        | 1.8    | 20         | 1.40            | 1.39   |
| efficientnet_lite0/160 | 21.0        | 1.26      | 70.0           | 221        | 2.6    | 8          | 1.60            | 1.55   |
| resnet18/128           | 41.7        | 1.08      | 27.6           | 472        | 0.7    | 13         | 1.14            | 1.75   |
| resnet18/160           | 26.4        | 1.07      | 30.7           | 383        | 1.1    | 14         | 1.15            | 1.89   |

(× = training img/s over eager, median of 5 interleaved rounds; compile s = the compiled copy's first 2
updates minus eager's; break-even = updates after which compiling has saved its compile time; warm =
inductor's on-disk caches already filled by an earlier compile of the same model and size. Two earlier
runs while another job held a core are discarded: 2 OpenMP threads on 2 shared cores made every
EfficientNet-Lite0 contender 5-8x slower, so read a re-run together with its per-configuration load.)

So ``auto`` compiles on CUDA (inductor + Triton, the standard fast path) and does not compile on a
CPU: with a cold inductor cache (the first run of a model and input size on a machine, every fresh
container or CI job) compiling takes 28-81 s and pays back only after 221-907
updates (within a run of 300 updates in 1 configuration of 4) for a steady gain of 1.07-1.26x; and with
``drop_last=False`` the last, smaller batch of an epoch triggers one more compilation (not measured).
With a warm cache it pays within 8-20 updates, so ``on`` is the better choice for repeated runs of the
same recipe on one CPU. channels_last (1.14-1.60x) and bf16 autocast (1.39-1.89x, this CPU has
AVX512-BF16) are the larger CPU gains, and they cost no compilation.
On MPS and other devices ``auto`` does not compile (inductor's support there is experimental).

Example::

    train_model, report = compile_for_training(model, "auto", torch.device("cpu"))
    logits = train_model(images)        # model.state_dict() == train_model.state_dict()
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Iterator, Optional

import torch
from torch import nn

from medtricks.errors import ConfigError

__all__ = ["COMPILE_MODES", "CPU_AUTO_COMPILES", "GuardedCompile", "auto_compiles", "compile_for_training"]

COMPILE_MODES = ("auto", "on", "off")

#: What ``auto`` does on a CPU; set from ``benchmarks/cpu_paths.py`` (see the module docstring).
CPU_AUTO_COMPILES = False
_CPU_AUTO_REASON = (
    "auto: not compiled on CPU (benchmarks/cpu_paths.py, 2-core CPU: 1.07-1.26x per update but "
    "28-81 s to compile with a cold cache, break-even 221-907 updates; use on for repeated runs "
    "with a warm inductor cache)"
)


def auto_compiles(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``mode="auto"`` compiles on ``device``, and why (one line for the report)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True, "auto: compiled on CUDA (inductor + Triton)"
    if device.type == "cpu":
        return CPU_AUTO_COMPILES, _CPU_AUTO_REASON
    return False, f"auto: not compiled on {device.type} (inductor support there is experimental)"


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), "")
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _eager_backward_lowering():
    """Compile the backward graph at the forward call, inside the guard (inductor compiles it lazily, at the
    first ``backward()``, by default). A no-op where this torch has no such switch."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is not None and hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return nullcontext()


class GuardedCompile(nn.Module):
    """Calls the compiled ``compiled`` until a call fails, then the eager ``module`` for good.

    The state (parameters, buffers, submodules, ``state_dict``, training flag, device and dtype moves) is
    ``module``'s own, with ``module``'s names; attributes the wrapper lacks are looked up on ``module``.
    A call that fails compiled is computed eagerly; only if the eager call succeeds does the wrapper
    blame the compiler (one ``RuntimeWarning``, ``report`` updated) and stay eager. If the eager call
    fails too, that error is the model's own and is raised as is.
    """

    def __init__(self, module: nn.Module, compiled: Any, report: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        # object.__setattr__: not registered as submodules, so no prefix in state_dict and no double counting.
        object.__setattr__(self, "_eager", module)
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(
            self,
            "report",
            report
            if report is not None
            else {"mode": "on", "compiled": True, "reason": "compiled with torch.compile (inductor)"},
        )
        object.__setattr__(self, "calls", 0)
        self.training = module.training

    @property
    def module(self) -> nn.Module:
        """The eager module (the one to checkpoint, evaluate and hand to tricks)."""
        return self._eager

    @property
    def is_compiled(self) -> bool:
        """True until a compiled call failed and the wrapper went eager."""
        return self._compiled is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            return self._eager(*args, **kwargs)
        object.__setattr__(self, "calls", self.calls + 1)
        try:
            with _eager_backward_lowering():
                return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; the eager call below tells a model bug apart
            failure = exc
        output = self._eager(*args, **kwargs)  # raises the model's own error if the model is broken
        self._fall_back(failure)
        return output

    def _fall_back(self, exc: BaseException) -> None:
        object.__setattr__(self, "_compiled", None)
        when = "at its first call" if self.calls == 1 else f"at call {self.calls} (a recompilation)"
        reason = f"torch.compile failed {when} ({_first_line(exc)}); training continues on the eager module"
        self.report.update(compiled=False, reason=reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)

    # --- the module's state, under the module's names -------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._eager.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self._eager.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        return self._eager.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return self._eager.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        return self._eager.named_children()

    def named_modules(self, memo: Optional[set] = None, prefix: str = "", remove_duplicate: bool = True):
        return self._eager.named_modules(memo=memo, prefix=prefix, remove_duplicate=remove_duplicate)

    def train(self, mode: bool = True) -> "GuardedCompile":
        self.training = mode
        self._eager.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True) -> "GuardedCompile":  # .to(), .cuda(), .float(), memory format
        self._eager._apply(fn, recurse)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            eager = self.__dict__.get("_eager")
            if eager is None:
                raise
            return getattr(eager, name)

    def __repr__(self) -> str:
        return f"GuardedCompile(compiled={self.is_compiled}, module={self._eager!r})"


def compile_for_training(module: nn.Module, mode: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """``module`` compiled for training according to ``mode`` (``auto`` | ``on`` | ``off``) on ``device``.

    Returns ``(model, report)``: ``model`` is ``module`` itself (``off``, ``auto`` deciding against, or
    ``torch.compile`` failing when called) or a :class:`GuardedCompile` whose state is ``module``'s;
    ``report = {"mode": mode, "compiled": bool, "reason": str}``. A failure never raises: it warns once
    (``RuntimeWarning``) and the run goes on eagerly. A ``mode`` outside the three is a :class:`ConfigError`.
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    report: dict[str, Any] = {"mode": mode, "compiled": False, "reason": ""}
    if mode == "off":
        report["reason"] = "off: the eager module"
        return module, report
    if mode == "auto":
        wanted, why = auto_compiles(device)
        if not wanted:
            report["reason"] = why
            return module, report
        reason = why
    else:
        reason = "on: compiled with torch.compile (inductor)"
    try:
        compiled = torch.compile(module)
    except Exception as exc:  # noqa: BLE001 - no dynamo on this Python/platform, a backend missing, ...
        report["reason"] = f"torch.compile failed when called ({_first_line(exc)}); training runs on the eager module"
        warnings.warn(report["reason"], RuntimeWarning, stacklevel=2)
        return module, report
    report.update(compiled=True, reason=reason)
    return GuardedCompile(module, compiled, report), report
