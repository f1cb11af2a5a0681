"""The ``medtricks`` command. Imports are lazy so ``medtricks --help`` answers in well under 1 s."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

from medtricks.errors import ConfigError, MedtricksError

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


_RUNS_DIR_HELP = ("the local run store (tracking.backend: none) to look run ids up in and, for such runs, to log "
                  "into (default: runs for ids; the run folder's own experiment.output_dir for logging)")
_TTA_HELP = ("test-time augmentation: none (default) or flip, the mean of each image and its horizontal mirror. "
             "Flip must be named: a mirrored chest X-ray has its heart on the right, and the X-ray presets never "
             "flip in training, so the model never saw such images (a warning says so)")


def _version() -> str:
    from medtricks import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtricks", description="Bag-of-tricks fine-tuning of pretrained CNNs on chest X-rays.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medtricks {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run one experiment from a YAML recipe")
    run.add_argument("recipe", help="path to a recipe YAML file, or a shipped recipe's name (e.g. quickstart)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set optim.lr=0.05 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print the fully resolved recipe and exit")
    run.add_argument("--resume", default=None, metavar="auto|RUN_DIR",
                     help="continue the newest unfinished run of this recipe (auto) or a given run folder")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="train data-parallel in N processes on this machine (one per GPU; gloo processes on CPU): "
                          "runs torchrun, `python -m medtricks.train.torchrun --standalone --nproc-per-node N -m "
                          "medtricks run RECIPE ...` with the other arguments (torch.distributed.run that reports a "
                          "failure of its processes once). train.batch_size is per process")

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
    check.add_argument("--test-by", choices=["random", "id_order"], default="random",
                       help="how the test split is carved: random patients, or the lowest-numbered patients "
                            "of every file-name ID series (earliest acquisitions)")

    gamma = sub.add_parser("gamma", help="show what a BN-gamma strategy would change, without training")
    gamma.add_argument("model", help="a timm model name (or monai:NAME)")
    gamma.add_argument("--weights", default="none", metavar="WEIGHTS",
                       help="weights to build the model with: none (default: the architecture only, nothing is "
                            "read or downloaded), imagenet, sin, sin_in, sin_in_in or file:PATH (see "
                            "`medtricks weights list`)")
    # No `choices`: the names live in medtricks.gamma.bn.STRATEGIES (importing it here would import
    # torch on every `--help`); a wrong name is answered with the list.
    gamma.add_argument("--strategy", default="zero_late", metavar="STRATEGY",
                       help="a tricks.bn_gamma strategy (default zero_late; a wrong name lists the valid ones)")
    gamma.add_argument("--stages", type=int, nargs="+", default=None, help="stage indices (negative from the end)")
    gamma.add_argument("--last-n-blocks", type=int, default=None, metavar="N",
                       help="the last N residual blocks of the whole network")
    gamma.add_argument("--names", nargs="+", default=None, help="fnmatch patterns on module names")
    gamma.add_argument("--which", choices=["last", "all"], default="last",
                       help="in each chosen block: the norm ending the residual branch (last, default) or every "
                            "norm on the branch (all)")
    gamma.add_argument("--in-chans", type=int, choices=[1, 3], default=3,
                       help="input channels of the model: 1 (grayscale; the first conv's RGB kernels summed) "
                            "or 3 (default)")

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a trained run on any dataset a card describes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (the quickstart run, then a second phantom set drawn with another seed: new images of "
               "new patients):\n"
               "  medtricks run quickstart                      # prints its run folder, runs/quickstart/<id>\n"
               "  medtricks data synth data/phantoms_test --seed 7 --size 64 --n 200\n"
               "  medtricks evaluate runs/quickstart/<id> --card synthetic-phantoms --root data/phantoms_test\n")
    evaluate.add_argument("run", help="a run folder (runs/NAME/ID), its model/model_state.pt, or a run id "
                                      "(MLflow, or the local run store under --runs-dir)")
    evaluate.add_argument("--card", required=True, help="data card name or YAML path of the evaluation data")
    evaluate.add_argument("--root", required=True, help="root folder of the evaluation data")
    evaluate.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                          help="all images (an external test set, the default) or one split of the card's")
    evaluate.add_argument("--tta", nargs="?", const="", default="none", metavar="none|flip", help=_TTA_HELP)
    evaluate.add_argument("--threshold", default="stored", metavar="stored|youden|sens=0.95|0.5|T",
                          help="binary models: the operating point reported next to 0.5: the run's stored "
                               "model/operating_point.json (default; 0.5 if the run has none), youden or sens=S "
                               "chosen again on the run's stored validation predictions, or a number in (0, 1) "
                               "(the forms predict takes)")
    evaluate.add_argument("--prevalence", type=float, default=None, metavar="P",
                          help="binary models: positive-class prevalence of this data; posteriors are prior-shifted "
                               "from the run's training priors to [1-P, P] before the threshold (Saerens 2002)")
    evaluate.add_argument("--site", default=None, metavar="NAME",
                          help="binary models: decide with the run's site profile NAME (`medtricks calibrate` / "
                               "`adapt --method em-prior`): its temperature, threshold and prior shift")
    evaluate.add_argument("--n-bootstrap", type=int, default=1000, metavar="N",
                          help="bootstrap resamples over images for the confidence intervals (default 1000; "
                               "0: no intervals, fast)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the run's, else $MLFLOW_TRACKING_URI)")
    evaluate.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)
    evaluate.add_argument("--no-log", action="store_true",
                          help="print only; log nothing (to MLflow or the local run store, as the run's recipe says)")
    evaluate.add_argument("--save-predictions", default=None, metavar="FILE",
                          help="also write the per-image predictions (y_true, probs; no file names) to this .npz")
    evaluate.add_argument("--class-map", default=None, metavar="CARD_CLASS=MODEL_CLASS,...",
                          help="score on a card whose classes differ from the model's, e.g. "
                               "covid=pneumonia,pneumonia=pneumonia,normal=normal ('drop' leaves a class out)")
    evaluate.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                          help="an unreadable or corrupt image: stop and list them (error, default) or leave them "
                               "out of the scores (skip; counted in a warning and the logged n_quarantined)")

    ensemble = sub.add_parser("ensemble", help="average the probabilities of several trained runs on the same images")
    ensemble.add_argument("runs", nargs="+", metavar="RUN", help="two or more run folders or MLflow run ids (same classes)")
    ensemble.add_argument("--card", required=True, help="data card name or YAML path of the evaluation data")
    ensemble.add_argument("--root", required=True, help="root folder of the evaluation data")
    ensemble.add_argument("--split", choices=["all", "test", "val"], default="all",
                          help="all images (default) or one split of the card's (every member must split alike)")
    ensemble.add_argument("--tta", nargs="?", const="", default="none", metavar="none|flip",
                          help=_TTA_HELP + " (every member)")
    ensemble.add_argument("--prevalence", type=float, default=None, metavar="P",
                          help="binary models: prior-shift the ensemble to positive-class prevalence P")
    ensemble.add_argument("--n-bootstrap", type=int, default=1000)
    ensemble.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ensemble.add_argument("--tracking-uri", default=None)
    ensemble.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    ensemble.add_argument("--save-predictions", default=None, metavar="FILE",
                          help="also write the ensemble's per-image predictions to this .npz")

    ablate = sub.add_parser("ablate", help="multi-seed ablation of tricks with confidence intervals")
    ablate.add_argument("recipe", help="the baseline recipe")
    ablate.add_argument("--tricks", default=None,
                        help="comma-separated, e.g. warmup,cosine,label_smoothing=0.1,no_bias_decay,bn_gamma=zero_late")
    ablate.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: recipe ablation.seeds)")
    ablate.add_argument("--mode", choices=["cumulative", "one_at_a_time", "grid"], default=None)
    ablate.add_argument("--jobs", type=int, default=None,
                        help="child runs in parallel on this machine, local executor (default 1)")
    ablate.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="where the children train: this machine (default) or a Ray cluster, one task each")
    ablate.add_argument("--address", default=None, metavar="auto|ray://HOST:10001",
                        help="Ray: the cluster to join (default: a local Ray started for this command)")
    ablate.add_argument("--cpus-per-run", type=float, default=None, metavar="N",
                        help="Ray: CPUs (and torch threads) per child (default 1)")
    ablate.add_argument("--gpus-per-run", type=float, default=None, metavar="N",
                        help="Ray: GPUs per child (default 0)")
    ablate.add_argument("--retries", type=int, default=None, metavar="N",
                        help="Ray: restarts of a child whose worker died; it resumes from its checkpoint (default 2)")
    ablate.add_argument("--metric", default=None, help="metric to compare (default val/auroc)")
    ablate.add_argument("--test", choices=["t", "wilcoxon"], default=None, help="paired test over seeds")
    ablate.add_argument("--until-ci", type=float, default=None, metavar="W",
                        help="seeds until the answer is clear: after --seeds seeds, add rounds of --seed-step seeds "
                             "until every delta's 95%% interval is within +-W or excludes 0, or --max-seeds is reached; "
                             "intervals are group-sequential repeated CIs (Pocock or O'Brien-Fleming boundary over the "
                             "fixed look schedule; Jennison & Turnbull), valid whenever it stops")
    ablate.add_argument("--max-seeds", type=int, default=None, metavar="N", help="--until-ci: the most seeds per variant")
    ablate.add_argument("--seed-step", type=int, default=None, metavar="K",
                        help="--until-ci: seeds added per round (default: --seeds)")
    ablate.add_argument("--boundary", choices=["pocock", "obrien_fleming"], default=None,
                        help="--until-ci: group-sequential boundary (default pocock)")
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    self_train = sub.add_parser(
        "self-train", help="Noisy Student self-training: a teacher, then noised students on its pseudo-labels",
        description="Round 0 trains the teacher on the labelled images (tricks.pseudo_label off). Each later round "
                    "pseudo-labels the unlabelled pool (data.label_fraction < 1, data.label_count or "
                    "data.unlabeled) with the round before (tricks.pseudo_label.teacher; its threshold/soft/weight "
                    "from the recipe) and trains a noised student: dropout, stochastic depth where the model "
                    "takes it, a stronger augmentation preset. One parent run, one child run per round; re-running "
                    "the same command skips finished rounds and resumes an interrupted one.")
    self_train.add_argument("recipe", help="the recipe of the teacher (and, with the noise, of every student)")
    self_train.add_argument("--rounds", type=int, default=1, metavar="N",
                            help="student rounds after the teacher (default 1: teacher + 1 student)")
    self_train.add_argument("--drop-rate", type=float, default=0.5, metavar="P",
                            help="students' model.drop_rate, dropout before the classifier (default 0.5, "
                                 "as Noisy Student; 0 keeps the recipe's)")
    self_train.add_argument("--drop-path-rate", type=float, default=0.2, metavar="P",
                            help="students' stochastic depth, model.kwargs.drop_path_rate, where the timm model "
                                 "takes it (default 0.2, as Noisy Student; 0 keeps the recipe's)")
    self_train.add_argument("--augment", default="cxr_shift", metavar="PRESET|keep",
                            help="students' data.augment: an augmentation preset (cxr_light, cxr_shift: the default, the "
                                 "strongest photometric X-ray preset, cxr_lungfield, paper_baseline, none), or keep "
                                 "(the recipe's)")
    self_train.add_argument("--student", default=None, metavar="MODEL",
                            help="students' model.name, an equal or larger model (default: the recipe's model)")
    self_train.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the recipe's)")
    self_train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a recipe key for every round, e.g. --set data.label_fraction=0.1")

    compare = sub.add_parser("compare", help="side-by-side table of runs (MLflow, or the local run store of "
                                             "tracking.backend: none with --runs-dir), grouped by a tag")
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", default=None, help="an experiment name")
    which.add_argument("--runs", nargs="+", default=None, metavar="RUN_ID")
    compare.add_argument("--metric", default="val/auroc",
                         help="val/<m> or test/<m> (training runs' best checkpoint), eval/<m> or eval/op/<m> "
                              "(evaluation and ensemble runs), e.g. val/auroc, eval/op/sensitivity/pneumonia")
    compare.add_argument("--group-by", default=None, help="a tag or param, e.g. variant")
    store = compare.add_mutually_exclusive_group()
    store.add_argument("--tracking-uri", default=None,
                       help="read MLflow at this URI (the default store: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    store.add_argument("--runs-dir", default=None, metavar="DIR",
                       help="read the local run store under DIR instead of MLflow: the runs of tracking.backend: none "
                            "(DIR is their experiment.output_dir, e.g. runs)")

    audit = sub.add_parser("audit", help="adversarial and corruption robustness audit of a trained run")
    audit.add_argument("run", help="a run folder, its model/model_state.pt, or a run id (MLflow, or the local "
                                   "run store under --runs-dir)")
    audit.add_argument("--card", default=None, help="evaluate on this card's data instead of the run's validation split")
    audit.add_argument("--root", default=None, help="root of --card's data")
    audit.add_argument("--split", choices=["all", "train", "val", "test"], default=None,
                       help="split of the data (default: val for the run's data, all for --card)")
    audit.add_argument("--attacks", default=None, help="comma-separated: fgsm,pgd_linf,pgd_l2,apgd_ce,apgd_square,square,transfer "
                       "(apgd_square: a reduced AutoAttack, see docs/robustness.md)")
    audit.add_argument("--eps", default=None, help="comma-separated epsilons in pixel units, e.g. 0,1/255,2/255")
    audit.add_argument("--corruptions", default=None, help="comma-separated names, 'all' or 'none'")
    audit.add_argument("--n", type=int, default=None, help="images to audit (default: recipe audit.n)")
    audit.add_argument("--surrogate", default=None, help="run for the transfer attack's surrogate model")
    audit.add_argument("--target-class", default=None,
                       help="targeted attacks: push every image towards this class name (default: untargeted)")
    audit.add_argument("--shortcut", action="store_true",
                       help="the shortcut audit instead: lungs hidden / lungs only, border blanked, Grad-CAM overlays "
                            "and Grad-CAM mass in the lung field (DeGrave et al. 2021), with a verdict line")
    audit.add_argument("--tracking-uri", default=None)
    audit.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)
    audit.add_argument("--no-log", action="store_true",
                       help="print only; log nothing (to MLflow or the local run store, as the run's recipe says)")

    predict = sub.add_parser("predict", help="predict new images (files or folders) with a trained run, as a CSV")
    predict.add_argument("run", help="a run folder (runs/NAME/ID), its model/model_state.pt, or a run id "
                                     "(MLflow, or the local run store under --runs-dir)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files or folders (searched recursively: PNG, JPEG, TIFF, DICOM by extension, "
                              "DICOM also by its preamble)")
    predict.add_argument("--out", default=None, metavar="FILE",
                         help="the predictions CSV (default: stdout); the bad-file list goes next to it "
                              "(FILE's stem + .bad_files.csv)")
    predict.add_argument("--threshold", default="stored", metavar="stored|youden|sens=0.95|0.5|T",
                         help="binary models: the operating point of the predicted class: the run's stored "
                              "model/operating_point.json (default; 0.5 if the run has none, which is said), youden "
                              "or sens=S chosen again on the run's stored validation predictions, or a number in (0, 1). "
                              "Multiclass models: argmax")
    predict.add_argument("--site", default=None, metavar="NAME",
                         help="binary models: decide with the run's site profile NAME (`medtricks calibrate`): "
                              "prob_ columns temperature-scaled, the profile's threshold")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    predict.add_argument("--cam", default=None, metavar="DIR",
                         help="also write a Grad-CAM overlay PNG per image into DIR (same relative name as the CSV's "
                              "image column, .png; binary models: for the positive class, multiclass: the predicted "
                              "class; at the model's input size); the CSV gains a cam column")
    predict.add_argument("--tracking-uri", default=None, help="MLflow URI to look a run id up in")
    predict.add_argument("--runs-dir", default=None, metavar="DIR",
                         help="the local run store (tracking.backend: none) to look run ids up in (default: runs)")

    calibrate = sub.add_parser(
        "calibrate", help="fit a binary run's threshold, temperature and prevalence on a labelled site sample "
                          "(a named site profile for evaluate/predict --site)")
    calibrate.add_argument("run", help="a run folder, its model/model_state.pt, or a run id (MLflow, or the local "
                                       "run store under --runs-dir)")
    calibrate.add_argument("--card", required=True, help="data card name or YAML path of the site sample")
    calibrate.add_argument("--root", required=True, help="root folder of the labelled site sample")
    calibrate.add_argument("--name", default="site", help="the site profile's name (default: site); "
                                                          "model/sites/NAME.json in the run")
    calibrate.add_argument("--target-sensitivity", type=float, default=None, metavar="S",
                           help="the most specific threshold with site sensitivity >= S (default: Youden's J)")
    calibrate.add_argument("--n-bootstrap", type=int, default=200, metavar="N",
                           help="patient-level bootstrap resamples for the intervals (default 200)")
    calibrate.add_argument("--folds", type=int, default=5, help="patient-level cross-fitting folds (default 5)")
    calibrate.add_argument("--min-per-class", type=int, default=20, metavar="N",
                           help="refuse a sample with fewer images of a class (default 20)")
    calibrate.add_argument("--seed", type=int, default=0, help="bootstrap and fold seed")
    calibrate.add_argument("--class-map", default=None, metavar="CARD_CLASS=MODEL_CLASS,...",
                           help="a site card whose classes differ from the model's (see evaluate --class-map)")
    calibrate.add_argument("--tracking-uri", default=None)
    calibrate.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)
    calibrate.add_argument("--no-log", action="store_true", help="store the profile in the run folder only")

    adapt = sub.add_parser(
        "adapt", help="adapt a trained run to a new site: em-prior (a site profile), adabn or tent on unlabelled "
                      "images, finetune on labelled ones (cross-fitted by patient); a new run that records its parent")
    adapt.add_argument("run", help="a run folder, its model/model_state.pt, or a run id")
    adapt.add_argument("--root", required=True, help="folder of the site's images (em-prior/adabn/tent: labels not "
                                                     "needed, searched recursively like predict's inputs; finetune: "
                                                     "the labelled sample as --card describes it)")
    adapt.add_argument("--method", required=True, choices=["em-prior", "adabn", "tent", "finetune"],
                       help="em-prior: site prevalence by EM (Saerens 2002), stored as a site profile; adabn: "
                            "BatchNorm statistics re-estimated on the images; tent: BatchNorm affine parameters "
                            "by entropy minimisation (Wang 2021); finetune: the run fine-tuned on labelled site "
                            "images, measured by patient-level cross-fitting, then trained on all of them")
    adapt.add_argument("--card", default=None, help="finetune (required): data card name or YAML path of the "
                                                    "labelled site sample; its classes must be the run's")
    adapt.add_argument("--name", default=None, help="em-prior: the site profile's name (default: em-prior)")
    adapt.add_argument("--steps", type=int, default=1, help="tent: passes over the images (default 1)")
    adapt.add_argument("--lr", type=float, default=None,
                       help="tent: SGD learning rate (default 0.001); finetune: optim.lr (default: the run's x 0.1; "
                            "linear scaling, when its recipe uses it, applies on top)")
    adapt.add_argument("--batch-size", type=int, default=None,
                       help="adabn/tent (default 32); finetune: train.batch_size (default: the run's)")
    adapt.add_argument("--seed", type=int, default=0, help="tent batch order; em-prior bootstrap; finetune: the "
                                                           "folds and the bootstrap")
    adapt.add_argument("--folds", type=int, default=5, help="finetune: patient-level cross-fitting folds (default 5)")
    adapt.add_argument("--epochs", type=int, default=3, help="finetune: training epochs (default 3)")
    adapt.add_argument("--freeze", default=None, metavar="0,1,2",
                       help="finetune: model.freeze as timm stage indices (0 = stem) or module patterns, or none "
                            "(default: the run's own)")
    adapt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="finetune: any other recipe key of the fine-tuning runs (repeatable)")
    adapt.add_argument("--n-bootstrap", type=int, default=None, metavar="N",
                       help="bootstrap resamples of the intervals (em-prior default 200; finetune default 1000)")
    adapt.add_argument("--out-dir", default=None, metavar="DIR",
                       help="where the new run folder goes (default: beside the parent run); finetune: also its "
                            "cross-fit folder finetune-<id>/ (a rerun skips the folds it finished)")
    adapt.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    adapt.add_argument("--tracking-uri", default=None)
    adapt.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)
    adapt.add_argument("--no-log", action="store_true", help="write the run folder only; log nothing")

    export = sub.add_parser("export", help="export a trained run as ONNX, TorchScript or an MLflow pyfunc model "
                                           "(preprocessing and softmax inside, parity-checked, with a model card)")
    export.add_argument("run", help="a run folder, its model/model_state.pt, or a run id (MLflow, or the local "
                                    "run store under --runs-dir)")
    export.add_argument("--format", dest="fmt", required=True, choices=["onnx", "torchscript", "mlflow"],
                        help="mlflow: a folder `mlflow models serve -m PATH` serves (TorchScript inside)")
    export.add_argument("--out", required=True, metavar="PATH",
                        help="the file to write (or an existing folder: model.onnx / model.pt in it); the model "
                             "card goes to PATH.md. --format mlflow: a new (or empty) folder, card inside")
    export.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default 17)")
    export.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)
    export.add_argument("--tracking-uri", default=None, help="MLflow URI to look a run id up in")

    cka = sub.add_parser("cka", help="CKA between the blocks of two runs, or of a run and its starting weights "
                                     "(--vs-init): which layers did fine-tuning move")
    cka.add_argument("runs", nargs="+", metavar="RUN", help="RUN_A [RUN_B]: run folders or run ids (one with --vs-init)")
    cka.add_argument("--vs-init", action="store_true",
                     help="compare RUN_A with its recipe's starting weights (pretrained, before any gamma strategy)")
    cka.add_argument("--layers", default=None, metavar="PATTERN",
                     help="comma-separated fnmatch patterns on module names, e.g. 'layer4.*' or 'blocks.*' "
                          "(default: every residual block of a CNN, every transformer block of a ViT); for both "
                          "runs, or RUN_A only when --layers-b is given")
    cka.add_argument("--layers-b", default=None, metavar="PATTERN",
                     help="patterns for RUN_B's modules (another architecture: e.g. RUN_A a ViT, RUN_B a ResNet)")
    cka.add_argument("--granularity", choices=["block", "stage"], default="block",
                     help="CNN layers by default: every residual block (default) or each stage's output (layer1..4; "
                          "readable against a ViT's 12 blocks); a ViT's layers are its blocks either way")
    cka.add_argument("--card", default=None, help="data card of the images (default: RUN_A's own data)")
    cka.add_argument("--root", default=None, help="root of --card's data")
    cka.add_argument("--split", choices=["all", "train", "val", "test"], default=None,
                     help="split of the data (default: val for RUN_A's data, all for --card)")
    cka.add_argument("--n", type=int, default=500, help="images (a seeded random subset; default 500)")
    cka.add_argument("--batch-size", type=int, default=64, help="minibatch size of minibatch CKA (default 64)")
    cka.add_argument("--method", choices=["minibatch", "linear"], default="minibatch",
                     help="minibatch (Nguyen et al. 2021, default; little memory) or linear (Kornblith et al. "
                          "2019 on all images at once; holds every layer's activations)")
    cka.add_argument("--seed", type=int, default=0, help="seed of the image subset")
    cka.add_argument("--out", default="cka", metavar="DIR", help="where cka.json and cka.png go (default: ./cka)")
    cka.add_argument("--log", action="store_true",
                     help="also log the heat map, JSON and per-block values to RUN_A's run store (onto RUN_A)")
    cka.add_argument("--device", default="auto")
    cka.add_argument("--tracking-uri", default=None)
    cka.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)

    attention = sub.add_parser("attention", help="where a trained run looks: ViT attention maps, rollout and "
                                                 "attention distance; CNN per-stage activation maps")
    attention.add_argument("run", help="a run folder (runs/NAME/ID), its model/model_state.pt, or a run id")
    attention.add_argument("--images", nargs="+", required=True, metavar="FILE_OR_DIR",
                           help="image files or folders (searched recursively: PNG, JPEG, TIFF, DICOM), read and "
                                "preprocessed as the run evaluates")
    attention.add_argument("--out", default="attention", metavar="DIR",
                           help="where attention.json, attention.npz, attention_distance.png (ViT) and "
                                "maps/<image>.png go (default: ./attention)")
    attention.add_argument("--layers", default=None, metavar="PATTERN",
                           help="comma-separated fnmatch patterns: ViT blocks to draw (e.g. 'blocks.1*'; the rollout "
                                "always runs through every block), CNN modules (default: each stage's output)")
    attention.add_argument("--max-images", type=int, default=16, metavar="N",
                           help="use at most N images, the first in sorted order (default 16)")
    attention.add_argument("--batch-size", type=int, default=8)
    attention.add_argument("--log", action="store_true",
                           help="also log the figures, JSON and (ViT) attention_distance/<block> metrics to the run's "
                                "run store (onto the run)")
    attention.add_argument("--device", default="auto")
    attention.add_argument("--tracking-uri", default=None)
    attention.add_argument("--runs-dir", default=None, metavar="DIR", help=_RUNS_DIR_HELP)

    weights = sub.add_parser("weights", help="the pretrained weights zoo")
    weights_sub = weights.add_subparsers(dest="weights_command", metavar="WEIGHTS_COMMAND")
    weights_sub.add_parser("list", help="list weights, their source and whether they are cached")
    fetch = weights_sub.add_parser("fetch", help="download weights into the cache (needs a network)")
    fetch.add_argument("name", help="weights name, e.g. sin")
    fetch.add_argument("--arch", default=None, help="architecture, e.g. resnet50")
    for name in ("run", "ablate", "self-train"):  # commands that read the user's own recipe
        sub.choices[name].add_argument(
            "--allow-plugins", action="store_true",
            help="import the recipe's experiment.plugins (Python code that runs with your permissions); without "
                 "it a recipe that names plug-ins is refused. Same as MEDTRICKS_ALLOW_PLUGINS=1")
    # commands that load a stored run
    for name in ("evaluate", "ensemble", "audit", "predict", "export", "cka", "attention"):
        sub.choices[name].add_argument(
            "--plugin", action="append", default=[], metavar="MODULE|FILE.py",
            help="import this trick plug-in first (repeatable); a stored run's own plug-in list is never imported")
    return parser


def _opt_in_plugins(args) -> None:
    """Plug-ins run only when the user says so on this command line (``--allow-plugins`` / ``--plugin``).
    The registry (it imports torch) is imported only then: ``weights list`` and ``--help`` stay light."""
    if getattr(args, "allow_plugins", False):
        from medtricks.tricks.registry import allow_plugins

        allow_plugins()  # also for the processes it starts: torchrun ranks, ablation workers, Ray
    if getattr(args, "plugin", None):
        from medtricks.tricks.registry import load_plugins

        load_plugins(args.plugin)


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
    command = [sys.executable, "-m", "medtricks.train.torchrun", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "medtricks", "run", args.recipe]
    for override in args.overrides:
        command += ["--set", override]
    if args.resume:
        command += ["--resume", args.resume]
    return command


def _under_torchrun() -> bool:
    # The environment check of medtricks.train.distributed.launched(), without importing torch for every command.
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _record_failure(**failure) -> bool:
    from medtricks.train.distributed import record_failure

    return record_failure(**failure)


def _launch_torchrun(args) -> int:
    if args.nproc < 1:
        print(f"medtricks run: error: --nproc {args.nproc}: expected 1 or more processes", file=sys.stderr)
        return 2
    if _under_torchrun():
        print("medtricks run: error: --nproc inside a torchrun launch; give the process count to torchrun or to "
              "--nproc, not both", file=sys.stderr)
        return 2
    process = subprocess.Popen(torchrun_command(args))
    try:
        return process.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C: let it stop its workers (epochs are checkpointed)
        process.wait()
        raise


def _cmd_data(args, parser) -> int:
    if args.data_command == "synth":
        from medtricks.data import synthesize_phantoms

        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
        path = synthesize_phantoms(args.out, n=args.n, classes=classes, size=args.size, fmt=args.format,
                                   seed=args.seed)
        print(f"wrote {args.n} phantom images and their manifest: {path}")
        return 0
    if args.data_command == "check":
        from medtricks.data.report import data_check

        check = data_check(args.card, args.root, split_seed=args.split_seed, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, test_by=args.test_by)
        print(check.text)
        if check.ok:
            return 0
        print(f"\nmedtricks data check: FAILED: {check.summary()}", flush=True)  # exit 1: CI can gate on it
        return 1
    parser.parse_args(["data", "--help"])
    return 2


def _cmd_gamma(args) -> int:
    from medtricks.gamma.bn import gamma_preview

    print(gamma_preview(args.model, weights=args.weights, strategy=args.strategy, stages=args.stages,
                        last_n_blocks=args.last_n_blocks, names=args.names, which=args.which,
                        in_chans=args.in_chans))
    return 0


def _cmd_evaluate(args) -> int:
    from medtricks.posthoc import evaluate_trained

    report = evaluate_trained(args.run, card=args.card, root=args.root, split=args.split, tta=args.tta,
                              threshold=args.threshold, prevalence=args.prevalence, site=args.site,
                              n_bootstrap=args.n_bootstrap, seed=args.seed, tracking_uri=args.tracking_uri,
                              log=not args.no_log, runs_dir=args.runs_dir, class_map=args.class_map,
                              on_bad_image=args.on_bad_image)
    # the table's own header adds the image count and the bootstrap (resamples, seed): said once
    title = (f"evaluation of {report.source_run or args.run} on {args.card} ({args.split}"
             f"{', flip TTA' if args.tta == 'flip' else ''})")
    print(report.table(title=title))
    return _report_outputs(report, report, args.save_predictions)


def _cmd_ensemble(args) -> int:
    from medtricks.posthoc.ensemble import ensemble_runs

    report = ensemble_runs(args.runs, card=args.card, root=args.root, split=args.split, tta=args.tta,
                           prevalence=args.prevalence, n_bootstrap=args.n_bootstrap, seed=args.seed,
                           tracking_uri=args.tracking_uri, log=not args.no_log)
    print(report.table())
    return _report_outputs(report, report.ensemble, args.save_predictions)


def _report_outputs(report, predictions, save_path) -> int:
    """Where an evaluation's predictions and its run in the run store went (evaluate, ensemble)."""
    if save_path:
        print(f"predictions: {predictions.save_predictions(save_path)}")
    if report.run_id:
        print(f"logged to {getattr(report, 'logged_to', None) or 'MLflow'}: run {report.run_id}")
    return 0


def _cmd_ablate(args) -> int:
    from medtricks.ablation.runner import ablation_settings, run_ablation
    from medtricks.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    tricks = [t.strip() for t in args.tricks.split(",") if t.strip()] if args.tricks else None
    result = run_ablation(recipe, **ablation_settings(recipe, tricks=tricks, seeds=args.seeds, mode=args.mode,
                                                      metric=args.metric, jobs=args.jobs, test=args.test,
                                                      executor=args.executor, address=args.address,
                                                      cpus_per_run=args.cpus_per_run,
                                                      gpus_per_run=args.gpus_per_run, retries=args.retries,
                                                      until_ci=args.until_ci, max_seeds=args.max_seeds,
                                                      seed_step=args.seed_step, boundary=args.boundary))
    return 1 if result.failed else 0  # run_ablation prints the table itself


def _cmd_self_train(args) -> int:
    from medtricks.recipe import load_recipe
    from medtricks.self_train import NoiseConfig, run_self_train

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    noise = NoiseConfig(drop_rate=args.drop_rate, drop_path_rate=args.drop_path_rate,
                        augment=None if args.augment == "keep" else args.augment, student=args.student)
    try:
        run_self_train(recipe, args.rounds, noise=noise, tracking_uri=args.tracking_uri)
    except KeyboardInterrupt:
        print("interrupted: finished rounds are kept and the round in progress is checkpointed at its last "
              "finished epoch; run the same command again to continue", file=sys.stderr)
        return 130
    return 0  # run_self_train prints the table itself


def _cmd_compare(args) -> int:
    from medtricks.ablation import compare_runs

    print(compare_runs(experiment=args.experiment, run_ids=args.runs, metric=args.metric, group_by=args.group_by,
                       tracking_uri=args.tracking_uri, runs_dir=args.runs_dir), end="")
    return 0


def _cmd_audit(args) -> int:
    from medtricks.posthoc import audit_trained

    report = audit_trained(args.run, card=args.card, root=args.root, split=args.split, attacks=args.attacks,
                           eps=args.eps, corruptions=args.corruptions, n=args.n, surrogate=args.surrogate,
                           target_class=args.target_class, tracking_uri=args.tracking_uri, log=not args.no_log,
                           runs_dir=args.runs_dir, shortcut=args.shortcut)
    print(report.table)
    if report.run_id:
        print(f"logged to {report.logged_to or 'MLflow'}: run {report.run_id}")
    return 0


def _cmd_cka(args) -> int:
    from medtricks.posthoc.representations import cka_trained

    if len(args.runs) > 2 or (args.vs_init and len(args.runs) != 1):
        print("medtricks cka: error: give RUN_A RUN_B, or RUN_A --vs-init", file=sys.stderr)
        return 2
    result = cka_trained(args.runs[0], None if args.vs_init else (args.runs[1] if len(args.runs) > 1 else None),
                         vs_init=args.vs_init, layers=args.layers, layers_b=args.layers_b,
                         granularity=args.granularity, card=args.card, root=args.root, split=args.split,
                         n=args.n, batch_size=args.batch_size, method=args.method, seed=args.seed, out_dir=args.out,
                         log=args.log, tracking_uri=args.tracking_uri, runs_dir=args.runs_dir, device=args.device)
    print(result.table())
    print("wrote " + ", ".join(str(p) for p in result.files))
    if result.run_id:
        print(f"logged to {result.logged_to}: run {result.run_id}")
    return 0


def _cmd_attention(args) -> int:
    from medtricks.posthoc.attention import attention_maps

    result = attention_maps(args.run, args.images, layers=args.layers, out_dir=args.out, log=args.log,
                            batch_size=args.batch_size, max_images=args.max_images, device=args.device,
                            tracking_uri=args.tracking_uri, runs_dir=args.runs_dir)
    print(result.table())
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s) that are not images (listed in attention.json)", file=sys.stderr)
    print(f"wrote {len(result.files)} file(s) into {args.out}")
    if result.run_id:
        print(f"logged to {result.logged_to}: run {result.run_id}")
    return 0


def _cmd_predict(args) -> int:
    from medtricks.posthoc.predict import check_outputs, predict_images, require_predictions, summary, write_predictions

    check_outputs(args.inputs, out=args.out, cam_dir=args.cam)  # before any work: never overwrite an input
    preds, bad = predict_images(args.run, args.inputs, threshold=args.threshold, batch_size=args.batch_size,
                                device=args.device, tracking_uri=args.tracking_uri, runs_dir=args.runs_dir,
                                cam_dir=args.cam, site=args.site)
    bad_path = write_predictions(preds, bad, args.out)
    print(summary(preds, bad, bad_path), file=sys.stderr)
    require_predictions(preds, bad, bad_path)  # all inputs bad: an error (the bad-file list is written)
    if args.out:
        print(f"predictions: {args.out}", file=sys.stderr)
    return 0


def _cmd_calibrate(args) -> int:
    from medtricks.deploy.calibrate import calibrate_site

    result = calibrate_site(args.run, card=args.card, root=args.root, name=args.name,
                            target_sensitivity=args.target_sensitivity, n_bootstrap=args.n_bootstrap,
                            folds=args.folds, seed=args.seed, min_per_class=args.min_per_class,
                            tracking_uri=args.tracking_uri, log=not args.no_log, runs_dir=args.runs_dir,
                            class_map=args.class_map)
    for text in result.warnings:
        print(f"warning: {text}", file=sys.stderr)
    print(result.profile.table())
    if result.path is not None:
        print(f"site profile: {result.path} (use: evaluate/predict --site {result.profile.name})")
    if result.logged_run:
        print(f"logged to {result.logged_to}: run {result.logged_run}")
    return 0


def _cmd_adapt(args) -> int:
    if args.method == "finetune":
        return _cmd_finetune(args)
    given = [flag for flag, value in (("--card", args.card), ("--freeze", args.freeze), ("--set", args.overrides))
             if value]
    if given:
        raise ConfigError(f"{', '.join(given)}: for --method finetune only (labelled site images); --method "
                          f"{args.method} adapts to unlabelled images")
    from medtricks.deploy.adapt import adapt_run

    result = adapt_run(args.run, root=args.root, method=args.method, name=args.name, steps=args.steps,
                       lr=1e-3 if args.lr is None else args.lr, batch_size=args.batch_size or 32, seed=args.seed,
                       n_bootstrap=200 if args.n_bootstrap is None else args.n_bootstrap, device=args.device,
                       tracking_uri=args.tracking_uri, log=not args.no_log, runs_dir=args.runs_dir,
                       output_dir=args.out_dir)
    print(result.summary())
    if result.logged_to and result.run_id:
        print(f"logged to {result.logged_to}: run {result.run_id}")
    return 0


def _cmd_finetune(args) -> int:
    if not args.card:
        raise ConfigError("--method finetune learns from labelled site images: name their data card with --card C "
                          "(its classes must be the run's), e.g. `medtricks adapt RUN --method finetune --card "
                          "kermany-pneumonia --root SITE`")
    from medtricks.deploy.finetune import finetune_run, parse_freeze

    result = finetune_run(args.run, card=args.card, root=args.root, folds=args.folds, epochs=args.epochs, lr=args.lr,
                          freeze=parse_freeze(args.freeze), overrides=args.overrides, seed=args.seed,
                          n_bootstrap=1000 if args.n_bootstrap is None else args.n_bootstrap,
                          batch_size=args.batch_size, output_dir=args.out_dir, tracking_uri=args.tracking_uri,
                          runs_dir=args.runs_dir, log=not args.no_log, device=args.device)
    for text in result.warnings:
        print(f"warning: {text}", file=sys.stderr)
    print(result.summary())
    return 0


def _cmd_export(args) -> int:
    from medtricks.posthoc.export import export_model

    result = export_model(args.run, args.fmt, args.out, opset=args.opset, runs_dir=args.runs_dir,
                          tracking_uri=args.tracking_uri)
    print(result.summary())
    return 0


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command != "run" and _under_torchrun():
        print(f"medtricks {args.command}: error: only `medtricks run` trains data-parallel under torchrun; run "
              f"`medtricks {args.command}` without torchrun", file=sys.stderr)
        return 2
    try:
        _opt_in_plugins(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "data":
            return _cmd_data(args, parser)
        if args.command == "gamma":
            return _cmd_gamma(args)
        if args.command == "weights":
            return _cmd_weights(args, parser)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "ensemble":
            return _cmd_ensemble(args)
        if args.command == "ablate":
            return _cmd_ablate(args)
        if args.command == "self-train":
            return _cmd_self_train(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "audit":
            return _cmd_audit(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "predict":
            return _cmd_predict(args)
        if args.command == "calibrate":
            return _cmd_calibrate(args)
        if args.command == "adapt":
            return _cmd_adapt(args)
        if args.command == "cka":
            return _cmd_cka(args)
        if args.command == "attention":
            return _cmd_attention(args)
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is checkpointed; continue with --resume auto",
              file=sys.stderr)
        return 130
    except MedtricksError as err:  # bad input a user can fix: one line; anything else is a bug (traceback)
        message = f"medtricks {args.command}: error: {err}"
        if not (_under_torchrun() and _record_failure(message=message)):  # --nproc: the launcher says it once
            print(message, file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: its traceback, from the --nproc launcher unless another process
        if _under_torchrun():  # stopped on a user-fixable error (this one then only lost its peer)
            import traceback

            if _record_failure(traceback_text=f"[rank {os.environ.get('RANK', '?')}] {traceback.format_exc()}"):
                return 1
        raise
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
