"""The code of medtricks' MLflow pyfunc models ("models from code"): copied into every model folder.

MLflow runs this file when it loads the model (``mlflow.pyfunc.load_model``, ``mlflow models
serve``), so it imports only mlflow, numpy, pandas and torch -- never medtricks: a served model
needs no medtricks install. It wraps the TorchScript file ``medtricks export`` writes
(clamp to [0, 1] -> the run's normalization -> model -> softmax) and the run's ``info.json``.

- **input**: one float32 tensor ``(N, in_chans, S, S)``, values in [0, 1], ``S`` the run's input size
  (see ``info.json``/the signature); as a scoring-server request ``{"inputs": [...nested lists...]}``.
  The resize and center crop happen before (``medtricks.posthoc.export.prepare_input``), as for the ONNX and
  TorchScript exports.
- **output**: a DataFrame, one row per image: ``prob_<class>`` per class (in the card's class order)
  and ``predicted``, the class at the run's stored operating point (binary: ``prob_<positive> >=
  threshold``; argmax when the run stored none, and for multiclass models).

medtricks.tracking.mlflow_model saves it with :func:`mlflow.pyfunc.save_model`; nothing in medtricks
imports this module.
"""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
import pandas as pd
import torch


class TorchScriptClassifier(mlflow.pyfunc.PythonModel):
    """Images in [0, 1] -> class probabilities and the predicted class (see the module docstring)."""

    def load_context(self, context) -> None:
        with open(context.artifacts["info"], encoding="utf-8") as fh:
            self.info = json.load(fh)
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, still supported
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(context.artifacts["torchscript"], map_location="cpu").eval()

    def _images(self, model_input) -> np.ndarray:
        info = self.info
        shape = (info["in_chans"], info["image_size"], info["image_size"])
        if isinstance(model_input, pd.DataFrame):  # e.g. a direct call with a frame of flattened images
            model_input = model_input.to_numpy()
        x = np.asarray(model_input)
        if x.dtype == np.uint8:  # 8-bit images: 0..255 -> [0, 1]
            x = x.astype(np.float32) / 255.0
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 2 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape((-1, *shape))
        if x.ndim == 3 and x.shape[1:] == shape[1:] and shape[0] == 1:
            x = x[:, None]
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"expected images of shape (N, {shape[0]}, {shape[1]}, {shape[2]}) with values in "
                f"[0, 1], got shape {tuple(x.shape)}"
            )
        return x

    def predict(self, context, model_input, params=None):
        x = self._images(model_input)
        with torch.no_grad():
            probs = self.module(torch.from_numpy(x)).numpy().astype(np.float64)
        classes = self.info["classes"]
        frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        threshold = self.info.get("threshold")
        if threshold is not None and len(classes) == 2:
            positive = int(self.info.get("positive_index", 1))
            picked = np.where(probs[:, positive] >= float(threshold), positive, 1 - positive)
        else:
            picked = probs.argmax(axis=1)
        frame["predicted"] = [classes[i] for i in picked]
        return frame


mlflow.models.set_model(TorchScriptClassifier())
