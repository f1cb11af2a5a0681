"""A trained run as an MLflow pyfunc model folder (``mlflow models serve -m <folder>`` answers it).

The folder holds the TorchScript file ``medtricks export`` writes (clamp, the run's normalization,
model, softmax), the run's ``info.json`` (classes, input size, channels, mean/std, stored operating
point) and the model code :mod:`medtricks.tracking.pyfunc_code` ("models from code": loading and
serving need mlflow, torch, numpy and pandas, not medtricks). Its signature is explicit:

- input: one tensor, float32, shape ``(-1, in_chans, S, S)``, values in [0, 1];
- output: ``prob_<class>`` (double) per class, ``predicted`` (string).

Only :func:`medtricks.tracking.save_mlflow_model` (and the MLflow run store) import this module.

Example::

    from medtricks.tracking.mlflow_model import save_pyfunc_model
    save_pyfunc_model("exports/pneumonia_mlflow", "model.pt", {"classes": ["normal", "pneumonia"],
                      "in_chans": 1, "image_size": 224, "threshold": 0.41, "positive_index": 1})
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from medtricks.errors import ConfigError

__all__ = ["save_pyfunc_model", "pyfunc_signature", "CODE_FILE", "REQUIRED_INFO"]

#: The model code MLflow copies into the folder and runs at load time.
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
#: Keys ``info`` must hold.
REQUIRED_INFO = ("classes", "in_chans", "image_size")


def pyfunc_signature(info: dict[str, Any]) -> ModelSignature:
    """The model's signature: a float32 ``(-1, in_chans, S, S)`` tensor in, ``prob_<class>`` and ``predicted`` out."""
    size, chans = int(info["image_size"]), int(info["in_chans"])
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, chans, size, size))])
    outputs = Schema([ColSpec("double", f"prob_{c}") for c in info["classes"]] + [ColSpec("string", "predicted")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _pin(version: str) -> str:
    """``2.14.1+cpu`` -> ``2.14.1``: a local build tag is not on the package index."""
    return re.split(r"[+]", version)[0]


@contextlib.contextmanager
def _without_type_hint_advice():
    """Drop MLflow's "add type hints to the predict method" advice. A warnings filter cannot: MLflow
    switches UserWarnings back on inside its own check (``filter_user_warnings_once``)."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "Add type hints to the `predict` method" not in str(message):
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def save_pyfunc_model(path: str | Path, torchscript_file: str | Path, info: dict[str, Any]) -> Path:
    """Write an MLflow pyfunc model folder at ``path`` (which must not exist, or be empty) from a
    TorchScript file (``medtricks export --format torchscript``'s contract) and the run's ``info``.

    Raises:
        ConfigError: ``info`` lacks a key of :data:`REQUIRED_INFO`, or ``path`` is a non-empty folder.
    """
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise ConfigError(f"MLflow model info lacks {missing} (needs {list(REQUIRED_INFO)})")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not an empty folder: an MLflow model needs a new folder")
    if path.is_dir():
        path.rmdir()  # mlflow.pyfunc.save_model refuses an existing folder
    requirements = [
        f"mlflow=={_pin(mlflow.__version__)}",
        f"torch=={_pin(torch.__version__)}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
    ]
    with tempfile.TemporaryDirectory(prefix="medtricks-mlflow-") as tmp:
        info_file = Path(tmp) / "info.json"
        info_file.write_text(json.dumps(info, indent=2))
        with warnings.catch_warnings(), _without_type_hint_advice():  # the signature is explicit
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                str(path),
                python_model=str(CODE_FILE),
                artifacts={"torchscript": str(torchscript_file), "info": str(info_file)},
                signature=pyfunc_signature(info),
                pip_requirements=requirements,
            )
    return path
