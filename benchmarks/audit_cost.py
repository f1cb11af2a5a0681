"""Cost of the adversarial audit: PGD-k and FGSM versus one clean (inference) pass on the same images.

The issue's estimate is "PGD-k costs about (k+1) clean passes"; each PGD step is a forward *and* an
input-gradient backward, so expect roughly k * (1 + backward/forward) + 1. This script measures it
for a timm ResNet-18 (random weights, nothing downloaded), prints a table and writes JSON.

    python benchmarks/audit_cost.py            # ResNet-18, 224 px, 64 images (a few minutes on 2 CPU cores)
    python benchmarks/audit_cost.py --quick    # ResNet-18, 64 px, 16 images (seconds; used by a slow test)
    python benchmarks/audit_cost.py --device cuda --images 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medtricks.audit.adversarial import _frozen, _pgd, fgsm, normalized_model  # noqa: E402

TARGET_RATIO = 12.0  # the project's budget for PGD-10 relative to one clean pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 px, 16 images, 1 repeat")
    parser.add_argument("--model", default="resnet18", help="timm model name (random weights)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224, quick 64)")
    parser.add_argument("--images", type=int, default=None, help="images (default 64, quick 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (k)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audit_cost.json")
    args = parser.parse_args(argv)
    size = args.size or (64 if args.quick else 224)
    n_images = args.images or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)

    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=2, in_chans=1).to(device).eval()
    model01 = normalized_model(model, (0.5,), (0.25,))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 1, size, size, generator=g).to(device)
    labels = torch.randint(0, 2, (n_images,), generator=g).to(device)
    batches = [
        (images[i : i + args.batch_size], labels[i : i + args.batch_size]) for i in range(0, n_images, args.batch_size)
    ]
    eps = 2 / 255

    def clean():
        with torch.no_grad():
            for x, _ in batches:
                model01(x)

    def forward_backward():  # one input-gradient step, the unit PGD repeats
        with _frozen(model01), torch.enable_grad():
            for x, y in batches:
                x = x.clone().requires_grad_(True)
                torch.autograd.grad(torch.nn.functional.cross_entropy(model01(x), y, reduction="sum"), x)

    def run_fgsm():
        for x, y in batches:
            with torch.no_grad():
                model01(fgsm(model01, x, y, eps))  # craft + score, as the audit does

    def run_pgd():
        gen = torch.Generator(device=device).manual_seed(0)
        for x, y in batches:  # _pgd returns the final logits too: no extra scoring pass
            _pgd(
                model01,
                x,
                y,
                eps,
                norm="linf",
                steps=args.steps,
                step_size=None,
                random_start=True,
                targeted=False,
                generator=gen,
            )

    t_clean = _timed(clean, device, repeats)
    t_fb = _timed(forward_backward, device, repeats)
    t_fgsm = _timed(run_fgsm, device, repeats)
    t_pgd = _timed(run_pgd, device, repeats)
    ratio = t_pgd / t_clean
    result = {
        "model": args.model,
        "image_size": size,
        "channels": 1,
        "images": n_images,
        "batch_size": args.batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pgd_steps": args.steps,
        "seconds": {"clean_pass": t_clean, "forward_backward_pass": t_fb, "fgsm": t_fgsm, f"pgd_{args.steps}": t_pgd},
        "ratio_to_clean": {
            "forward_backward_pass": t_fb / t_clean,
            "fgsm": t_fgsm / t_clean,
            f"pgd_{args.steps}": ratio,
        },
        "pgd_in_forward_backward_passes": t_pgd / t_fb,
        # no hidden overhead: PGD-k is k forward+backward passes plus one scoring forward (+ timing noise)
        "pgd_passes_bound": 1.5 * args.steps,
        "pgd_passes_within_bound": t_pgd / t_fb <= 1.5 * args.steps,
        "issue_estimate_k_plus_1": args.steps + 1,
        "model_estimate": args.steps * (t_fb / t_clean) + 1,  # k input-gradient steps + 1 scoring pass
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
    }
    rows = [("pass", "seconds", "x clean", "img/s")]
    for name, sec in result["seconds"].items():
        rows.append((name, f"{sec:.3f}", f"{sec / t_clean:.1f}", f"{n_images / sec:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(
        f"audit cost: {args.model} {size}px, {n_images} images, batch {args.batch_size}, {device}, "
        f"{torch.get_num_threads()} threads, median of {repeats}"
    )
    for i, r in enumerate(rows):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-" * (sum(widths) + 6))
    print(
        f"PGD-{args.steps} / clean = {ratio:.1f}x (issue estimate {args.steps + 1}x; "
        f"k x (fwd+bwd)/clean + 1 = {result['model_estimate']:.1f}x; target <= {TARGET_RATIO:g}x: "
        f"{'met' if result['within_target'] else 'NOT met'}); "
        f"= {t_pgd / t_fb:.1f} forward+backward passes (bound {1.5 * args.steps:g}: "
        f"{'met' if result['pgd_passes_within_bound'] else 'NOT met'})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
