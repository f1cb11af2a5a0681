"""The commands that fit a trained run to a new site (the :mod:`medtricks.deploy` layer): ``calibrate``
(a site profile) and ``adapt`` (em-prior, adabn, tent; ``--method finetune`` on labelled site images)."""

from __future__ import annotations

import sys

from medtricks.cli.shared import RUNS_DIR_HELP
from medtricks.errors import ConfigError


def add_calibrate(sub) -> None:
    """``medtricks calibrate RUN``: a binary run's site profile from a labelled sample."""
    calibrate = sub.add_parser(
        "calibrate",
        help="fit a binary run's threshold, temperature and prevalence on a labelled site sample "
        "(a named site profile for evaluate/predict --site)",
    )
    calibrate.add_argument(
        "run",
        help="a run folder, its model/model_state.pt, or a run id (MLflow, or the local run store under --runs-dir)",
    )
    calibrate.add_argument("--card", required=True, help="data card name or YAML path of the site sample")
    calibrate.add_argument("--root", required=True, help="root folder of the labelled site sample")
    calibrate.add_argument(
        "--name", default="site", help="the site profile's name (default: site); model/sites/NAME.json in the run"
    )
    calibrate.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        metavar="S",
        help="the most specific threshold with site sensitivity >= S (default: Youden's J)",
    )
    calibrate.add_argument(
        "--n-bootstrap",
        type=int,
        default=200,
        metavar="N",
        help="patient-level bootstrap resamples for the intervals (default 200)",
    )
    calibrate.add_argument("--folds", type=int, default=5, help="patient-level cross-fitting folds (default 5)")
    calibrate.add_argument(
        "--min-per-class",
        type=int,
        default=20,
        metavar="N",
        help="refuse a sample with fewer images of a class (default 20)",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="bootstrap and fold seed")
    calibrate.add_argument(
        "--class-map",
        default=None,
        metavar="CARD_CLASS=MODEL_CLASS,...",
        help="a site card whose classes differ from the model's (see evaluate --class-map)",
    )
    calibrate.add_argument("--tracking-uri", default=None)
    calibrate.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    calibrate.add_argument("--no-log", action="store_true", help="store the profile in the run folder only")


def _cmd_calibrate(args) -> int:
    from medtricks.deploy.calibrate import calibrate_site

    result = calibrate_site(
        args.run,
        card=args.card,
        root=args.root,
        name=args.name,
        target_sensitivity=args.target_sensitivity,
        n_bootstrap=args.n_bootstrap,
        folds=args.folds,
        seed=args.seed,
        min_per_class=args.min_per_class,
        tracking_uri=args.tracking_uri,
        log=not args.no_log,
        runs_dir=args.runs_dir,
        class_map=args.class_map,
    )
    for text in result.warnings:
        print(f"warning: {text}", file=sys.stderr)
    print(result.profile.table())
    if result.path is not None:
        print(f"site profile: {result.path} (use: evaluate/predict --site {result.profile.name})")
    if result.logged_run:
        print(f"logged to {result.logged_to}: run {result.logged_run}")
    return 0


def add_adapt(sub) -> None:
    """``medtricks adapt RUN --method M``: a new run adapted to a site."""
    adapt = sub.add_parser(
        "adapt",
        help="adapt a trained run to a new site: em-prior (a site profile), adabn or tent on unlabelled "
        "images, finetune on labelled ones (cross-fitted by patient); a new run that records its parent",
    )
    adapt.add_argument("run", help="a run folder, its model/model_state.pt, or a run id")
    adapt.add_argument(
        "--root",
        required=True,
        help="folder of the site's images (em-prior/adabn/tent: labels not "
        "needed, searched recursively like predict's inputs; finetune: "
        "the labelled sample as --card describes it)",
    )
    adapt.add_argument(
        "--method",
        required=True,
        choices=["em-prior", "adabn", "tent", "finetune"],
        help="em-prior: site prevalence by EM (Saerens 2002), stored as a site profile; adabn: "
        "BatchNorm statistics re-estimated on the images; tent: BatchNorm affine parameters "
        "by entropy minimisation (Wang 2021); finetune: the run fine-tuned on labelled site "
        "images, measured by patient-level cross-fitting, then trained on all of them",
    )
    adapt.add_argument(
        "--card",
        default=None,
        help="finetune (required): data card name or YAML path of the "
        "labelled site sample; its classes must be the run's",
    )
    adapt.add_argument("--name", default=None, help="em-prior: the site profile's name (default: em-prior)")
    adapt.add_argument("--steps", type=int, default=1, help="tent: passes over the images (default 1)")
    adapt.add_argument(
        "--lr",
        type=float,
        default=None,
        help="tent: SGD learning rate (default 0.001); finetune: optim.lr (default: the run's x 0.1; "
        "linear scaling, when its recipe uses it, applies on top)",
    )
    adapt.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="adabn/tent (default 32); finetune: train.batch_size (default: the run's)",
    )
    adapt.add_argument(
        "--seed",
        type=int,
        default=0,
        help="tent batch order; em-prior bootstrap; finetune: the folds and the bootstrap",
    )
    adapt.add_argument("--folds", type=int, default=5, help="finetune: patient-level cross-fitting folds (default 5)")
    adapt.add_argument("--epochs", type=int, default=3, help="finetune: training epochs (default 3)")
    adapt.add_argument(
        "--freeze",
        default=None,
        metavar="0,1,2",
        help="finetune: model.freeze as timm stage indices (0 = stem) or module patterns, or none "
        "(default: the run's own)",
    )
    adapt.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="finetune: any other recipe key of the fine-tuning runs (repeatable)",
    )
    adapt.add_argument(
        "--n-bootstrap",
        type=int,
        default=None,
        metavar="N",
        help="bootstrap resamples of the intervals (em-prior default 200; finetune default 1000)",
    )
    adapt.add_argument(
        "--out-dir",
        default=None,
        metavar="DIR",
        help="where the new run folder goes (default: beside the parent run); finetune: also its "
        "cross-fit folder finetune-<id>/ (a rerun skips the folds it finished)",
    )
    adapt.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    adapt.add_argument("--tracking-uri", default=None)
    adapt.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    adapt.add_argument("--no-log", action="store_true", help="write the run folder only; log nothing")


def _cmd_adapt(args) -> int:
    if args.method == "finetune":
        return _cmd_finetune(args)
    given = [
        flag for flag, value in (("--card", args.card), ("--freeze", args.freeze), ("--set", args.overrides)) if value
    ]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: for --method finetune only (labelled site images); --method "
            f"{args.method} adapts to unlabelled images"
        )
    from medtricks.deploy.adapt import adapt_run

    result = adapt_run(
        args.run,
        root=args.root,
        method=args.method,
        name=args.name,
        steps=args.steps,
        lr=1e-3 if args.lr is None else args.lr,
        batch_size=args.batch_size or 32,
        seed=args.seed,
        n_bootstrap=200 if args.n_bootstrap is None else args.n_bootstrap,
        device=args.device,
        tracking_uri=args.tracking_uri,
        log=not args.no_log,
        runs_dir=args.runs_dir,
        output_dir=args.out_dir,
    )
    print(result.summary())
    if result.logged_to and result.run_id:
        print(f"logged to {result.logged_to}: run {result.run_id}")
    return 0


def _cmd_finetune(args) -> int:
    if not args.card:
        raise ConfigError(
            "--method finetune learns from labelled site images: name their data card with --card C "
            "(its classes must be the run's), e.g. `medtricks adapt RUN --method finetune --card "
            "kermany-pneumonia --root SITE`"
        )
    from medtricks.deploy.finetune import finetune_run
    from medtricks.deploy.finetune_recipe import parse_freeze

    result = finetune_run(
        args.run,
        card=args.card,
        root=args.root,
        folds=args.folds,
        epochs=args.epochs,
        lr=args.lr,
        freeze=parse_freeze(args.freeze),
        overrides=args.overrides,
        seed=args.seed,
        n_bootstrap=1000 if args.n_bootstrap is None else args.n_bootstrap,
        batch_size=args.batch_size,
        output_dir=args.out_dir,
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
        log=not args.no_log,
        device=args.device,
    )
    for text in result.warnings:
        print(f"warning: {text}", file=sys.stderr)
    print(result.summary())
    return 0


#: command -> handler (args -> exit code)
HANDLERS = {"calibrate": _cmd_calibrate, "adapt": _cmd_adapt}
