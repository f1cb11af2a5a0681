"""Issue 31, items 13-17: errors that came late or wrong now come first, in one line.

13 seeds out of range and devices this machine lacks fail at validation (before a run folder);
14 unknown or unreachable tracking URIs fail in seconds, before a run folder; 15 a Ray address that
does not answer times out with a message; 16 a refused ``run --nproc`` says so once; 17 advice that can
be followed (cka, evaluate), bad YAML, ``evaluate --threshold youden``, ``--class-map ",,,"`` and a
truncated DICOM.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from medtricks.cli import main
from medtricks.errors import ConfigError
from medtricks.recipe import RecipeError, load_recipe
from medtricks.tracking import TrackingUnavailableError, check_store

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
TINY = [
    "data.synth.n=48",
    "data.synth.size=32",
    "data.image_size=32",
    "model.name=resnet18",
    "model.weights=none",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.n_bootstrap=0",
    "train.progress=false",
    "eval.plots=false",
    "tracking.log_model=false",
]


def _sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def _run_tiny(tmp_path, *overrides):
    return main(
        [
            "run",
            QUICKSTART,
            *_sets(
                *TINY, f"data.root={tmp_path / 'phantoms'}", f"experiment.output_dir={tmp_path / 'runs'}", *overrides
            ),
        ]
    )


def _one_line_error(capsys, command="run") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"medtricks {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- item 13: seeds and devices
@pytest.mark.parametrize(
    "key,value",
    [
        ("experiment.seed", -1),
        ("experiment.seed", 2**32),
        ("experiment.seed", 10**30),
        ("data.split_seed", -1),
        ("data.synth.seed", 2**40),
        ("ablation.seeds", [0, -3]),
    ],
)
def test_a_seed_out_of_range_fails_the_dry_run(capsys, key, value):
    assert main(["run", QUICKSTART, "--set", f"{key}={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err
        and key in err
        and ("2**32" in err or str(2**32) in err or ">= 0" in err or "greater than or equal to 0" in err)
    )


def test_the_largest_seed_is_accepted():
    recipe = load_recipe(QUICKSTART, overrides=[f"experiment.seed={2**32 - 1}", f"data.split_seed={2**32 - 1}"])
    assert recipe.experiment.seed == 2**32 - 1
    from medtricks.ablation.runner import _resolve_seeds

    with pytest.raises(ConfigError, match="2\\*\\*32"):
        _resolve_seeds(3, 2**32 - 2)  # the children's seeds would pass the limit


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_device_cuda_without_cuda_fails_before_a_run_folder(tmp_path, capsys):
    assert _run_tiny(tmp_path, "train.device=cuda", "tracking.backend=none") == 2
    line = _one_line_error(capsys)
    assert "'cuda'" in line and "CUDA is not available" in line
    assert not (tmp_path / "runs").exists()


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    from medtricks.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:7")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")


def test_predict_on_a_missing_gpu_is_one_line(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(tmp_path / "no-run"), str(image), "--device", "cuda:99"]) == 2
    assert "cuda:99" in _one_line_error(capsys, "predict")


# ---- item 14: tracking URIs
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


class _Silent:
    """A TCP port that takes connections and never answers (a firewall, a hung server)."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_an_unknown_scheme_lists_the_supported_ones_before_a_run_folder(tmp_path, capsys):
    assert _run_tiny(tmp_path, "tracking.uri=bogus://x") == 2
    line = _one_line_error(capsys)
    assert "'bogus://'" in line and "postgresql://" in line and "sqlite:///" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "phantoms").exists()


def test_an_unreachable_database_fails_in_seconds_before_a_run_folder(tmp_path, capsys):
    started = time.monotonic()
    assert _run_tiny(tmp_path, f"tracking.uri=postgresql://me:s3cret@127.0.0.1:{_closed_port()}/mlflow") == 2
    line = _one_line_error(capsys)
    assert "not reachable" in line and "s3cret" not in line and "tracking.backend=none" in line
    assert time.monotonic() - started < 60  # MLflow alone retried for about two minutes
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("scheme", ["postgresql", "http"])
def test_a_server_that_never_answers_times_out(scheme):
    with _Silent() as port:
        started = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match="not reachable"):
            check_store(
                "mlflow",
                f"{scheme}://me@127.0.0.1:{port}/db" if scheme == "postgresql" else f"http://127.0.0.1:{port}",
                timeout=1.0,
            )
        assert time.monotonic() - started < 10


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 404

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,ok", [(200, True), (404, True), (503, False)])
def test_an_http_server_must_answer_below_500(status, ok):
    handler = type("Handler", (_Answer,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if ok:
            check_store("mlflow", uri, timeout=2.0)
        else:
            with pytest.raises(TrackingUnavailableError, match="HTTP 503"):
                check_store("mlflow", uri, timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()


def test_local_stores_and_the_local_backend_pass_unchecked(tmp_path):
    check_store("none", "bogus://x")  # tracking.backend: none never reads the URI
    check_store("mlflow", f"sqlite:///{tmp_path / 'x.db'}")
    check_store("mlflow", str(tmp_path / "mlruns"))
    assert not (tmp_path / "x.db").exists()


def test_reading_from_an_unknown_scheme_is_one_line(capsys):
    assert main(["compare", "--experiment", "e", "--tracking-uri", "bogus://x"]) == 2
    assert "unknown scheme" in _one_line_error(capsys, "compare")


# ---- item 15: Ray addresses
def _ablate(tmp_path, *args):
    return main(
        [
            "ablate",
            QUICKSTART,
            "--tricks",
            "mixup=0.2",
            "--seeds",
            "1",
            "--executor",
            "ray",
            *args,
            *_sets(f"experiment.output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'phantoms'}"),
        ]
    )


@pytest.mark.parametrize(
    "address,message", [("127.0.0.1:{closed}", "Connection refused"), ("garbage::::", "address must be 'auto'")]
)
def test_a_ray_address_that_cannot_be_joined_is_one_line_before_the_parent_run(tmp_path, capsys, address, message):
    pytest.importorskip("ray")
    started = time.monotonic()
    assert _ablate(tmp_path, "--address", address.format(closed=_closed_port())) == 2
    assert message in _one_line_error(capsys, "ablate")
    assert time.monotonic() - started < 60 and not (tmp_path / "runs").exists()


def test_a_ray_client_address_without_ray_client_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray")
    import importlib.util

    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("ray[client] is installed here")
    assert _ablate(tmp_path, "--address", "ray://127.0.0.1:10001") == 2
    assert "pip install 'ray[client]'" in _one_line_error(capsys, "ablate")


def test_a_ray_port_that_never_answers_or_is_not_ray_times_out():
    pytest.importorskip("ray")
    from medtricks.ablation.executors import ExecutorSettings

    with _Silent() as port:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="no answer within 1 s"):
            ExecutorSettings(name="ray", address=f"127.0.0.1:{port}").check_reachable(timeout=1.0)
        assert time.monotonic() - started < 5
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match="not as a Ray server"):
            ExecutorSettings(name="ray", address=f"127.0.0.1:{server.server_address[1]}").check_reachable(2.0)
    finally:
        server.shutdown()
        server.server_close()


# ---- item 16: run --nproc says a refusal once
def test_the_nproc_launcher_says_a_refusal_of_every_process_once(monkeypatch, capsys):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from medtricks.train import distributed

    message = "medtricks run: error: train.batch_size=16 is larger than the training split (41 images / 3 processes)"

    def three_processes_refuse(args):
        for rank in range(3):  # what each process's `medtricks run` does on a MedtricksError under the launcher
            monkeypatch.setenv("WORLD_SIZE", "3")
            monkeypatch.setenv("RANK", str(rank))
            assert distributed.record_failure(message=message)
        monkeypatch.delenv("WORLD_SIZE")
        raise ChildFailedError("medtricks", {0: ProcessFailure(0, 1, 2, "<N/A>")})

    monkeypatch.setattr(torchrun, "run", three_processes_refuse)
    assert distributed.launch(["--standalone", "--nproc-per-node", "3", "-m", "medtricks", "run", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count(message) == 1 and "Traceback" not in err and "ChildFailedError" not in err


def test_a_process_under_the_launcher_leaves_its_error_and_prints_nothing(tmp_path, monkeypatch, capsys):
    from medtricks.train.distributed import RANK_ERRORS_ENV

    monkeypatch.setenv(RANK_ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert main(["run", QUICKSTART, "--set", "experiment.seed=-1"]) == 2
    assert capsys.readouterr().err == ""
    assert "experiment.seed" in (tmp_path / "rank2.json").read_text()


@pytest.mark.slow
def test_run_nproc_3_with_a_too_large_batch_prints_one_message(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtricks",
            "run",
            QUICKSTART,
            "--nproc",
            "3",
            *_sets(
                *TINY,
                "tracking.backend=none",
                f"data.root={tmp_path / 'phantoms'}",
                f"experiment.output_dir={tmp_path / 'runs'}",
            ),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("train.batch_size=16 is larger") == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) < 10, out.stderr


# ---- item 17: advice that can be followed
def test_non_utf8_and_deeply_nested_recipes_are_one_line_naming_the_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("experiment:\n  name: café\n".encode("latin-1"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("experiment: " + "[" * 10000 + "]" * 10000 + "\n")
    for path, words in ((latin1, "not UTF-8"), (deep, "nested deeper than")):
        with pytest.raises(RecipeError, match=words) as err:
            load_recipe(path)
        assert str(path) in str(err.value)
        assert main(["run", str(path), "--dry-run"]) == 2
        assert words in _one_line_error(capsys)


def test_a_data_card_that_is_not_utf8_is_a_card_error(tmp_path):
    from medtricks.data.cards import load_card
    from medtricks.errors import MedtricksError

    card = tmp_path / "card.yaml"
    card.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(MedtricksError, match="not UTF-8"):
        load_card(str(card))


@pytest.mark.parametrize("text", [",,,", "", " , ", "covid=pneumonia,,normal=normal"])
def test_a_class_map_without_entries_is_refused(text):
    from medtricks.data.class_map import parse_class_map

    with pytest.raises(ConfigError, match="--class-map"):
        parse_class_map(text)
    assert parse_class_map(None) == {}


def test_a_truncated_dicom_is_called_truncated(tmp_path):
    from medtricks.data.errors import BadImageError
    from medtricks.data.readers import read_image

    from test_data_readers import ramp, write_dicom

    whole = write_dicom(tmp_path / "whole.dcm", ramp(64, 64)).read_bytes()
    for cut in (200, 400, len(whole) // 2, len(whole) - 10):  # in the file meta, the header, the pixels
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(whole[:cut])
        with pytest.raises(BadImageError, match="truncated or corrupt"):
            read_image(path)
    with pytest.raises(BadImageError, match="no PixelData element\\): not an image"):  # whole, but no pixels
        read_image(write_dicom(tmp_path / "nopix.dcm", ramp(), pixel_data=False))


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """A tiny finished binary run (tracking none) and a folder of its data to evaluate on."""
    from conftest import binary_phantom_card
    from medtricks.data import synthesize_phantoms
    from medtricks.run import run_recipe

    tmp = tmp_path_factory.mktemp("binary")
    synthesize_phantoms(tmp / "phantoms", n=64, classes=("normal", "pneumonia"), size=32, seed=0)
    card = binary_phantom_card(tmp)
    recipe = load_recipe(
        QUICKSTART,
        overrides=[
            *TINY,
            "data.synth=null",
            "data.val_fraction=0.25",
            "train.epochs=1",
            "schedule.warmup_epochs=0",
            f"data.card={card}",
            f"data.root={tmp / 'phantoms'}",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    return result, tmp, card


def _evaluate(run, card, root, *extra):
    return main(
        [
            "evaluate",
            str(run.run_dir),
            "--card",
            str(card),
            "--root",
            str(root),
            "--no-log",
            "--n-bootstrap",
            "0",
            *extra,
        ]
    )


@pytest.mark.slow
def test_evaluate_takes_the_threshold_forms_predict_takes(binary_run, capsys):
    result, tmp, card = binary_run
    for spec in ("youden", "sens=0.9", "0.3"):
        assert _evaluate(result, card, tmp / "phantoms", "--threshold", spec) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert ("Youden" in out or "youden" in out) if spec == "youden" else True
    assert _evaluate(result, card, tmp / "phantoms", "--threshold", "sens=2") == 2
    assert "target sensitivity" in _one_line_error(capsys, "evaluate")
    assert _evaluate(result, card, tmp / "phantoms", "--class-map", ",,,") == 2
    assert "maps no class" in _one_line_error(capsys, "evaluate")


@pytest.mark.slow
def test_evaluate_on_a_corrupt_image_offers_its_own_option(binary_run, capsys):
    import shutil

    result, tmp, card = binary_run
    root = tmp / "corrupt"
    if not root.exists():
        shutil.copytree(tmp / "phantoms", root)
        victim = sorted((root / "images").glob("*.png"))[0]
        victim.write_bytes(victim.read_bytes()[:100])
    assert _evaluate(result, card, root) == 2
    err = capsys.readouterr().err
    assert "--on-bad-image skip" in err and "data.on_bad_image" not in err and "Traceback" not in err
    assert _evaluate(result, card, root, "--on-bad-image", "skip") == 0
    assert "skipped 1 unusable" in capsys.readouterr().out


@pytest.mark.slow
def test_cka_reads_a_card_with_other_classes_without_a_class_map(binary_run, tmp_path, capsys):
    from medtricks.data import synthesize_phantoms

    result, tmp, _ = binary_run
    synthesize_phantoms(tmp_path / "three", n=12, size=32, seed=3)  # normal / bacterial / covid
    assert (
        main(
            [
                "cka",
                str(result.run_dir),
                "--vs-init",
                "--card",
                "synthetic-phantoms",
                "--root",
                str(tmp_path / "three"),
                "--n",
                "8",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "cka"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (tmp_path / "cka" / "cka_vs_init.json").is_file()


@pytest.mark.slow
def test_commands_without_a_class_map_do_not_advise_one(binary_run, tmp_path):
    from medtricks.data import synthesize_phantoms
    from medtricks.posthoc import eval_dataset
    from medtricks.posthoc.load import load_trained

    result, _, _ = binary_run
    synthesize_phantoms(tmp_path / "three", n=12, size=32, seed=3)
    trained = load_trained(str(result.run_dir))
    with pytest.raises(ConfigError, match="--class-map CARD_CLASS=MODEL_CLASS"):  # evaluate: its own option
        eval_dataset(trained, "synthetic-phantoms", tmp_path / "three", progress=False)
    with pytest.raises(ConfigError, match="model's classes only") as err:  # audit, ensemble: none
        eval_dataset(trained, "synthetic-phantoms", tmp_path / "three", progress=False, class_map_option=None)
    assert "map them with" not in str(err.value)


@pytest.mark.parametrize(
    "command", [["ablate", "--tricks", "mixup=0.2", "--seeds", "1"], ["self-train", "--set", "data.label_fraction=0.5"]]
)
def test_ablate_and_self_train_check_the_tracking_uri_before_their_folder(tmp_path, capsys, command):
    name, *rest = command
    assert (
        main(
            [
                name,
                QUICKSTART,
                *rest,
                *_sets(
                    f"experiment.output_dir={tmp_path / 'runs'}",
                    f"data.root={tmp_path / 'phantoms'}",
                    "tracking.uri=bogus://x",
                ),
            ]
        )
        == 2
    )
    assert "unknown scheme" in _one_line_error(capsys, name)
    assert not (tmp_path / "runs").exists()
