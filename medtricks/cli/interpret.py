"""The commands that look inside a trained run (the :mod:`medtricks.posthoc` layer's
:mod:`~medtricks.posthoc.representations` and :mod:`~medtricks.posthoc.attention`): ``cka``, which layers
fine-tuning moved, and ``attention``, where the model looks. Each handler imports what it runs."""

from __future__ import annotations

import sys

from medtricks.cli.shared import RUNS_DIR_HELP


def add_cka(sub) -> None:
    """``medtricks cka RUN_A [RUN_B]``: CKA between the blocks of two runs (or a run and its init)."""
    cka = sub.add_parser(
        "cka",
        help="CKA between the blocks of two runs, or of a run and its starting weights "
        "(--vs-init): which layers did fine-tuning move",
    )
    cka.add_argument(
        "runs", nargs="+", metavar="RUN", help="RUN_A [RUN_B]: run folders or run ids (one with --vs-init)"
    )
    cka.add_argument(
        "--vs-init",
        action="store_true",
        help="compare RUN_A with its recipe's starting weights (pretrained, before any gamma strategy)",
    )
    cka.add_argument(
        "--layers",
        default=None,
        metavar="PATTERN",
        help="comma-separated fnmatch patterns on module names, e.g. 'layer4.*' or 'blocks.*' "
        "(default: every residual block of a CNN, every transformer block of a ViT); for both "
        "runs, or RUN_A only when --layers-b is given",
    )
    cka.add_argument(
        "--layers-b",
        default=None,
        metavar="PATTERN",
        help="patterns for RUN_B's modules (another architecture: e.g. RUN_A a ViT, RUN_B a ResNet)",
    )
    cka.add_argument(
        "--granularity",
        choices=["block", "stage"],
        default="block",
        help="CNN layers by default: every residual block (default) or each stage's output (layer1..4; "
        "readable against a ViT's 12 blocks); a ViT's layers are its blocks either way",
    )
    cka.add_argument("--card", default=None, help="data card of the images (default: RUN_A's own data)")
    cka.add_argument("--root", default=None, help="root of --card's data")
    cka.add_argument(
        "--split",
        choices=["all", "train", "val", "test"],
        default=None,
        help="split of the data (default: val for RUN_A's data, all for --card)",
    )
    cka.add_argument("--n", type=int, default=500, help="images (a seeded random subset; default 500)")
    cka.add_argument("--batch-size", type=int, default=64, help="minibatch size of minibatch CKA (default 64)")
    cka.add_argument(
        "--method",
        choices=["minibatch", "linear"],
        default="minibatch",
        help="minibatch (Nguyen et al. 2021, default; little memory) or linear (Kornblith et al. "
        "2019 on all images at once; holds every layer's activations)",
    )
    cka.add_argument("--seed", type=int, default=0, help="seed of the image subset")
    cka.add_argument("--out", default="cka", metavar="DIR", help="where cka.json and cka.png go (default: ./cka)")
    cka.add_argument(
        "--log",
        action="store_true",
        help="also log the heat map, JSON and per-block values to RUN_A's run store (onto RUN_A)",
    )
    cka.add_argument("--device", default="auto")
    cka.add_argument("--tracking-uri", default=None)
    cka.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)


def _cmd_cka(args) -> int:
    from medtricks.posthoc.representations import cka_trained

    if len(args.runs) > 2 or (args.vs_init and len(args.runs) != 1):
        print("medtricks cka: error: give RUN_A RUN_B, or RUN_A --vs-init", file=sys.stderr)
        return 2
    result = cka_trained(
        args.runs[0],
        None if args.vs_init else (args.runs[1] if len(args.runs) > 1 else None),
        vs_init=args.vs_init,
        layers=args.layers,
        layers_b=args.layers_b,
        granularity=args.granularity,
        card=args.card,
        root=args.root,
        split=args.split,
        n=args.n,
        batch_size=args.batch_size,
        method=args.method,
        seed=args.seed,
        out_dir=args.out,
        log=args.log,
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
        device=args.device,
    )
    print(result.table())
    print("wrote " + ", ".join(str(p) for p in result.files))
    if result.run_id:
        print(f"logged to {result.logged_to}: run {result.run_id}")
    return 0


def add_attention(sub) -> None:
    """``medtricks attention RUN``: attention / activation maps."""
    attention = sub.add_parser(
        "attention",
        help="where a trained run looks: ViT attention maps, rollout and "
        "attention distance; CNN per-stage activation maps",
    )
    attention.add_argument("run", help="a run folder (runs/NAME/ID), its model/model_state.pt, or a run id")
    attention.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="image files or folders (searched recursively: PNG, JPEG, TIFF, DICOM), read and "
        "preprocessed as the run evaluates",
    )
    attention.add_argument(
        "--out",
        default="attention",
        metavar="DIR",
        help="where attention.json, attention.npz, attention_distance.png (ViT) and "
        "maps/<image>.png go (default: ./attention)",
    )
    attention.add_argument(
        "--layers",
        default=None,
        metavar="PATTERN",
        help="comma-separated fnmatch patterns: ViT blocks to draw (e.g. 'blocks.1*'; the rollout "
        "always runs through every block), CNN modules (default: each stage's output)",
    )
    attention.add_argument(
        "--max-images",
        type=int,
        default=16,
        metavar="N",
        help="use at most N images, the first in sorted order (default 16)",
    )
    attention.add_argument("--batch-size", type=int, default=8)
    attention.add_argument(
        "--log",
        action="store_true",
        help="also log the figures, JSON and (ViT) attention_distance/<block> metrics to the run's "
        "run store (onto the run)",
    )
    attention.add_argument("--device", default="auto")
    attention.add_argument("--tracking-uri", default=None)
    attention.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)


def _cmd_attention(args) -> int:
    from medtricks.posthoc.attention import attention_maps

    result = attention_maps(
        args.run,
        args.images,
        layers=args.layers,
        out_dir=args.out,
        log=args.log,
        batch_size=args.batch_size,
        max_images=args.max_images,
        device=args.device,
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
    )
    print(result.table())
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s) that are not images (listed in attention.json)", file=sys.stderr)
    print(f"wrote {len(result.files)} file(s) into {args.out}")
    if result.run_id:
        print(f"logged to {result.logged_to}: run {result.run_id}")
    return 0


#: command -> handler (args -> exit code)
HANDLERS = {"cka": _cmd_cka, "attention": _cmd_attention}
