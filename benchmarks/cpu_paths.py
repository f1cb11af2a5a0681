"""The CPU paths of a training run: eager vs channels_last vs torch.compile vs bf16 autocast for training,
and torch.no_grad vs torch.inference_mode (plus channels_last and bf16) for evaluation (issue 29).

For each model (EfficientNet-Lite0 and resnet18, ``medtricks.models.create_model(..., weights="none",
in_chans=1, num_classes=2)``) and input size (128², 160²), batch 32, synthetic batches:

Training contenders, each its own copy of the same initial model and its own SGD-momentum optimizer;
one update = zero_grad, forward, cross-entropy, backward, step:

- ``eager``: the module as built (NCHW);
- ``channels_last``: model and batches in ``torch.channels_last``;
- ``compile``: ``medtricks.train.compile.compile_for_training(model, "on", cpu)`` (inductor, the
  guarded wrapper the engine would use);
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around forward and loss (the loss in float32).

Compile time is reported apart: the wall time of the compiled copy's first 2 updates against eager's
first 2 (``compile_overhead_s``), once with an empty inductor cache (``cold``, a fresh
``TORCHINDUCTOR_CACHE_DIR`` for this process: a first run on a machine; a later configuration may reuse a
few shape-independent artefacts of an earlier one) and once more on a fresh copy after
``torch._dynamo.reset()`` (``warm``: the FX-graph/AOT caches filled, a repeated run; in-process caches
make it a little more optimistic than a new process would see). Then
``break_even_updates = overhead / (eager s per update - compiled s per update)``: the run length from
which compiling saves time (None when the compiled update is not faster).

Evaluation contenders on the eager model in eval mode: ``no_grad``, ``inference_mode``,
``channels_last`` (a channels_last copy, under inference_mode) and ``bf16`` (autocast, under
inference_mode).

Timing: after each contender's warm-up updates (or batches), ``repeats`` interleaved rounds (each
rotates the order) of ``steps`` timed updates / ``eval_batches`` timed batches; medians per
contender, ratio of medians against ``eager`` / ``no_grad``, and the per-round paired ratios.

Run (from the repository root)::

    python -m benchmarks.cpu_paths            # full: ~10 min on 2 CPU cores (4 cold + 4 warm compilations)
    python -m benchmarks.cpu_paths --quick    # smoke test: resnet18 at 32², 2 updates, one compilation
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `medtricks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    format_table,
    interleaved_order,
    load_average,
    machine_info,
    ratio,
    results_dir,
    summarize,
    write_results,
)

NAME = "cpu_paths"
MODELS = ("efficientnet_lite0", "resnet18")
SIZES = (128, 160)
TRAIN_CONTENDERS = ("eager", "channels_last", "compile", "bf16")
EVAL_CONTENDERS = ("no_grad", "inference_mode", "channels_last", "bf16")
COMPILE_STEPS = 2  # the first updates of the compiled copy: compilation happens there


@dataclass(frozen=True)
class Config:
    model: str
    image_size: int
    batch_size: int = 32
    warmup: int = 1  # untimed updates per contender after its first COMPILE_STEPS
    steps: int = 2  # timed updates per contender per round
    eval_batches: int = 2  # timed evaluation batches per contender per round
    repeats: int = 5  # interleaved rounds
    warm_compile: bool = True
    lr: float = 0.01

    @property
    def key(self) -> str:
        return f"{self.model}/{self.image_size}"


def make_batches(cfg: Config, n: int = 2) -> list[tuple[Any, Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(cfg.batch_size, 1, cfg.image_size, cfg.image_size, generator=gen),
            torch.randint(0, 2, (cfg.batch_size,), generator=gen),
        )
        for _ in range(n)
    ]


def build_model(name: str):
    import torch

    from medtricks.models import create_model

    torch.manual_seed(0)
    return create_model(name, weights="none", in_chans=1, num_classes=2)


class Trainer:
    """One training contender: its model copy, optimizer, input layout and autocast."""

    def __init__(self, name: str, model, cfg: Config, batches) -> None:
        import torch

        self.name, self.cfg = name, cfg
        self.channels_last = name == "channels_last"
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.batches = [(x.contiguous(memory_format=fmt), y) for x, y in batches]
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bf16" else nullcontext
        self.forward: Callable = self.model
        self.i = 0
        self.loss = float("nan")

    def step(self) -> None:
        import torch

        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        self.opt.step()
        self.loss = loss.item()

    def timed(self, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            self.step()
        return time.perf_counter() - started


def _compiled_trainer(base, cfg: Config, batches) -> tuple[Trainer, float, dict[str, Any]]:
    """A fresh copy behind compile_for_training("on"), and the wall time of its first COMPILE_STEPS updates."""
    import torch

    from medtricks.train.compile import compile_for_training

    torch._dynamo.reset()
    trainer = Trainer("compile", copy.deepcopy(base), cfg, batches)
    started = time.perf_counter()
    trainer.forward, report = compile_for_training(trainer.model, "on", torch.device("cpu"))
    for _ in range(COMPILE_STEPS):
        trainer.step()
    return trainer, time.perf_counter() - started, report


def measure_training(cfg: Config, say: Callable[[str], None] = print) -> dict[str, Any]:
    base = build_model(cfg.model)
    batches = make_batches(cfg)
    trainers = {
        name: Trainer(name, copy.deepcopy(base), cfg, batches) for name in TRAIN_CONTENDERS if name != "compile"
    }
    first = {name: t.timed(COMPILE_STEPS) for name, t in trainers.items()}
    say(f"  {cfg.key}: compiling (cold cache) ...")
    compiled, cold_s, report = _compiled_trainer(base, cfg, batches)
    compile_info: dict[str, Any] = {
        "cold_first_steps_s": cold_s,
        "warm_first_steps_s": None,
        "eager_first_steps_s": first["eager"],
        "report": dict(report),
    }
    if cfg.warm_compile and report["compiled"]:
        say(f"  {cfg.key}: compiling again (warm cache) ...")
        del compiled
        gc.collect()
        compiled, warm_s, report = _compiled_trainer(base, cfg, batches)
        compile_info.update(warm_first_steps_s=warm_s, report=dict(report))
    first["compile"] = compile_info["warm_first_steps_s"] or cold_s
    trainers["compile"] = compiled
    for t in trainers.values():
        t.timed(cfg.warmup)
    seconds: dict[str, list[float]] = {name: [] for name in TRAIN_CONTENDERS}
    for order in interleaved_order(TRAIN_CONTENDERS, cfg.repeats):
        for name in order:
            seconds[name].append(trainers[name].timed(cfg.steps) / cfg.steps)
    compile_info["report_after"] = (
        dict(trainers["compile"].forward.report) if hasattr(trainers["compile"].forward, "report") else dict(report)
    )
    img_s = {name: cfg.batch_size / summarize(seconds[name])["median"] for name in TRAIN_CONTENDERS}
    paired = {name: [e / s for e, s in zip(seconds["eager"], seconds[name])] for name in TRAIN_CONTENDERS}
    s_eager, s_compiled = (summarize(seconds[n])["median"] for n in ("eager", "compile"))
    saving = s_eager - s_compiled
    for which in ("cold", "warm"):
        total = compile_info[f"{which}_first_steps_s"]
        if total is None:
            continue
        overhead = max(total - first["eager"], 0.0)  # a warm cache can come out a hair under eager: noise
        compile_info[f"{which}_overhead_s"] = overhead
        compile_info[f"{which}_break_even_updates"] = overhead / saving if saving > 0 else None
    result = {
        "img_per_s": img_s,
        "s_per_update": {name: summarize(v) for name, v in seconds.items()},
        "ratio_vs_eager": {name: ratio(img_s[name], img_s["eager"]) for name in TRAIN_CONTENDERS},
        "paired_ratios_vs_eager": paired,
        "final_loss": {name: t.loss for name, t in trainers.items()},
        "compile": compile_info,
    }
    del trainers, compiled
    gc.collect()
    return result


def measure_eval(cfg: Config) -> dict[str, Any]:
    import torch

    model = build_model(cfg.model).eval()
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = make_batches(cfg, 1)[0][0]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    setups = {
        "no_grad": (model, x, torch.no_grad, nullcontext),
        "inference_mode": (model, x, torch.inference_mode, nullcontext),
        "channels_last": (cl_model, x_cl, torch.inference_mode, nullcontext),
        "bf16": (model, x, torch.inference_mode, bf16),
    }
    outputs = {}

    def run(name: str, n: int) -> float:
        m, inp, grad_mode, cast = setups[name]
        started = time.perf_counter()
        with grad_mode(), cast():
            for _ in range(n):
                out = m(inp)
        outputs[name] = out.float()
        return time.perf_counter() - started

    for name in EVAL_CONTENDERS:
        run(name, 1)
    seconds: dict[str, list[float]] = {name: [] for name in EVAL_CONTENDERS}
    for order in interleaved_order(EVAL_CONTENDERS, cfg.repeats):
        for name in order:
            seconds[name].append(run(name, cfg.eval_batches) / cfg.eval_batches)
    img_s = {name: cfg.batch_size / summarize(seconds[name])["median"] for name in EVAL_CONTENDERS}
    ref = outputs["no_grad"]
    return {
        "img_per_s": img_s,
        "s_per_batch": {name: summarize(v) for name, v in seconds.items()},
        "ratio_vs_no_grad": {name: ratio(img_s[name], img_s["no_grad"]) for name in EVAL_CONTENDERS},
        "paired_ratios_vs_no_grad": {
            name: [r / s for r, s in zip(seconds["no_grad"], seconds[name])] for name in EVAL_CONTENDERS
        },
        "max_abs_logit_diff_vs_no_grad": {name: float((outputs[name] - ref).abs().max()) for name in EVAL_CONTENDERS},
    }


def decide(results: dict[str, Any], run_updates: int) -> dict[str, Any]:
    """Does compiling pay for a CPU run of ``run_updates`` updates, compile time included, in every configuration?"""
    per_config = {}
    for key, entry in results.items():
        c = entry["train"]["compile"]
        per_config[key] = {
            "compiled": c["report_after"]["compiled"],
            "speedup": entry["train"]["ratio_vs_eager"]["compile"],
            "cold_break_even_updates": c.get("cold_break_even_updates"),
            "warm_break_even_updates": c.get("warm_break_even_updates"),
        }

    def pays(which: str) -> bool:
        values = [p[f"{which}_break_even_updates"] for p in per_config.values()]
        return all(p["compiled"] for p in per_config.values()) and all(
            v is not None and v <= run_updates for v in values
        )

    return {
        "run_updates": run_updates,
        "per_config": per_config,
        "pays_cold": pays("cold"),
        "pays_warm": pays("warm"),
        "cpu_auto_compiles": pays("cold"),
    }


def _parser():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed updates per contender per round")
    parser.add_argument("--eval-batches", type=int, default=2, help="timed eval batches per contender per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--run-updates",
        type=int,
        default=300,
        help="the run length the compile decision is judged on (updates, compile time included)",
    )
    parser.add_argument("--no-warm-compile", action="store_true", help="skip the second (warm-cache) compilation")
    parser.add_argument(
        "--keep-inductor-cache",
        action="store_true",
        help="use the usual inductor cache instead of a fresh one (compile times are then not cold)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    cache = None
    if not args.keep_inductor_cache:  # before inductor reads it: compile times measured cold
        cache = tempfile.TemporaryDirectory(prefix="cpu_paths_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    import timm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.sizes, args.steps, args.eval_batches, args.repeats = ["resnet18"], [32], 2, 2, 2
        args.no_warm_compile = True
    machine = machine_info(timm=timm.__version__, bf16_cpu_flags=_bf16_flags())
    print(
        f"CPU paths on {machine['cpu']} ({machine['logical_cpus']} CPUs, {machine['torch_threads']} torch threads), "
        f"load {machine['loadavg_start']}"
    )
    results: dict[str, Any] = {}
    configs = []
    for model in args.models:
        for size in args.sizes:
            cfg = Config(
                model=model,
                image_size=size,
                batch_size=args.batch_size,
                steps=args.steps,
                eval_batches=args.eval_batches,
                repeats=args.repeats,
                warm_compile=not args.no_warm_compile,
            )
            configs.append(cfg)
            started, load_before = time.perf_counter(), load_average()
            results[cfg.key] = {"train": measure_training(cfg), "eval": measure_eval(cfg)}
            # Per configuration: a neighbour's job shows here (2 torch threads on 2 shared cores suffer from it).
            results[cfg.key].update(wall_s=time.perf_counter() - started, loadavg=[load_before, load_average()])
            print(f"  {cfg.key}: done in {results[cfg.key]['wall_s']:.0f} s")
    if cache is not None:
        cache.cleanup()
    decision = decide(results, args.run_updates)
    train_rows, eval_rows = [], []
    for key, entry in results.items():
        t, e, c = entry["train"], entry["eval"], entry["train"]["compile"]
        train_rows.append(
            {
                "model/size": key,
                "eager img/s": t["img_per_s"]["eager"],
                **{f"{n} x": t["ratio_vs_eager"][n] for n in TRAIN_CONTENDERS[1:]},
                "compile s cold": c.get("cold_overhead_s"),
                "compile s warm": c.get("warm_overhead_s"),
                "break-even cold": c.get("cold_break_even_updates"),
                "break-even warm": c.get("warm_break_even_updates"),
            }
        )
        eval_rows.append(
            {
                "model/size": key,
                "no_grad img/s": e["img_per_s"]["no_grad"],
                **{f"{n} x": e["ratio_vs_no_grad"][n] for n in EVAL_CONTENDERS[1:]},
            }
        )
    payload = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "method": (
            "training: s per update (zero_grad+forward+CE+backward+SGD step), median over interleaved rounds "
            "of `steps` updates after COMPILE_STEPS=2 + `warmup` untimed ones; compile overhead = wall time of "
            "the compiled copy's first 2 updates minus eager's first 2, cold = empty inductor cache, warm = "
            "after torch._dynamo.reset() with the caches on disk; break-even = overhead / (eager - compiled s "
            "per update). eval: s per batch of the eval-mode model, median over interleaved rounds; ratios "
            "are of medians, x > 1 faster than eager / no_grad"
        ),
        "config": {
            **{k: v for k, v in asdict(configs[0]).items() if k not in ("model", "image_size")},
            "models": args.models,
            "sizes": args.sizes,
            "in_chans": 1,
            "num_classes": 2,
            "weights": "none",
            "optimizer": "SGD momentum 0.9",
            "train_contenders": list(TRAIN_CONTENDERS),
            "eval_contenders": list(EVAL_CONTENDERS),
            "run_updates": args.run_updates,
            "inductor_cache": "kept" if args.keep_inductor_cache else "fresh (cold)",
        },
        "machine": machine,
        "results": results,
        "decision": decision,
        "table_train": train_rows,
        "table_eval": eval_rows,
    }
    path = write_results(payload, results_dir(args.out, args.quick), NAME)
    print("\ntraining, img/s of eager and speed-up x (> 1 faster); compile overhead s; break-even updates")
    print(format_table(train_rows, list(train_rows[0])))
    print("\nevaluation, img/s under no_grad and speed-up x")
    print(format_table(eval_rows, list(eval_rows[0])))
    print(
        f"\ncompile pays within {args.run_updates} updates in every configuration: cold cache "
        f"{decision['pays_cold']}, warm cache {decision['pays_warm']}"
    )
    print(f"wrote {path}")
    return payload


def _bf16_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted({f for f in flags.split() if "bf16" in f or f.startswith("amx")})


if __name__ == "__main__":
    main()
