"""The MLflow model flavour (issue 21, item 3): a run tracked in MLflow logs a pyfunc model under
``mlflow_model/`` that loads with ``runs:/<id>/mlflow_model`` and answers ``mlflow models serve``."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from medtricks.cli import main
from medtricks.data import build_eval_dataset, synthesize_phantoms
from medtricks.errors import ConfigError
from medtricks.posthoc.export import export_model
from medtricks.posthoc import load_operating_point
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe
from medtricks.posthoc.load import load_trained


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlflow_run(binary_phantom_card, fresh_sqlite_uri, tmp_path_factory):
    """A tiny binary run tracked in MLflow (sqlite), with a stored operating point."""
    tmp = tmp_path_factory.mktemp("mlflow_model")
    uri = fresh_sqlite_uri(tmp)
    synthesize_phantoms(tmp / "data", n=64, classes=("normal", "pneumonia"), size=40, seed=0)
    card = binary_phantom_card(tmp)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            f"data.card={card}",
            "data.synth=null",
            f"data.root={tmp / 'data'}",
            "data.image_size=32",
            "data.val_fraction=0.25",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=mlflow",
            f"tracking.uri={uri}",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    return result, uri, tmp


def _val_images(tmp: Path, trained) -> np.ndarray:
    """The run's validation images through the eval transform, before normalization: [0, 1]."""
    recipe = trained.recipe
    dataset, _ = build_eval_dataset(
        recipe.data.card,
        tmp / "data",
        split="val",
        split_seed=recipe.data.split_seed,
        val_fraction=recipe.data.val_fraction,
        test_fraction=recipe.data.test_fraction,
        image_size=32,
        mean=(0.0,),
        std=(1.0,),
        in_chans=recipe.model.in_chans,
        augment=recipe.data.augment,
        progress=False,
    )
    return np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float32)


def _torch_probs(trained, images: np.ndarray) -> np.ndarray:
    """medtricks' torch eval pipeline: normalize with the run's mean/std, model, softmax."""
    mean, std = np.float32(trained.data_config["mean"][0]), np.float32(trained.data_config["std"][0])
    with torch.no_grad():
        return torch.softmax(trained.model(torch.from_numpy((images - mean) / std)), 1).numpy()


def _expected_labels(trained, probs: np.ndarray) -> list[str]:
    op = load_operating_point(trained.run_dir)
    assert op is not None, "the binary run stores an operating point"
    return [trained.classes[1] if p >= op.threshold else trained.classes[0] for p in probs[:, op.positive_index]]


def test_logged_model_loads_from_runs_uri_and_matches_torch(mlflow_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    result, uri, tmp = mlflow_run
    client = MlflowClient(uri)
    listed = {a.path for a in client.list_artifacts(result.run_id, "mlflow_model")}
    assert {"mlflow_model/MLmodel", "mlflow_model/MODEL_CARD.md", "mlflow_model/pyfunc_code.py"} <= listed
    assert {a.path for a in client.list_artifacts(result.run_id, "model")} >= {"model/model_state.pt"}  # kept
    assert client.get_run(result.run_id).data.tags["medtricks.mlflow_model"].startswith("mlflow_model (parity")

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/mlflow_model")
    signature = model.metadata.signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 1, 32, 32)}}
    ]
    assert signature.outputs.input_names() == ["prob_normal", "prob_pneumonia", "predicted"]

    trained = load_trained(str(result.run_dir))
    images = _val_images(tmp, trained)
    reference = _torch_probs(trained, images)
    out = model.predict(images)
    probs = out[["prob_normal", "prob_pneumonia"]].to_numpy()
    assert probs.shape == reference.shape == (len(images), 2)
    assert np.abs(probs - reference).max() < 1e-4
    assert list(out["predicted"]) == _expected_labels(trained, reference)
    # one image alone; a wrong image size is refused, naming the expected shape
    assert np.abs(model.predict(images[:1])[["prob_normal", "prob_pneumonia"]].to_numpy() - reference[:1]).max() < 1e-4
    wrong = np.zeros((1, 1, 16, 16), dtype=np.float32)
    with pytest.raises(Exception, match="shape"):
        model.predict(wrong)


def test_local_store_runs_keep_no_mlflow_model(tmp_path):
    from medtricks.tracking import LocalStore, NullStore
    from medtricks.tracking.mlflow_store import MlflowStore

    assert not LocalStore(tmp_path).logs_models and not NullStore().logs_models and MlflowStore.logs_models
    assert NullStore().log_model(tmp_path, "mlflow_model") is False


def test_export_format_mlflow_writes_a_servable_folder(mlflow_run, tmp_path, capsys, recwarn):
    import mlflow

    result, uri, tmp = mlflow_run
    out = tmp_path / "served"
    assert main(["export", str(result.run_dir), "--format", "mlflow", "--out", str(out)]) == 0
    # MLflow's colour-coded "add type hints" advice is noise in a run: the signature is explicit
    assert not [w for w in recwarn if "type hints" in str(w.message)]
    printed = capsys.readouterr().out
    assert "exported mlflow model" in printed and "parity: max |delta prob|" in printed
    assert (out / "MLmodel").is_file() and not (tmp_path / "served.tmp").exists()
    info = json.loads(next(out.rglob("info.json")).read_text())
    assert info["classes"] == ["normal", "pneumonia"] and info["image_size"] == 32 and info["in_chans"] == 1
    assert info["threshold"] == pytest.approx(load_operating_point(result.run_dir).threshold)
    card = (out / "MODEL_CARD.md").read_text()
    assert "MLflow pyfunc model" in card and "(N, 1, 32, 32)" in card and "probs[:, 1] >=" in card

    trained = load_trained(str(result.run_dir))
    images = _val_images(tmp, trained)[:5]
    got = mlflow.pyfunc.load_model(str(out)).predict(images)
    assert np.abs(got[["prob_normal", "prob_pneumonia"]].to_numpy() - _torch_probs(trained, images)).max() < 1e-4

    with pytest.raises(ConfigError, match="not an empty folder"):  # never writes into a used folder
        export_model(str(result.run_dir), "mlflow", out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers(mlflow_run, tmp_path):
    """`mlflow models serve -m runs:/<id>/mlflow_model` on loopback answers /invocations like torch."""
    result, uri, tmp = mlflow_run
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_cli = [sys.executable, "-m", "mlflow"]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [
            *mlflow_cli,
            "models",
            "serve",
            "-m",
            f"runs:/{result.run_id}/mlflow_model",
            "--env-manager",
            "local",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert server.poll() is None, f"the scoring server exited: {(tmp_path / 'serve.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the scoring server did not answer /ping within 120 s"
            time.sleep(1)
        trained = load_trained(str(result.run_dir))
        images = _val_images(tmp, trained)[:4]
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
        rows = answer["predictions"]
        assert len(rows) == 4
        probs = np.array([[row["prob_normal"], row["prob_pneumonia"]] for row in rows])
        reference = _torch_probs(trained, images)
        assert np.abs(probs - reference).max() < 1e-4
        assert [row["predicted"] for row in rows] == _expected_labels(trained, reference)
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=10)
        log.close()
