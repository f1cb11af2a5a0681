"""The ``medtricks`` command: the parser of every command, in the order ``--help`` lists them, and ``main``,
which dispatches and turns errors into exit codes. Each command's parser and handler live with its kind:

- :mod:`medtricks.cli.training`: run (and its torchrun launch), data, gamma, ablate, self-train, weights;
- :mod:`medtricks.cli.posthoc`: evaluate, ensemble, compare, audit, predict, export;
- :mod:`medtricks.cli.interpret`: cka, attention;
- :mod:`medtricks.cli.deploy`: calibrate, adapt.

Imports are lazy (each handler imports what it runs) so ``medtricks --help`` answers in well under 1 s."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from medtricks.cli import deploy, interpret, posthoc, training
from medtricks.cli.shared import under_torchrun
from medtricks.cli.training import torchrun_command  # importable from medtricks.cli, as before the split
from medtricks.errors import MedtricksError

EPILOG = """examples:
  medtricks run recipes/quickstart.yaml
  medtricks run recipes/bag_of_tricks.yaml --set optim.lr=0.05 --set tricks.label_smoothing=0.1
  medtricks run recipes/quickstart.yaml --dry-run
  medtricks run recipes/quickstart.yaml --resume auto
  medtricks run recipes/bag_of_tricks.yaml --nproc 4          # data-parallel: 4 processes (GPUs) via torchrun
  medtricks data synth data/phantoms --n 600 --size 256
  medtricks data check kermany-pneumonia --root ../shared/data/kermany224/train
  medtricks gamma resnet50 --strategy zero_late
  medtricks data synth data/phantoms_test --seed 7 --size 64 --n 200
  medtricks evaluate runs/quickstart/<id> --card synthetic-phantoms --root data/phantoms_test
  medtricks evaluate runs/kermany_pneumonia/<id> --card kermany-pneumonia --root /data/kermany/test --prevalence 0.4
  medtricks ensemble runs/a/<id> runs/b/<id> --card kermany-pneumonia --root /data/kermany/test
  medtricks compare --runs EVAL_RUN_A EVAL_RUN_B --metric eval/auroc
  medtricks ablate recipes/quickstart.yaml --tricks warmup,bn_gamma=zero_late --seeds 5
  medtricks self-train recipes/quickstart.yaml --rounds 2 --set data.label_fraction=0.1
  medtricks compare --experiment quickstart --group-by variant
  medtricks compare --experiment quickstart --runs-dir runs      # runs of tracking.backend: none
  medtricks audit runs/quickstart/<id> --attacks fgsm,pgd_linf --corruptions all
  medtricks export runs/quickstart/<id> --format onnx --out exports/model.onnx
  medtricks predict runs/kermany_pneumonia/<id> /data/new_xrays --out preds.csv --threshold sens=0.95
  medtricks calibrate runs/kermany_pneumonia/<id> --card kermany-pneumonia --root /data/site_a --name site-a
  medtricks predict runs/kermany_pneumonia/<id> /data/new_xrays --site site-a
  medtricks adapt runs/kermany_pneumonia/<id> --root /data/site_a_images --method adabn
  medtricks adapt runs/kermany_pneumonia/<id> --method finetune --card kermany-pneumonia --root /data/site_a
  medtricks cka runs/a/<id> runs/b/<id> --card kermany-pneumonia --root /data/kermany/test --n 500
  medtricks cka runs/kermany_pneumonia/<id> --vs-init --log
  medtricks cka runs/vit/<id> runs/resnet/<id> --granularity stage
  medtricks attention runs/vit/<id> --images /data/xrays --out attention
  medtricks weights list
"""


def _version() -> str:
    from medtricks import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtricks",
        description="Bag-of-tricks fine-tuning of pretrained CNNs on chest X-rays.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medtricks {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # each command's parser, in the order `medtricks --help` lists them
    for add in (
        training.add_run,
        training.add_data,
        training.add_gamma,
        posthoc.add_evaluate,
        posthoc.add_ensemble,
        training.add_ablate,
        training.add_self_train,
        posthoc.add_compare,
        posthoc.add_audit,
        posthoc.add_predict,
        deploy.add_calibrate,
        deploy.add_adapt,
        posthoc.add_export,
        interpret.add_cka,
        interpret.add_attention,
        training.add_weights,
    ):
        add(sub)
    for name in ("run", "ablate", "self-train"):  # commands that read the user's own recipe
        sub.choices[name].add_argument(
            "--allow-plugins",
            action="store_true",
            help="import the recipe's experiment.plugins (Python code that runs with your permissions); without "
            "it a recipe that names plug-ins is refused. Same as MEDTRICKS_ALLOW_PLUGINS=1",
        )
    # commands that load a stored run
    for name in ("evaluate", "ensemble", "audit", "predict", "export", "cka", "attention"):
        sub.choices[name].add_argument(
            "--plugin",
            action="append",
            default=[],
            metavar="MODULE|FILE.py",
            help="import this trick plug-in first (repeatable); a stored run's own plug-in list is never imported",
        )
    return parser


#: command -> handler (args -> exit code); those in _TAKE_PARSER also get the parser (their help)
_HANDLERS = {**training.HANDLERS, **posthoc.HANDLERS, **interpret.HANDLERS, **deploy.HANDLERS}
_TAKE_PARSER = ("data", "weights")


def _opt_in_plugins(args) -> None:
    """Plug-ins run only when the user says so on this command line (``--allow-plugins`` / ``--plugin``).
    The registry (it imports torch) is imported only then: ``weights list`` and ``--help`` stay light."""
    if getattr(args, "allow_plugins", False):
        from medtricks.tricks.registry import allow_plugins

        allow_plugins()  # also for the processes it starts: torchrun ranks, ablation workers, Ray
    if getattr(args, "plugin", None):
        from medtricks.tricks.registry import load_plugins

        load_plugins(args.plugin)


def _record_failure(**failure) -> bool:
    from medtricks.train.distributed import record_failure

    return record_failure(**failure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command != "run" and under_torchrun():
        print(
            f"medtricks {args.command}: error: only `medtricks run` trains data-parallel under torchrun; run "
            f"`medtricks {args.command}` without torchrun",
            file=sys.stderr,
        )
        return 2
    try:
        _opt_in_plugins(args)
        handler = _HANDLERS.get(args.command)
        if handler is not None:
            return handler(args, parser) if args.command in _TAKE_PARSER else handler(args)
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is checkpointed; continue with --resume auto", file=sys.stderr)
        return 130
    except MedtricksError as err:  # bad input a user can fix: one line; anything else is a bug (traceback)
        message = f"medtricks {args.command}: error: {err}"
        if not (under_torchrun() and _record_failure(message=message)):  # --nproc: the launcher says it once
            print(message, file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: its traceback, from the --nproc launcher unless another process
        if under_torchrun():  # stopped on a user-fixable error (this one then only lost its peer)
            import traceback

            if _record_failure(traceback_text=f"[rank {os.environ.get('RANK', '?')}] {traceback.format_exc()}"):
                return 1
        raise
    parser.error(f"unknown command {args.command!r}")
    return 2
