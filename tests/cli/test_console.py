"""Console and MLflow UI (issue 21): epoch lines, the bar, the end-of-run hint, table headers, tags, CLI help."""

from __future__ import annotations

import pytest
import torch

from medtricks.recipe import load_recipe
from medtricks.tricks.settings import MixedPrecision


# ------------------------------------------------------------------------------- 5: amp tag
@pytest.mark.parametrize(
    "cuda, amp, device, expected",
    [
        (False, "auto", "auto", []),
        (True, "auto", "auto", ["amp=auto"]),
        (True, "auto", "cpu", []),
        (False, "bf16", "auto", ["amp=bf16"]),
        (False, "none", "auto", []),
    ],
)
def test_amp_tag_reports_what_resolves(monkeypatch, cuda, amp, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    recipe = load_recipe("quickstart", overrides=[f"train.amp={amp}", f"train.device={device}"])
    assert MixedPrecision.tags(recipe) == expected
    assert ("amp=auto" in recipe.tricks_on()) == (expected == ["amp=auto"])


# ------------------------------------------------------------------ 4: the bootstrap said once
def _metrics(seed=0, n_bootstrap=50):
    import numpy as np

    from medtricks.evaluate import compute_metrics

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p1 = np.clip(y * 0.6 + rng.random(40) * 0.4, 0, 1)
    return compute_metrics(y, np.stack([1 - p1, p1], 1), ["normal", "pneumonia"], n_bootstrap=n_bootstrap, seed=seed)


def test_metrics_table_header_says_the_bootstrap_once():
    head = _metrics(seed=7).table(title="evaluation of r on card (all)").splitlines()[0]
    assert head == "evaluation of r on card (all)  (n=40 images, percentile bootstrap, 50 resamples, seed 7)"
    assert _metrics(n_bootstrap=0).table().splitlines()[0] == "(n=40 images, no bootstrap)"


def test_final_report_says_the_bootstrap_once():
    from types import SimpleNamespace

    from medtricks.evaluate.split_table import split_table
    from medtricks.run.finish import final_report as _final_report

    val, test = _metrics(), _metrics(seed=1)
    assert "percentile-bootstrap" not in split_table({"val": val, "test": test}, ci_note=False)
    assert (
        split_table({"val": val}).splitlines()[-1] == "[95% percentile-bootstrap CIs over images, 50 resamples, seed 0]"
    )
    recipe = load_recipe("quickstart")
    op = SimpleNamespace(describe=lambda: "threshold 0.4 (youden on val)")
    text = _final_report(recipe, 3, ["normal", "pneumonia"], {"val": val, "test": test}, {"val": val, "test": test}, op)
    assert text.count("bootstrap") == 1 and text.count("resamples") == 1
    assert text.rstrip().endswith("50 resamples, seed 0]")


def test_evaluate_tables_say_the_bootstrap_once(capsys):
    import numpy as np

    from medtricks.posthoc import DecisionRule, summarize_predictions

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p1 = np.clip(y * 0.6 + rng.random(40) * 0.4, 0, 1)
    rule = DecisionRule(threshold=0.4, source="given", description="threshold 0.4 (given)")
    report = summarize_predictions(
        y, np.stack([1 - p1, p1], 1), ["normal", "pneumonia"], rule=rule, n_bootstrap=50, seed=3, figures=False
    )
    print(report.table(title="evaluation of r on card (all)"))
    out = capsys.readouterr().out
    assert out.count("bootstrap") == 1 and out.count("resamples") == 1 and out.count("seed 3") == 1
    assert (
        "evaluation of r on card (all) — threshold 0.5 (argmax)  (n=40 images, percentile bootstrap, "
        "50 resamples, seed 3)" in out
    )
    assert "at the operating point: threshold 0.4 (given)  (n=40 images, CIs as above)" in out


# ------------------------------------------------------------ 1: one line per epoch that stays
def test_epoch_line_format():
    from medtricks.console import epoch_line

    line = epoch_line(
        {
            "epoch": 3.0,
            "train/epoch_loss": 0.75463,
            "val/loss": 0.52,
            "val/auroc": float("nan"),
            "val/accuracy": 0.93,
            "val/f1": 0.5,
            "train/img_per_s": 27.14,
        },
        epochs=8,
        lr=0.0281,
        seconds=12.34,
        best_metric="val/f1",
    )
    assert line == (
        "epoch 3/8  train_loss 0.7546  val_loss 0.5200  val_auroc nan  val_accuracy 0.930  "
        "val_f1 0.500  lr 2.81e-02  27.1 img/s  12.3 s"
    )


def test_epoch_reporter_logs_then_says_through_tqdm_write(capsys):
    from medtricks.console import epoch_reporter, say

    logged = []
    on_epoch = epoch_reporter(lambda step, m: logged.append((step, m)), say, epochs=2, lr=lambda: 0.1)
    on_epoch(5, {"epoch": 1.0, "train/epoch_loss": 0.5})
    assert logged == [(5, {"epoch": 1.0, "train/epoch_loss": 0.5})]
    out = capsys.readouterr().out
    assert out.startswith("epoch 1/2  train_loss 0.5000  lr 1.00e-01  ") and out.endswith(" s\n")
    quiet = epoch_reporter(lambda step, m: logged.append(step), lambda *a: None, epochs=2)
    quiet(6, {"epoch": 2.0})
    assert logged[-1] == 6 and capsys.readouterr().out == ""


# ------------------------------------------------------- 2: the bar's postfix, every batch
class _RecordingBar:
    made: list = []

    def __init__(self, *args, **kwargs):
        self.kwargs, self.postfixes, self.updates = kwargs, [], 0
        _RecordingBar.made.append(self)

    def set_postfix(self, refresh=True, **values):
        assert refresh is False
        self.postfixes.append(values)

    def update(self, n=1):
        self.updates += n

    def close(self):
        pass


def test_bar_postfix_is_refreshed_every_batch(tmp_path, monkeypatch):
    import tqdm.auto
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from medtricks.train import EngineConfig, fit
    from medtricks.train.param_groups import build_optimizer, build_param_groups
    from medtricks.train.schedules import build_scheduler

    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _RecordingBar.made = []
    torch.manual_seed(0)
    x, y = torch.randn(36, 1, 4, 4), torch.arange(36) % 2
    train = DataLoader(TensorDataset(x, y), batch_size=4)  # 9 batches, fewer than log_every
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    opt = build_optimizer(build_param_groups(model, weight_decay=0.0), name="sgd", lr=0.01)
    sched = build_scheduler(opt, name="cosine", epochs=1, steps_per_epoch=len(train), warmup_epochs=0)
    cfg = EngineConfig(
        epochs=1, device=torch.device("cpu"), best_metric="val/loss", best_mode="min", log_every=10, progress=True
    )
    fit(
        model,
        train,
        train,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        evaluate_fn=lambda m: {"val/loss": 1.0},
        checkpoint_dir=tmp_path,
    )
    (bar,) = _RecordingBar.made
    assert bar.kwargs["leave"] is False and bar.updates == 9
    assert len(bar.postfixes) == 9 and len({p["loss"] for p in bar.postfixes}) > 1


# ------------------------------------------- 1 + 3: a tiny run's epoch lines and where to look
TINY = [
    "data.synth.n=48",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=20",
    "train.progress=false",
    "schedule.warmup_epochs=0.5",
    "audit.enabled=false",
    "eval.plots=false",
]


def _tiny(tmp_path, *extra):
    return load_recipe(
        "quickstart",
        overrides=[*TINY, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}", *extra],
    )


def test_where_to_look_lines():
    from medtricks.console import where_to_look

    assert where_to_look("abc", "runs/q/1", experiment="q", mlflow_uri="sqlite:///mlflow.db").splitlines() == [
        "run abc finished: runs/q/1",
        "look at it: MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri sqlite:///mlflow.db   "
        "# then http://127.0.0.1:5000, experiment q",
    ]
    assert where_to_look("abc", "r", experiment="q", mlflow_uri="http://mlflow:5000").endswith(
        "open http://mlflow:5000 (experiment q)"
    )
    assert where_to_look("abc", "r", experiment="q", runs_dir="runs").endswith(
        "medtricks compare --runs-dir runs --experiment q"
    )


def test_tiny_run_prints_epoch_lines_and_where_to_look(tmp_path, capsys):
    from medtricks.run import run_recipe

    result = run_recipe(_tiny(tmp_path, "tracking.backend=none"))
    out = capsys.readouterr().out.splitlines()
    epochs = [line for line in out if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(" val_auroc " in line and " lr " in line and line.endswith(" s") for line in epochs)
    assert out[-2] == f"run {result.run_id} finished: {result.run_dir}"
    assert out[-1] == f"look at it: medtricks compare --runs-dir {tmp_path / 'runs'} --experiment quickstart"
    assert sum("bootstrap" in line for line in out) == 1

    run_recipe(_tiny(tmp_path, "tracking.backend=none"), quiet=True)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------- 6: CLI help, weights
def _subparser(name):
    import argparse

    from medtricks.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["gamma", "evaluate"])
def test_every_option_has_help(command):
    missing = [a.option_strings[0] for a in _subparser(command)._actions if a.option_strings and not a.help]
    assert missing == []


def test_evaluate_help_example_parses_and_uses_a_card_of_the_quickstart():
    import shlex

    from medtricks.cli import build_parser

    epilog = _subparser("evaluate").epilog
    commands = [line.split("#")[0].split()[1:] for line in epilog.splitlines() if line.startswith("  medtricks ")]
    assert [c[0] for c in commands] == ["run", "data", "evaluate"]
    for argv in commands:
        build_parser().parse_args([a.replace("<id>", "20260101-000000-000000") for a in argv])
    assert load_recipe("quickstart").data.card == commands[2][commands[2].index("--card") + 1]
    synth = build_parser().parse_args(commands[1])
    assert synth.seed != 0 and synth.size == load_recipe("quickstart").data.image_size
    assert shlex.split(" ".join(commands[2]))[-1] == synth.out


def test_weights_list_imports_neither_torch_nor_timm():
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from medtricks.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    main(['weights', 'list'])\n"
        "print('torch' in sys.modules, 'timm' in sys.modules, 'seresnet50' in out.getvalue())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


def test_listed_timm_weights_match_the_installed_timm():
    from medtricks.models.weights import LISTED_TIMM_ARCHS, _listed_timm_entry, _torch_hub_dir, timm_imagenet_entry
    import torch.hub

    assert [_listed_timm_entry(a) for a in LISTED_TIMM_ARCHS] == [timm_imagenet_entry(a) for a in LISTED_TIMM_ARCHS]
    assert str(_torch_hub_dir()) == torch.hub.get_dir()


# -------------------------------------------------- 7: experiment kind, role tags on post-hoc runs
def test_experiments_open_on_the_runs_table(mlflow_uri):
    from mlflow.tracking import MlflowClient

    from medtricks.tracking.mlflow_store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowStore

    client = MlflowClient(mlflow_uri)
    client.create_experiment("old")  # made before this change: no kind
    client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("new", "old", "genai"):
        store = MlflowStore(mlflow_uri)
        store.start(experiment=name, run_name="r", tags={})
        store.end()
    kinds = {n: client.get_experiment_by_name(n).tags.get(EXPERIMENT_KIND_TAG) for n in ("new", "old", "genai")}
    assert kinds == {"new": EXPERIMENT_KIND, "old": EXPERIMENT_KIND, "genai": "genai_development"}


def test_posthoc_runs_carry_a_role_that_one_filter_hides(mlflow_uri, tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from mlflow.tracking import MlflowClient

    from medtricks.posthoc import log_evaluation
    from medtricks.tracking.mlflow_store import MlflowStore

    def save(path):
        np.savez_compressed(path, y_true=np.zeros(2), probs=np.zeros((2, 2)))
        return path

    report = SimpleNamespace(
        rule=None,
        metrics=SimpleNamespace(ci_level=0.95),
        n_images=2,
        image_set="x",
        figures={},
        to_metrics=lambda: {"eval/auroc": 0.5},
        save_predictions=save,
    )
    training = MlflowStore(mlflow_uri)
    train_id = training.start(experiment="q", run_name="train", tags={})
    training.end()
    for kind in ("evaluation", "ensemble"):
        log_evaluation(report, uri=mlflow_uri, experiment="q", run_name=kind, tags={"medtricks.kind": kind}, params={})
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("q").experiment_id
    roles = {r.info.run_name: r.data.tags.get("medtricks.role") for r in client.search_runs([exp])}
    assert roles == {"train": None, "evaluation": "evaluation", "ensemble": "ensemble"}
    shown = client.search_runs([exp], filter_string="tags.`medtricks.role` IS NULL")
    assert [r.info.run_id for r in shown] == [train_id]
