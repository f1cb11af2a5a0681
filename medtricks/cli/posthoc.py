"""The commands that work on finished runs (the :mod:`medtricks.posthoc` layer): ``evaluate``, ``ensemble``,
``compare``, ``audit``, ``predict``, ``export``; ``cka`` and ``attention``, which look inside a run, are in
:mod:`medtricks.cli.interpret`. Each handler imports what it runs."""

from __future__ import annotations

import argparse
import sys

from medtricks._defaults import DEFAULT_METRIC
from medtricks.cli.interpret import add_attention, add_cka  # noqa: F401 - importable from here, as before
from medtricks.cli.shared import RUNS_DIR_HELP

_TTA_HELP = (
    "test-time augmentation: none (default) or flip, the mean of each image and its horizontal mirror. "
    "Flip must be named: a mirrored chest X-ray has its heart on the right, and the X-ray presets never "
    "flip in training, so the model never saw such images (a warning says so)"
)


def add_evaluate(sub) -> None:
    """``medtricks evaluate RUN``: a trained run on any dataset a card describes."""
    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a trained run on any dataset a card describes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (the quickstart run, then a second phantom set drawn with another seed: new images of "
        "new patients):\n"
        "  medtricks run quickstart                      # prints its run folder, runs/quickstart/<id>\n"
        "  medtricks data synth data/phantoms_test --seed 7 --size 64 --n 200\n"
        "  medtricks evaluate runs/quickstart/<id> --card synthetic-phantoms --root data/phantoms_test\n",
    )
    evaluate.add_argument(
        "run",
        help="a run folder (runs/NAME/ID), its model/model_state.pt, or a run id "
        "(MLflow, or the local run store under --runs-dir)",
    )
    evaluate.add_argument("--card", required=True, help="data card name or YAML path of the evaluation data")
    evaluate.add_argument("--root", required=True, help="root folder of the evaluation data")
    evaluate.add_argument(
        "--split",
        choices=["all", "train", "val", "test"],
        default="all",
        help="all images (an external test set, the default) or one split of the card's",
    )
    evaluate.add_argument("--tta", nargs="?", const="", default="none", metavar="none|flip", help=_TTA_HELP)
    evaluate.add_argument(
        "--threshold",
        default="stored",
        metavar="stored|youden|sens=0.95|0.5|T",
        help="binary models: the operating point reported next to 0.5: the run's stored "
        "model/operating_point.json (default; 0.5 if the run has none), youden or sens=S "
        "chosen again on the run's stored validation predictions, or a number in (0, 1) "
        "(the forms predict takes)",
    )
    evaluate.add_argument(
        "--prevalence",
        type=float,
        default=None,
        metavar="P",
        help="binary models: positive-class prevalence of this data; posteriors are prior-shifted "
        "from the run's training priors to [1-P, P] before the threshold (Saerens 2002)",
    )
    evaluate.add_argument(
        "--site",
        default=None,
        metavar="NAME",
        help="binary models: decide with the run's site profile NAME (`medtricks calibrate` / "
        "`adapt --method em-prior`): its temperature, threshold and prior shift",
    )
    evaluate.add_argument(
        "--n-bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples over images for the confidence intervals (default 1000; 0: no intervals, fast)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: the run's, else $MLFLOW_TRACKING_URI)"
    )
    evaluate.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    evaluate.add_argument(
        "--no-log",
        action="store_true",
        help="print only; log nothing (to MLflow or the local run store, as the run's recipe says)",
    )
    evaluate.add_argument(
        "--save-predictions",
        default=None,
        metavar="FILE",
        help="also write the per-image predictions (y_true, probs; no file names) to this .npz",
    )
    evaluate.add_argument(
        "--class-map",
        default=None,
        metavar="CARD_CLASS=MODEL_CLASS,...",
        help="score on a card whose classes differ from the model's, e.g. "
        "covid=pneumonia,pneumonia=pneumonia,normal=normal ('drop' leaves a class out)",
    )
    evaluate.add_argument(
        "--on-bad-image",
        choices=["error", "skip"],
        default="error",
        help="an unreadable or corrupt image: stop and list them (error, default) or leave them "
        "out of the scores (skip; counted in a warning and the logged n_quarantined)",
    )


def _cmd_evaluate(args) -> int:
    from medtricks.posthoc.evaluation import evaluate_trained

    report = evaluate_trained(
        args.run,
        card=args.card,
        root=args.root,
        split=args.split,
        tta=args.tta,
        threshold=args.threshold,
        prevalence=args.prevalence,
        site=args.site,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        tracking_uri=args.tracking_uri,
        log=not args.no_log,
        runs_dir=args.runs_dir,
        class_map=args.class_map,
        on_bad_image=args.on_bad_image,
    )
    # the table's own header adds the image count and the bootstrap (resamples, seed): said once
    title = (
        f"evaluation of {report.source_run or args.run} on {args.card} ({args.split}"
        f"{', flip TTA' if args.tta == 'flip' else ''})"
    )
    print(report.table(title=title))
    return _report_outputs(report, report, args.save_predictions)


def add_ensemble(sub) -> None:
    """``medtricks ensemble RUN RUN ...``: the mean probabilities of several runs."""
    ensemble = sub.add_parser("ensemble", help="average the probabilities of several trained runs on the same images")
    ensemble.add_argument(
        "runs", nargs="+", metavar="RUN", help="two or more run folders or MLflow run ids (same classes)"
    )
    ensemble.add_argument("--card", required=True, help="data card name or YAML path of the evaluation data")
    ensemble.add_argument("--root", required=True, help="root folder of the evaluation data")
    ensemble.add_argument(
        "--split",
        choices=["all", "test", "val"],
        default="all",
        help="all images (default) or one split of the card's (every member must split alike)",
    )
    ensemble.add_argument(
        "--tta", nargs="?", const="", default="none", metavar="none|flip", help=_TTA_HELP + " (every member)"
    )
    ensemble.add_argument(
        "--prevalence",
        type=float,
        default=None,
        metavar="P",
        help="binary models: prior-shift the ensemble to positive-class prevalence P",
    )
    ensemble.add_argument("--n-bootstrap", type=int, default=1000)
    ensemble.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ensemble.add_argument("--tracking-uri", default=None)
    ensemble.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    ensemble.add_argument(
        "--save-predictions",
        default=None,
        metavar="FILE",
        help="also write the ensemble's per-image predictions to this .npz",
    )


def _cmd_ensemble(args) -> int:
    from medtricks.posthoc.ensemble import ensemble_runs

    report = ensemble_runs(
        args.runs,
        card=args.card,
        root=args.root,
        split=args.split,
        tta=args.tta,
        prevalence=args.prevalence,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        tracking_uri=args.tracking_uri,
        log=not args.no_log,
    )
    print(report.table())
    return _report_outputs(report, report.ensemble, args.save_predictions)


def _report_outputs(report, predictions, save_path) -> int:
    """Where an evaluation's predictions and its run in the run store went (evaluate, ensemble)."""
    if save_path:
        print(f"predictions: {predictions.save_predictions(save_path)}")
    if report.run_id:
        print(f"logged to {getattr(report, 'logged_to', None) or 'MLflow'}: run {report.run_id}")
    return 0


def add_compare(sub) -> None:
    """``medtricks compare``: a side-by-side table of runs."""
    compare = sub.add_parser(
        "compare",
        help="side-by-side table of runs (MLflow, or the local run store of "
        "tracking.backend: none with --runs-dir), grouped by a tag",
    )
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", default=None, help="an experiment name")
    which.add_argument("--runs", nargs="+", default=None, metavar="RUN_ID")
    compare.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help="val/<m> or test/<m> (training runs' best checkpoint), eval/<m> or eval/op/<m> "
        "(evaluation and ensemble runs), e.g. val/auroc, eval/op/sensitivity/pneumonia",
    )
    compare.add_argument("--group-by", default=None, help="a tag or param, e.g. variant")
    store = compare.add_mutually_exclusive_group()
    store.add_argument(
        "--tracking-uri",
        default=None,
        help="read MLflow at this URI (the default store: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    store.add_argument(
        "--runs-dir",
        default=None,
        metavar="DIR",
        help="read the local run store under DIR instead of MLflow: the runs of tracking.backend: none "
        "(DIR is their experiment.output_dir, e.g. runs)",
    )


def _cmd_compare(args) -> int:
    from medtricks.ablation import compare_runs

    print(
        compare_runs(
            experiment=args.experiment,
            run_ids=args.runs,
            metric=args.metric,
            group_by=args.group_by,
            tracking_uri=args.tracking_uri,
            runs_dir=args.runs_dir,
        ),
        end="",
    )
    return 0


def add_audit(sub) -> None:
    """``medtricks audit RUN``: adversarial, corruption or shortcut audit."""
    audit = sub.add_parser("audit", help="adversarial and corruption robustness audit of a trained run")
    audit.add_argument(
        "run",
        help="a run folder, its model/model_state.pt, or a run id (MLflow, or the local run store under --runs-dir)",
    )
    audit.add_argument(
        "--card", default=None, help="evaluate on this card's data instead of the run's validation split"
    )
    audit.add_argument("--root", default=None, help="root of --card's data")
    audit.add_argument(
        "--split",
        choices=["all", "train", "val", "test"],
        default=None,
        help="split of the data (default: val for the run's data, all for --card)",
    )
    audit.add_argument(
        "--attacks",
        default=None,
        help="comma-separated: fgsm,pgd_linf,pgd_l2,apgd_ce,apgd_square,square,transfer "
        "(apgd_square: a reduced AutoAttack, see docs/robustness.md)",
    )
    audit.add_argument("--eps", default=None, help="comma-separated epsilons in pixel units, e.g. 0,1/255,2/255")
    audit.add_argument("--corruptions", default=None, help="comma-separated names, 'all' or 'none'")
    audit.add_argument("--n", type=int, default=None, help="images to audit (default: recipe audit.n)")
    audit.add_argument("--surrogate", default=None, help="run for the transfer attack's surrogate model")
    audit.add_argument(
        "--target-class",
        default=None,
        help="targeted attacks: push every image towards this class name (default: untargeted)",
    )
    audit.add_argument(
        "--shortcut",
        action="store_true",
        help="the shortcut audit instead: lungs hidden / lungs only, border blanked, Grad-CAM overlays "
        "and Grad-CAM mass in the lung field (DeGrave et al. 2021), with a verdict line",
    )
    audit.add_argument("--tracking-uri", default=None)
    audit.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    audit.add_argument(
        "--no-log",
        action="store_true",
        help="print only; log nothing (to MLflow or the local run store, as the run's recipe says)",
    )


def _cmd_audit(args) -> int:
    from medtricks.posthoc.auditing import audit_trained

    report = audit_trained(
        args.run,
        card=args.card,
        root=args.root,
        split=args.split,
        attacks=args.attacks,
        eps=args.eps,
        corruptions=args.corruptions,
        n=args.n,
        surrogate=args.surrogate,
        target_class=args.target_class,
        tracking_uri=args.tracking_uri,
        log=not args.no_log,
        runs_dir=args.runs_dir,
        shortcut=args.shortcut,
    )
    print(report.table)
    if report.run_id:
        print(f"logged to {report.logged_to or 'MLflow'}: run {report.run_id}")
    return 0


def add_predict(sub) -> None:
    """``medtricks predict RUN INPUT ...``: predictions for new images, as a CSV."""
    predict = sub.add_parser("predict", help="predict new images (files or folders) with a trained run, as a CSV")
    predict.add_argument(
        "run",
        help="a run folder (runs/NAME/ID), its model/model_state.pt, or a run id "
        "(MLflow, or the local run store under --runs-dir)",
    )
    predict.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files or folders (searched recursively: PNG, JPEG, TIFF, DICOM by extension, "
        "DICOM also by its preamble)",
    )
    predict.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="the predictions CSV (default: stdout); the bad-file list goes next to it (FILE's stem + .bad_files.csv)",
    )
    predict.add_argument(
        "--threshold",
        default="stored",
        metavar="stored|youden|sens=0.95|0.5|T",
        help="binary models: the operating point of the predicted class: the run's stored "
        "model/operating_point.json (default; 0.5 if the run has none, which is said), youden "
        "or sens=S chosen again on the run's stored validation predictions, or a number in (0, 1). "
        "Multiclass models: argmax",
    )
    predict.add_argument(
        "--site",
        default=None,
        metavar="NAME",
        help="binary models: decide with the run's site profile NAME (`medtricks calibrate`): "
        "prob_ columns temperature-scaled, the profile's threshold",
    )
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    predict.add_argument(
        "--cam",
        default=None,
        metavar="DIR",
        help="also write a Grad-CAM overlay PNG per image into DIR (same relative name as the CSV's "
        "image column, .png; binary models: for the positive class, multiclass: the predicted "
        "class; at the model's input size); the CSV gains a cam column",
    )
    predict.add_argument("--tracking-uri", default=None, help="MLflow URI to look a run id up in")
    predict.add_argument(
        "--runs-dir",
        default=None,
        metavar="DIR",
        help="the local run store (tracking.backend: none) to look run ids up in (default: runs)",
    )


def _cmd_predict(args) -> int:
    from medtricks.posthoc.predict import check_outputs, predict_images, require_predictions, summary, write_predictions

    check_outputs(args.inputs, out=args.out, cam_dir=args.cam)  # before any work: never overwrite an input
    preds, bad = predict_images(
        args.run,
        args.inputs,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
        cam_dir=args.cam,
        site=args.site,
    )
    bad_path = write_predictions(preds, bad, args.out)
    print(summary(preds, bad, bad_path), file=sys.stderr)
    require_predictions(preds, bad, bad_path)  # all inputs bad: an error (the bad-file list is written)
    if args.out:
        print(f"predictions: {args.out}", file=sys.stderr)
    return 0


def add_export(sub) -> None:
    """``medtricks export RUN``: ONNX, TorchScript or an MLflow pyfunc model."""
    export = sub.add_parser(
        "export",
        help="export a trained run as ONNX, TorchScript or an MLflow pyfunc model "
        "(preprocessing and softmax inside, parity-checked, with a model card)",
    )
    export.add_argument(
        "run",
        help="a run folder, its model/model_state.pt, or a run id (MLflow, or the local run store under --runs-dir)",
    )
    export.add_argument(
        "--format",
        dest="fmt",
        required=True,
        choices=["onnx", "torchscript", "mlflow"],
        help="mlflow: a folder `mlflow models serve -m PATH` serves (TorchScript inside)",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the file to write (or an existing folder: model.onnx / model.pt in it); the model "
        "card goes to PATH.md. --format mlflow: a new (or empty) folder, card inside",
    )
    export.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default 17)")
    export.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    export.add_argument("--tracking-uri", default=None, help="MLflow URI to look a run id up in")


def _cmd_export(args) -> int:
    from medtricks.posthoc.export import export_model

    result = export_model(
        args.run, args.fmt, args.out, opset=args.opset, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri
    )
    print(result.summary())
    return 0


#: command -> handler (args -> exit code)
HANDLERS = {
    "evaluate": _cmd_evaluate,
    "ensemble": _cmd_ensemble,
    "compare": _cmd_compare,
    "audit": _cmd_audit,
    "predict": _cmd_predict,
    "export": _cmd_export,
}
