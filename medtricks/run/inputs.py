"""What a run logs before it trains: params (the recipe's sections that are on, resolved values, data
counts, lineage, the tricks' own), the recipe, the split manifest and quarantine, the tricks' reports and the
lr schedule."""

from __future__ import annotations

from medtricks._atomic import write_csvs
from medtricks.data import export_manifest, export_quarantine
from medtricks.evaluate import plot_lr_schedule
from medtricks.logged_params import run_params
from medtricks.recipe import Recipe
from medtricks.rundir import RunDir
from medtricks.tracking import RunStore
from medtricks.train import distributed
from medtricks.train.schedules import lr_curve

__all__ = ["log_inputs"]


def log_inputs(
    recipe: Recipe,
    run: RunDir,
    tracker: RunStore,
    say,
    *,
    bundle,
    tricks,
    frozen,
    opt,
    device,
    amp_dtype,
    classes,
    data_config,
    info,
) -> None:
    """What the run is, logged before training: params (the sections that are on; the whole recipe is the
    recipe.yaml artifact), recipe, split manifest, trick reports, schedule."""
    params = run_params(recipe)
    world = distributed.world_size()
    if world > 1:  # torchrun: train.batch_size is per process
        params.update({"resolved.world_size": world, "resolved.global_batch_size": recipe.train.batch_size * world})
    params.update(
        {
            "resolved.lr": opt.lr,
            "resolved.device": str(device),
            "resolved.amp_dtype": str(amp_dtype),
            "resolved.num_classes": len(classes),
            "resolved.classes": ",".join(classes),
            "resolved.updates_per_epoch": opt.updates_per_epoch,
            "resolved.image_size": recipe.input_image_size(),
            "resolved.mean": str(tuple(data_config["mean"])),
            "resolved.std": str(tuple(data_config["std"])),
            "weights.source": info.get("weights_source"),
            "weights.sha256": info.get("weights_sha256"),
            "frozen_params": len(frozen),
            "n_train": len(bundle.train),
            "n_val": len(bundle.val),
            "n_test": len(bundle.test) if bundle.test is not None else 0,
            "n_unlabeled": len(bundle.unlabeled) if bundle.unlabeled is not None else 0,
            "n_quarantined": len(bundle.quarantine),
        }
    )
    unseen = bundle.manifest.attrs.get("unseen_labels") or {}  # the card's unknown_labels policy acted on these
    params["n_unseen_label_images"] = sum(unseen.values())
    if unseen:
        policy = bundle.card.unknown_labels
        say(
            f"data: {sum(unseen.values())} image(s) carry raw labels card {bundle.card.name!r} does not name, "
            f"{'left out' if policy == 'drop' else f'labelled {policy!r}'} by its unknown_labels: "
            + ", ".join(f"{raw!r} ({n})" for raw, n in sorted(unseen.items()))
        )
    lineage = info.get("lineage")
    if lineage:  # model.weights: run:...: the run it started from, and what that run started from
        params.update(
            {
                "lineage.parent_run": lineage["parent_run_id"] or lineage["parent_run_dir"],
                "lineage.parent_recipe_digest": lineage["parent_recipe_digest"],
                "lineage.parent_weights": lineage["parent_weights"],
            }
        )
    for trick in tricks:
        params.update(trick.log_params())
    tracker.log_params(params)
    run.artifacts.mkdir(exist_ok=True)
    tracker.log_artifact(run.recipe)
    write_csvs({run.split_manifest: export_manifest(bundle.manifest, recipe.data.root)})  # atomic, spreadsheet-safe
    tracker.log_artifact(run.split_manifest, "data")
    if len(bundle.quarantine):
        # image_id (as in the split manifest) and reasons with data paths hashed; the real paths only on the console
        write_csvs({run.quarantine: export_quarantine(bundle.quarantine, recipe.data.root)})
        tracker.log_artifact(run.quarantine, "data")
        say(
            f"warning: {len(bundle.quarantine)} unreadable images skipped (data.on_bad_image=skip); "
            f"listed in {run.quarantine}:"
        )
        for path, reason in zip(bundle.quarantine["path"][:20], bundle.quarantine["reason"][:20]):
            say(f"  {path}: {reason}")
        if len(bundle.quarantine) > 20:
            say(f"  ... and {len(bundle.quarantine) - 20} more")
    for trick in tricks:
        for path, folder in trick.artifacts(run):
            tracker.log_artifact(path, folder)
        summary = trick.summary()
        if summary:
            say(summary)
    if recipe.eval.plots:
        tracker.log_figure(
            plot_lr_schedule(lr_curve(opt.lr, **opt.schedule_kwargs), steps_per_epoch=opt.updates_per_epoch),
            "plots/lr_schedule.png",
        )
