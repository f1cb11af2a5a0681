"""Trained models: rebuild the model a recipe describes, and load a finished run's model back.

``build_model`` is what ``medtricks run`` trains (``model.weights: run:<run>`` starts it from a finished
run: :mod:`medtricks.chained`); ``load_trained`` is what ``evaluate``, ``audit`` and ``ensemble`` work on.

    from medtricks.posthoc.load import load_trained
    trained = load_trained("runs/quickstart/20261123-101500-a1b2c3")
    trained.model.eval(); print(trained.classes)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medtricks.chained import ModelFileError, apply_parent_run, load_parent_run, parent_ref, read_model_state
from medtricks.chained import trained_data_config as _trained_data_config
from medtricks.data import load_card
from medtricks.errors import MissingFileError
from medtricks.models import create_model, get_data_config
from medtricks.models.resizer import LearnableResizer, ResizerModel
from medtricks.recipe import Recipe, load_run_recipe
from medtricks.rundir import MODEL_ARTIFACT_DIR, RunDir
from medtricks.tracking import DEFAULT_RUNS_DIR, find_run
from medtricks.gamma.layerscale import insert_layerscale_for_state

__all__ = ["TrainedModel", "load_trained", "build_model", "ModelFileError"]


def _with_weights(recipe: Recipe, weights: str) -> Recipe:
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"weights": weights})})


def build_model(recipe: Recipe, num_classes: int):
    """Backbone (+ learnable resizer) from the ``model`` section; returns (model, data_config).

    ``model.weights: run:<run folder or run id>`` starts from a finished run's model (a run id is looked up
    in the local run store under ``experiment.output_dir``, then in MLflow; an experiment folder such as
    ``runs/kermany_pneumonia`` means its newest finished run, recorded in the lineage): see
    :func:`medtricks.chained.apply_parent_run`.
    """
    cfg = recipe.model
    ref = parent_ref(cfg.weights)
    if ref is not None:
        newest = RunDir.newest_finished(ref)  # an experiment folder (runs/kermany_pneumonia): its newest finished run
        ref = str(newest.path) if newest is not None else ref
        uri = recipe.tracking.uri if recipe.tracking.backend == "mlflow" else None
        run_dir, run_id, store = _resolve_run_files(ref, uri, recipe.experiment.output_dir)
        local = store.local_run_dir(ref) if store is not None else None
        downloaded = store is not None and (local is None or Path(local).resolve() != Path(run_dir).resolve())
        parent = load_parent_run(run_dir, ref=ref, run_id=run_id, downloaded=downloaded)
        model, data_config = build_model(_with_weights(recipe, "none"), num_classes)
        return model, apply_parent_run(model, recipe, parent, data_config)
    backbone = create_model(
        cfg.name,
        weights=cfg.weights,
        num_classes=num_classes,
        in_chans=cfg.in_chans,
        drop_rate=cfg.drop_rate,
        spt=cfg.vit.spt,
        lsa=cfg.vit.lsa,
        **cfg.kwargs,
    )
    data_config = get_data_config(backbone)
    model = backbone
    if cfg.resizer.enabled:
        resizer = LearnableResizer(
            in_chans=cfg.in_chans,
            out_size=cfg.resizer.output_size,
            n_filters=cfg.resizer.n_filters,
            n_res_blocks=cfg.resizer.n_res_blocks,
            interpolation=cfg.resizer.interpolation,
            attention=cfg.resizer.attention,
        )
        model = ResizerModel(resizer, backbone)
        model.medtricks_info = dict(getattr(backbone, "medtricks_info", {}))
    return model, data_config


# ----------------------------------------------------------------------------- trained models
@dataclass
class TrainedModel:
    """A fine-tuned model rebuilt from its run: what ``evaluate`` and ``audit`` work on.

    ``store``: the run store the run was found in by its id (``None`` for a run given as a folder);
    ``run_dir``: its run folder, or a temporary copy of its recipe and model downloaded from the store.
    """

    model: Any
    recipe: Recipe
    classes: list[str]
    data_config: dict
    run_dir: Optional[Path]
    run_id: Optional[str]
    store: Any = None  # Optional[RunStore]


def _resolve_run_files(
    ref: str, tracking_uri: Optional[str], runs_dir: Optional[str | Path] = None
) -> tuple[Path, Optional[str], Any]:
    """A run folder, a file inside it, or a run id → (folder with recipe.yaml and model/, run id, store).

    A run id is looked up in the local run store under ``runs_dir`` (default ``runs``) and in MLflow
    at ``tracking_uri``; a run whose folder is not on this machine has its recipe and model downloaded.
    """
    path = Path(ref)
    if path.exists():
        run = RunDir.containing(path)
        if run is None:
            raise MissingFileError(f"{path} holds no recipe.yaml: not a medtricks run folder")
        return run.path, run.read_state().get("run_id"), None

    folder = runs_dir if runs_dir is not None else DEFAULT_RUNS_DIR
    store = find_run(ref, tracking_uri=tracking_uri, runs_dirs=[folder])
    if store is None:
        from medtricks.tracking.mlflow_store import default_tracking_uri

        raise MissingFileError(
            f"{ref!r} is neither a run folder, a model file, nor a run id of the local run store "
            f"under {folder} or of MLflow at {default_tracking_uri(tracking_uri)}"
        )
    local = store.local_run_dir(ref)
    if local is not None and RunDir(local).model_state.is_file() and RunDir(local).recipe.is_file():
        return Path(local), ref, store
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="medtricks-run-"))
    copy = RunDir(dest)
    for artifact in (copy.recipe.name, MODEL_ARTIFACT_DIR):
        got = store.download_artifact(ref, artifact, dest)
        if got is None:
            raise MissingFileError(
                f"run {ref} in {store.describe()} has no {artifact!r} artifact: it did not "
                "finish, or logged no model (tracking.log_model: false)"
            )
        target = copy.artifact_for(artifact)
        if Path(got).resolve() != target.resolve():  # a store that hands out files in place
            import shutil

            (shutil.copytree if Path(got).is_dir() else shutil.copy)(got, target)
    return dest, ref, store


def load_trained(
    ref: str, *, tracking_uri: Optional[str] = None, device: str = "cpu", runs_dir: Optional[str | Path] = None
) -> TrainedModel:
    """Rebuild a trained model from a run folder, its ``model/model_state.pt``, or a run id (of the
    local run store under ``runs_dir``, default ``runs``, or of MLflow at ``tracking_uri``).

    Example::

        trained = load_trained("runs/quickstart/20261123-101500-a1b2c3")
        trained.model.eval(); print(trained.classes)
    """
    run_dir, run_id, store = _resolve_run_files(ref, tracking_uri, runs_dir)
    run = RunDir(run_dir)
    recipe = load_run_recipe(run.recipe)  # its plug-in list is never imported
    state = read_model_state(run.model_state, device)
    classes = list(load_card(recipe.data.card).classes)
    # Random init is enough (the state dict overwrites it) and needs no weights file; fall back to
    # the recipe's weights when their stem adaptation added tensors (e.g. a folded conv bias).
    # A chained run (weights run:...) is rebuilt the same way: its parent run is not needed any more.
    model, data_config = build_model(_with_weights(recipe, "none"), num_classes=len(classes))
    insert_layerscale_for_state(model, state)  # tricks.layerscale_gamma.insert added LayerScale modules
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        model, data_config = build_model(recipe, num_classes=len(classes))
        insert_layerscale_for_state(model, state)
        model.load_state_dict(state, strict=True)
    # normalization is the one the run trained with (its weights decided it)
    data_config = _trained_data_config(run_dir, data_config)
    model.to(device).eval()
    return TrainedModel(
        model=model,
        recipe=recipe,
        classes=classes,
        data_config=data_config,
        run_dir=run_dir,
        run_id=run_id,
        store=store,
    )
