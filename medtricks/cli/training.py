"""The commands that train, or prepare training: ``run`` (and its torchrun launch for ``--nproc``), ``data``,
``gamma``, ``ablate``, ``self-train``, ``weights``. Each handler imports what it runs (``--help`` stays light)."""

from __future__ import annotations

import subprocess
import sys

from medtricks._defaults import DEFAULT_METRIC
from medtricks.cli.shared import under_torchrun


def add_run(sub) -> None:
    """``medtricks run RECIPE``: one experiment (``--nproc N``: data-parallel through torchrun)."""
    run = sub.add_parser("run", help="run one experiment from a YAML recipe")
    run.add_argument("recipe", help="path to a recipe YAML file, or a shipped recipe's name (e.g. quickstart)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set optim.lr=0.05 (repeatable)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the fully resolved recipe and exit")
    run.add_argument(
        "--resume",
        default=None,
        metavar="auto|RUN_DIR",
        help="continue the newest unfinished run of this recipe (auto) or a given run folder",
    )
    run.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train data-parallel in N processes on this machine (one per GPU; gloo processes on CPU): "
        "runs torchrun, `python -m medtricks.train.torchrun --standalone --nproc-per-node N -m "
        "medtricks run RECIPE ...` with the other arguments (torch.distributed.run that reports a "
        "failure of its processes once). train.batch_size is per process",
    )


def _cmd_run(args) -> int:
    from medtricks.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)  # a bad recipe fails here, before any launch
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    if args.nproc is not None and args.nproc != 1:
        return _launch_torchrun(args)
    from medtricks.run import run_recipe

    run_recipe(recipe, resume=args.resume)
    return 0


def torchrun_command(args) -> list[str]:
    """What ``medtricks run RECIPE --nproc N ...`` runs: torchrun (``torch.distributed.run``, through
    ``medtricks.train.torchrun``, which says a failure of the processes once) on this machine, starting N
    processes of ``medtricks run RECIPE ...`` (the same arguments, without ``--nproc``)."""
    command = [
        sys.executable,
        "-m",
        "medtricks.train.torchrun",
        "--standalone",
        "--nproc-per-node",
        str(args.nproc),
        "-m",
        "medtricks",
        "run",
        args.recipe,
    ]
    for override in args.overrides:
        command += ["--set", override]
    if args.resume:
        command += ["--resume", args.resume]
    return command


def _launch_torchrun(args) -> int:
    if args.nproc < 1:
        print(f"medtricks run: error: --nproc {args.nproc}: expected 1 or more processes", file=sys.stderr)
        return 2
    if under_torchrun():
        print(
            "medtricks run: error: --nproc inside a torchrun launch; give the process count to torchrun or to "
            "--nproc, not both",
            file=sys.stderr,
        )
        return 2
    process = subprocess.Popen(torchrun_command(args))
    try:
        return process.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C: let it stop its workers (epochs are checkpointed)
        process.wait()
        raise


def add_data(sub) -> None:
    """``medtricks data synth|check``: synthetic phantoms, dataset checks."""
    data = sub.add_parser("data", help="data tools: synthetic phantoms, dataset checks")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    synth = data_sub.add_parser("synth", help="draw a synthetic chest X-ray phantom set")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--n", type=int, default=600, help="number of images (default 600)")
    synth.add_argument("--classes", default="normal,bacterial,covid", help="comma-separated classes")
    synth.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    synth.add_argument("--format", choices=["png", "dicom"], default="png")
    synth.add_argument("--seed", type=int, default=0)
    check = data_sub.add_parser("check", help="counts, splits, leakage, unreadable files, pitfalls")
    check.add_argument("card", help="a data card name (see data_cards/) or a card YAML path")
    check.add_argument("--root", required=True, help="the dataset's root folder")
    check.add_argument("--split-seed", type=int, default=0)
    check.add_argument("--val-fraction", type=float, default=0.15)
    check.add_argument("--test-fraction", type=float, default=0.0)
    check.add_argument(
        "--test-by",
        choices=["random", "id_order"],
        default="random",
        help="how the test split is carved: random patients, or the lowest-numbered patients "
        "of every file-name ID series (earliest acquisitions)",
    )


def _cmd_data(args, parser) -> int:
    if args.data_command == "synth":
        from medtricks.data import synthesize_phantoms

        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
        path = synthesize_phantoms(args.out, n=args.n, classes=classes, size=args.size, fmt=args.format, seed=args.seed)
        print(f"wrote {args.n} phantom images and their manifest: {path}")
        return 0
    if args.data_command == "check":
        from medtricks.data.report import data_check

        check = data_check(
            args.card,
            args.root,
            split_seed=args.split_seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            test_by=args.test_by,
        )
        print(check.text)
        if check.ok:
            return 0
        print(f"\nmedtricks data check: FAILED: {check.summary()}", flush=True)  # exit 1: CI can gate on it
        return 1
    parser.parse_args(["data", "--help"])
    return 2


def add_gamma(sub) -> None:
    """``medtricks gamma MODEL``: what a BN-gamma strategy would change, without training."""
    gamma = sub.add_parser("gamma", help="show what a BN-gamma strategy would change, without training")
    gamma.add_argument("model", help="a timm model name (or monai:NAME)")
    gamma.add_argument(
        "--weights",
        default="none",
        metavar="WEIGHTS",
        help="weights to build the model with: none (default: the architecture only, nothing is "
        "read or downloaded), imagenet, sin, sin_in, sin_in_in or file:PATH (see "
        "`medtricks weights list`)",
    )
    # No `choices`: the names live in medtricks.gamma.bn.STRATEGIES (importing it here would import
    # torch on every `--help`); a wrong name is answered with the list.
    gamma.add_argument(
        "--strategy",
        default="zero_late",
        metavar="STRATEGY",
        help="a tricks.bn_gamma strategy (default zero_late; a wrong name lists the valid ones)",
    )
    gamma.add_argument("--stages", type=int, nargs="+", default=None, help="stage indices (negative from the end)")
    gamma.add_argument(
        "--last-n-blocks", type=int, default=None, metavar="N", help="the last N residual blocks of the whole network"
    )
    gamma.add_argument("--names", nargs="+", default=None, help="fnmatch patterns on module names")
    gamma.add_argument(
        "--which",
        choices=["last", "all"],
        default="last",
        help="in each chosen block: the norm ending the residual branch (last, default) or every "
        "norm on the branch (all)",
    )
    gamma.add_argument(
        "--in-chans",
        type=int,
        choices=[1, 3],
        default=3,
        help="input channels of the model: 1 (grayscale; the first conv's RGB kernels summed) or 3 (default)",
    )


def _cmd_gamma(args) -> int:
    from medtricks.gamma.bn import gamma_preview

    print(
        gamma_preview(
            args.model,
            weights=args.weights,
            strategy=args.strategy,
            stages=args.stages,
            last_n_blocks=args.last_n_blocks,
            names=args.names,
            which=args.which,
            in_chans=args.in_chans,
        )
    )
    return 0


def add_ablate(sub) -> None:
    """``medtricks ablate RECIPE``: a multi-seed ablation of tricks."""
    ablate = sub.add_parser("ablate", help="multi-seed ablation of tricks with confidence intervals")
    ablate.add_argument("recipe", help="the baseline recipe")
    ablate.add_argument(
        "--tricks",
        default=None,
        help="comma-separated, e.g. warmup,cosine,label_smoothing=0.1,no_bias_decay,bn_gamma=zero_late",
    )
    ablate.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: recipe ablation.seeds)")
    ablate.add_argument("--mode", choices=["cumulative", "one_at_a_time", "grid"], default=None)
    ablate.add_argument(
        "--jobs", type=int, default=None, help="child runs in parallel on this machine, local executor (default 1)"
    )
    ablate.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="where the children train: this machine (default) or a Ray cluster, one task each",
    )
    ablate.add_argument(
        "--address",
        default=None,
        metavar="auto|ray://HOST:10001",
        help="Ray: the cluster to join (default: a local Ray started for this command)",
    )
    ablate.add_argument(
        "--cpus-per-run",
        type=float,
        default=None,
        metavar="N",
        help="Ray: CPUs (and torch threads) per child (default 1)",
    )
    ablate.add_argument("--gpus-per-run", type=float, default=None, metavar="N", help="Ray: GPUs per child (default 0)")
    ablate.add_argument(
        "--retries",
        type=int,
        default=None,
        metavar="N",
        help="Ray: restarts of a child whose worker died; it resumes from its checkpoint (default 2)",
    )
    ablate.add_argument("--metric", default=None, help=f"metric to compare (default {DEFAULT_METRIC})")
    ablate.add_argument("--test", choices=["t", "wilcoxon"], default=None, help="paired test over seeds")
    ablate.add_argument(
        "--until-ci",
        type=float,
        default=None,
        metavar="W",
        help="seeds until the answer is clear: after --seeds seeds, add rounds of --seed-step seeds "
        "until every delta's 95%% interval is within +-W or excludes 0, or --max-seeds is reached; "
        "intervals are group-sequential repeated CIs (Pocock or O'Brien-Fleming boundary over the "
        "fixed look schedule; Jennison & Turnbull), valid whenever it stops",
    )
    ablate.add_argument(
        "--max-seeds", type=int, default=None, metavar="N", help="--until-ci: the most seeds per variant"
    )
    ablate.add_argument(
        "--seed-step", type=int, default=None, metavar="K", help="--until-ci: seeds added per round (default: --seeds)"
    )
    ablate.add_argument(
        "--boundary",
        choices=["pocock", "obrien_fleming"],
        default=None,
        help="--until-ci: group-sequential boundary (default pocock)",
    )
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _cmd_ablate(args) -> int:
    from medtricks.ablation.runner import ablation_settings, run_ablation
    from medtricks.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    tricks = [t.strip() for t in args.tricks.split(",") if t.strip()] if args.tricks else None
    result = run_ablation(
        recipe,
        **ablation_settings(
            recipe,
            tricks=tricks,
            seeds=args.seeds,
            mode=args.mode,
            metric=args.metric,
            jobs=args.jobs,
            test=args.test,
            executor=args.executor,
            address=args.address,
            cpus_per_run=args.cpus_per_run,
            gpus_per_run=args.gpus_per_run,
            retries=args.retries,
            until_ci=args.until_ci,
            max_seeds=args.max_seeds,
            seed_step=args.seed_step,
            boundary=args.boundary,
        ),
    )
    return 1 if result.failed else 0  # run_ablation prints the table itself


def add_self_train(sub) -> None:
    """``medtricks self-train RECIPE``: Noisy Student rounds."""
    self_train = sub.add_parser(
        "self-train",
        help="Noisy Student self-training: a teacher, then noised students on its pseudo-labels",
        description="Round 0 trains the teacher on the labelled images (tricks.pseudo_label off). Each later round "
        "pseudo-labels the unlabelled pool (data.label_fraction < 1, data.label_count or "
        "data.unlabeled) with the round before (tricks.pseudo_label.teacher; its threshold/soft/weight "
        "from the recipe) and trains a noised student: dropout, stochastic depth where the model "
        "takes it, a stronger augmentation preset. One parent run, one child run per round; re-running "
        "the same command skips finished rounds and resumes an interrupted one.",
    )
    self_train.add_argument("recipe", help="the recipe of the teacher (and, with the noise, of every student)")
    self_train.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="student rounds after the teacher (default 1: teacher + 1 student)",
    )
    self_train.add_argument(
        "--drop-rate",
        type=float,
        default=0.5,
        metavar="P",
        help="students' model.drop_rate, dropout before the classifier (default 0.5, "
        "as Noisy Student; 0 keeps the recipe's)",
    )
    self_train.add_argument(
        "--drop-path-rate",
        type=float,
        default=0.2,
        metavar="P",
        help="students' stochastic depth, model.kwargs.drop_path_rate, where the timm model "
        "takes it (default 0.2, as Noisy Student; 0 keeps the recipe's)",
    )
    self_train.add_argument(
        "--augment",
        default="cxr_shift",
        metavar="PRESET|keep",
        help="students' data.augment: an augmentation preset (cxr_light, cxr_shift: the default, the "
        "strongest photometric X-ray preset, cxr_lungfield, paper_baseline, none), or keep "
        "(the recipe's)",
    )
    self_train.add_argument(
        "--student",
        default=None,
        metavar="MODEL",
        help="students' model.name, an equal or larger model (default: the recipe's model)",
    )
    self_train.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the recipe's)")
    self_train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key for every round, e.g. --set data.label_fraction=0.1",
    )


def _cmd_self_train(args) -> int:
    from medtricks.recipe import load_recipe
    from medtricks.self_train import NoiseConfig, run_self_train

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    noise = NoiseConfig(
        drop_rate=args.drop_rate,
        drop_path_rate=args.drop_path_rate,
        augment=None if args.augment == "keep" else args.augment,
        student=args.student,
    )
    try:
        run_self_train(recipe, args.rounds, noise=noise, tracking_uri=args.tracking_uri)
    except KeyboardInterrupt:
        print(
            "interrupted: finished rounds are kept and the round in progress is checkpointed at its last "
            "finished epoch; run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    return 0  # run_self_train prints the table itself


def add_weights(sub) -> None:
    """``medtricks weights list|fetch``: the pretrained weights zoo."""
    weights = sub.add_parser("weights", help="the pretrained weights zoo")
    weights_sub = weights.add_subparsers(dest="weights_command", metavar="WEIGHTS_COMMAND")
    weights_sub.add_parser("list", help="list weights, their source and whether they are cached")
    fetch = weights_sub.add_parser("fetch", help="download weights into the cache (needs a network)")
    fetch.add_argument("name", help="weights name, e.g. sin")
    fetch.add_argument("--arch", default=None, help="architecture, e.g. resnet50")


def _cmd_weights(args, parser) -> int:
    if args.weights_command == "list":
        from medtricks.models.weights import format_weights_table

        print(format_weights_table())
        return 0
    if args.weights_command == "fetch":
        from medtricks.models import fetch_weights

        print(f"cached: {fetch_weights(args.name, arch=args.arch)}")
        return 0
    parser.parse_args(["weights", "--help"])
    return 2


#: command -> handler (args -> exit code); data and weights also take the parser (their help)
HANDLERS = {
    "run": _cmd_run,
    "gamma": _cmd_gamma,
    "ablate": _cmd_ablate,
    "self-train": _cmd_self_train,
    "data": _cmd_data,
    "weights": _cmd_weights,
}
