"""compile_for_training: off / on / auto, and the guarded fall-back to eager when compiling fails (issue 29)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import medtricks.train.compile as compile_mod
from medtricks.errors import ConfigError
from medtricks.train.compile import CPU_AUTO_COMPILES, GuardedCompile, auto_compiles, compile_for_training

CPU = torch.device("cpu")


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 0, 1, 1, 0])


def train_step(model: nn.Module, params, images, targets) -> torch.Tensor:
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt.zero_grad(set_to_none=True)
    logits = model(images)
    nn.functional.cross_entropy(logits, targets).backward()
    opt.step()
    return logits.detach()


class FailingCompiled:
    """Stands in for torch.compile(module): raises ``exc`` on every call (inductor compiles at the first)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.calls = exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.exc


def test_off_returns_the_module_itself():
    model = tiny_net()
    out, report = compile_for_training(model, "off", CPU)
    assert out is model
    assert report == {"mode": "off", "compiled": False, "reason": "off: the eager module"}


def test_unknown_mode_names_the_allowed_values():
    with pytest.raises(ConfigError, match="auto, on, off.*'yes'"):
        compile_for_training(tiny_net(), "yes", CPU)


def test_compile_failing_when_called_falls_back_with_one_warning(monkeypatch):
    def broken(module, *args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_net()
    with pytest.warns(RuntimeWarning, match="torch.compile failed when called.*Dynamo is not supported") as caught:
        out, report = compile_for_training(model, "on", CPU)
    assert len(caught) == 1
    assert out is model and report["compiled"] is False and report["mode"] == "on"
    assert "Dynamo is not supported" in report["reason"]


@pytest.mark.parametrize(
    "exc",
    [
        OSError("[Errno 2] No such file or directory: 'g++'"),
        RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx"),
        torch._dynamo.exc.TorchDynamoException("backend='inductor' raised: LoweringException"),
    ],
    ids=["no-compiler", "inductor-runtime-error", "dynamo-error"],
)
def test_compiled_call_failing_at_first_forward_falls_back_and_trains_like_eager(monkeypatch, exc):
    failing = FailingCompiled(exc)
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: failing)
    model, reference = tiny_net(), tiny_net()
    wrapped, report = compile_for_training(model, "on", CPU)
    assert isinstance(wrapped, GuardedCompile) and report["compiled"] is True
    images, targets = batch()
    with pytest.warns(RuntimeWarning, match=f"at its first call.*{type(exc).__name__}") as caught:
        logits = train_step(wrapped, wrapped.parameters(), images, targets)
    assert len(caught) == 1 and failing.calls == 1
    assert report["compiled"] is False and type(exc).__name__ in report["reason"]
    assert not wrapped.is_compiled
    expected = train_step(reference, reference.parameters(), images, targets)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same update, same BN statistics
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on: no second warning, the compiled callable is not tried
        wrapped(images)
    assert failing.calls == 1


def test_a_model_error_is_raised_as_is_and_does_not_blame_the_compiler(monkeypatch):
    failing = FailingCompiled(RuntimeError("shape mismatch"))
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: failing)
    wrapped, report = compile_for_training(tiny_net(), "on", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="channels"):  # the eager model's own error (2 channels, not 1)
            wrapped(torch.randn(2, 2, 8, 8))
    assert wrapped.is_compiled and report["compiled"] is True


def test_a_working_compiled_callable_is_the_one_called(monkeypatch):
    calls = []

    def fake(module, *args, **kwargs):
        def compiled(x):
            calls.append(x.shape)
            return module(x)

        return compiled

    monkeypatch.setattr(torch, "compile", fake)
    model = tiny_net()
    wrapped, _ = compile_for_training(model, "on", CPU)
    images, _ = batch()
    torch.testing.assert_close(wrapped(images), model(images))
    assert calls == [images.shape] and wrapped.is_compiled


def test_wrapper_state_is_the_modules_under_the_same_names(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: module)
    model = tiny_net()
    wrapped, _ = compile_for_training(model, "on", CPU)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(wrapped.state_dict().values(), model.state_dict().values()))
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]
    assert [n for n, _ in wrapped.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in model.named_modules()]
    assert not any("_orig_mod" in k for k in wrapped.state_dict())
    # load_state_dict, train/eval, .to() and attribute access reach the module
    other = tiny_net()
    nn.init.constant_(other[5].weight, 0.5)
    wrapped.load_state_dict(other.state_dict())
    assert torch.equal(model[5].weight, other[5].weight)
    wrapped.eval()
    assert not model.training and not model[1].training and not wrapped.training
    wrapped.train()
    assert model.training and model[1].training
    assert wrapped.to(memory_format=torch.channels_last) is wrapped
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    model.num_classes = 2  # attributes the wrapper lacks are the module's (dunders like len() are not)
    assert wrapped.module is model and wrapped.num_classes == 2 and wrapped.get_submodule("0") is model[0]


def test_auto_on_cpu_is_the_decision_the_docstring_states(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: compiled.append(module) or module)
    model = tiny_net()
    out, report = compile_for_training(model, "auto", CPU)
    assert CPU_AUTO_COMPILES is False  # benchmarks/cpu_paths.py: compiling does not pay on this CPU
    assert out is model and compiled == [] and report["compiled"] is False
    assert report["reason"].startswith("auto: not compiled on CPU") and "break-even" in report["reason"]
    doc = " ".join((compile_mod.__doc__ or "").split())
    assert "``auto`` compiles on CUDA" in doc and "does not compile on a CPU" in doc


def test_auto_compiles_on_cuda_and_not_on_mps(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: module)
    assert auto_compiles(torch.device("cuda"))[0] is True
    assert auto_compiles("mps")[0] is False
    wrapped, report = compile_for_training(tiny_net(), "auto", torch.device("cuda"))
    assert isinstance(wrapped, GuardedCompile) and report == {
        "mode": "auto",
        "compiled": True,
        "reason": auto_compiles("cuda")[1],
    }


def _cxx() -> str | None:
    cxx = getattr(getattr(torch._inductor.config, "cpp", None), "cxx", (None, "g++"))
    names = [c for c in (cxx if isinstance(cxx, tuple) else (cxx,)) if c] + ["g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


@pytest.mark.slow
def test_really_compiled_tiny_net_matches_eager():
    if _cxx() is None:
        pytest.skip("no C++ compiler found: inductor cannot compile on this CPU")
    torch._dynamo.reset()
    model, reference = tiny_net(), tiny_net()
    wrapped, report = compile_for_training(model, "on", CPU)
    images, targets = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fall-back would warn: the test wants a real compile
        logits = train_step(wrapped, wrapped.parameters(), images, targets)
    assert wrapped.is_compiled and report["compiled"] is True
    expected = train_step(reference, reference.parameters(), images, targets)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_cpu_paths_benchmark_quick(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "cpu_paths.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    payload = json.loads((tmp_path / "cpu_paths.json").read_text())
    entry = payload["results"]["resnet18/32"]
    assert payload["quick"] is True and set(entry["train"]["img_per_s"]) == {
        "eager",
        "channels_last",
        "compile",
        "bf16",
    }
    assert set(entry["eval"]["img_per_s"]) == {"no_grad", "inference_mode", "channels_last", "bf16"}
    assert all(v > 0 for v in entry["train"]["img_per_s"].values())
    assert entry["eval"]["max_abs_logit_diff_vs_no_grad"]["inference_mode"] == 0.0
    assert isinstance(payload["decision"]["cpu_auto_compiles"], bool)
