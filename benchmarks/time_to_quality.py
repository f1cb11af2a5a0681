"""Time to quality (issue 29): wall time until a fine-tuning run first reaches a fixed test AUROC on Kermany.

Measured on the Kermany internal *test* split, for a plain timm + PyTorch fine-tune, the shipped recipe and
the fast recipe.

The arms (each seed of each arm in a fresh process, so its peak RSS is its own; interleaved: for seed in seeds,
for arm in arms):

- ``plain``: the loop timm's documentation has a user write, by hand here: EfficientNet-Lite0 with its
  ImageNet weights (``medtricks.models.create_model``: the offline route to the same weights), gray input,
  224 px, ``cxr_light`` augmentation, AdamW (lr 5e-4, weight decay 0.05), cosine per update over all
  updates, batch 32, everything trainable, plain cross-entropy, ``--epochs-plain`` epochs (3); no
  channels_last, no AMP, no EMA, no validation: the model of the last epoch is the result;
- ``shipped``: ``recipes/kermany_pneumonia.yaml`` through ``medtricks.run.run_recipe`` (``--recipe-shipped``);
- ``fast``: ``recipes/kermany_pneumonia_fast.yaml`` the same way (``--recipe-fast``).

Every arm uses the recipes' splits of the Kermany training folder (``data.test_fraction: 0.15``, ``test_by:
id_order``, ``split_seed: 0``, val 0.15); the test split is the same images in every arm (the JSON's
``test_split`` fingerprint says so). After every epoch the model is scored on the test split with the clock
paused (for the recipes: the model the run validates, i.e. what it would checkpoint), so the curve is
(cumulative wall seconds excluding those test evaluations, epoch, test AUROC).

    python -m benchmarks.time_to_quality                              # 3 arms x seeds 0 1 2 (~70 min here)
    python -m benchmarks.time_to_quality --root /data/kermany224 --seeds 0 1 2 3 4
    python -m benchmarks.time_to_quality --arms plain shipped         # without the fast recipe
    python -m benchmarks.time_to_quality --quick --out /tmp/ttq       # phantoms, 32 px, 2 x 2 steps: a smoke run

Resumable: each (arm, seed) writes ``<work>/<arm>-s<seed>.json`` when it finishes (``--work``, default
``<out>/time_to_quality_work``, git-ignored); a rerun of the same command skips those. Each run's MLflow store
(sqlite) and run folder live in a temporary folder that is deleted afterwards. Writes
``<out>/time_to_quality.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    format_table,
    machine_info,
    now,
    peak_rss_mb,
    results_dir,
    write_results,
)

NAME = "time_to_quality"
ARMS = ("plain", "shipped", "fast")
RECIPES = {
    "shipped": REPO_ROOT / "recipes" / "kermany_pneumonia.yaml",
    "fast": REPO_ROOT / "recipes" / "kermany_pneumonia_fast.yaml",
}
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data" / "kermany224"
CARD = "kermany-pneumonia"
AUROC_BAR = 0.990  # the fixed quality every arm races to
TARGETS = {"speedup_vs_plain": 3.0, "fast_total_wall_s": 180, "fast_auroc_within_shipped": 0.005, "peak_rss_gib": 4}
# The recipes' splits (recipes/kermany_pneumonia.yaml), used by the plain arm too.
SPLITS = {"split_seed": 0, "val_fraction": 0.15, "test_fraction": 0.15, "test_by": "id_order"}
PLAIN = {
    "model": "efficientnet_lite0",
    "weights": "imagenet",
    "in_chans": 1,
    "image_size": 224,
    "augment": "cxr_light",
    "optimizer": "AdamW",
    "lr": 5e-4,
    "weight_decay": 0.05,
    "schedule": "cosine per update (CosineAnnealingLR)",
    "batch_size": 32,
    "loss": "cross-entropy",
    "num_workers": 0,
}
# --quick: two-class phantoms drawn once under <out>/time_to_quality_tmp, 32 px, 2 epochs of 2 updates.
QUICK = {
    "n": 120,
    "size": 32,
    "image_size": 32,
    "val_fraction": 0.25,
    "test_fraction": 0.25,
    "test_by": "random",
    "epochs": 2,
    "max_steps_per_epoch": 2,
    "n_bootstrap": 20,
}
EPS = 1e-12  # "reaches" tolerates float noise: a value equal to the target reaches it

METHOD = (
    "Each (arm, seed) runs in a fresh process (peak RSS = that process's ru_maxrss, which includes the imports and "
    "the test split built before the clock), interleaved: for seed in seeds, for arm in arms. The clock starts just "
    "before the arm builds its data and model (recipes: just before medtricks.run.run_recipe); Python imports, "
    "building the test split once for the benchmark's own scoring, and copying an empty, migrated MLflow sqlite store "
    "(a user's store already exists) happen before it, alike in every arm. After every epoch the model is scored on "
    "the internal test split (roc_auc_score of the positive class, column 1, fp32, global RNG state saved and "
    "restored) with the clock paused; recipes: a benchmark-only wrapper of medtricks.run.fit scores the model the "
    "run just validated, after the run's own validation (which counts). curve[i].wall_s = seconds on the clock at "
    "the end of epoch i (validation included for the recipes, test scoring excluded). total_wall_s = the clock when "
    "the arm returns (recipes: final evaluation with bootstrap CIs, plots, checkpoints, MLflow logging included). "
    "final_test_auroc: plain = its last epoch's (no validation, no selection); recipes = the curve's value at the "
    "run's best (validation-chosen) epoch (run_test_auroc is the run's own number for the same checkpoint). "
    "Time to reach a target A in one run = wall_s of the first epoch whose test AUROC >= A (null: never). "
    "time_to_0.990_s: mean over seeds, null when a seed never reaches 0.990 (reached says how many did). "
    "time_to_own_final_s of a run = its time to reach its own final_test_auroc (always defined: the last epoch for "
    "plain, the best epoch or earlier for a recipe). speedup_vs_plain = mean over plain seeds of time_to_own_final_s "
    "/ mean over fast seeds of the time to reach plain's mean final_test_auroc (null when a fast seed never reaches "
    "it); speedup_vs_shipped the same with shipped in plain's place. Intervals: mean and 95% Student-t interval over "
    "seeds; fast_minus_shipped_auroc pairs the seeds. With --site DIR (a second test set of other patients, every "
    "image, the arm's eval transform, built before the clock), every epoch's model is also scored on DIR with the "
    "clock paused (curve[i].site_auroc); site_auroc = the value at the same epoch final_test_auroc takes (recipes: "
    "run_site_auroc is the run's saved checkpoint scored as medtricks evaluate scores it); the *_on_site speed-ups "
    "and time_to_plain_site_final_s are the same definitions with site AUROC in place of test AUROC; "
    "fast_minus_shipped_site_auroc pairs the seeds."
)


# ------------------------------------------------------------------------------------ statistics
def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % Student-t interval over seeds (``ci_low``/``ci_high`` null with fewer than 2 values)."""
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": len(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(values)}


#: The two quality measures: (per-epoch curve key, the run's final value key).
MEASURES = {"test": ("test_auroc", "final_test_auroc"), "site": ("site_auroc", "site_auroc")}


def first_time(curve: Sequence[dict[str, Any]], target: float, key: str = "test_auroc") -> Optional[float]:
    """Wall seconds of the first epoch whose AUROC (``key``: test or site) reaches ``target`` (None: never)."""
    for point in curve:
        value = point.get(key)
        if value is not None and value >= target - EPS:
            return float(point["wall_s"])
    return None


def time_to(runs: Sequence[dict[str, Any]], target: Optional[float], key: str = "test_auroc") -> dict[str, Any]:
    """Time to reach ``target`` over seeds: mean (null unless every seed reached it), per-seed values, count."""
    if target is None:
        return {"target": None, "mean_s": None, "per_seed_s": [], "reached": 0, "n": len(runs), "never": len(runs)}
    per_seed = [first_time(r["curve"], target, key) for r in runs]
    reached = [t for t in per_seed if t is not None]
    return {
        "target": target,
        "mean_s": sum(reached) / len(reached) if reached and len(reached) == len(per_seed) else None,
        "per_seed_s": per_seed,
        "reached": len(reached),
        "n": len(per_seed),
        "never": len(per_seed) - len(reached),
    }


def speedup(
    reference: Sequence[dict[str, Any]],
    contender: Sequence[dict[str, Any]],
    ref_name: str,
    name: str = "fast",
    measure: str = "test",
) -> dict[str, Any]:
    """``reference``'s mean time to its own final AUROC over ``contender``'s mean time to reach the reference's
    mean final AUROC (see METHOD); ``measure``: on the test split or on the ``--site`` images."""
    if not reference or not contender:
        return {"value": None, "why": f"needs both the {ref_name} and the {name} arm"}
    key, final = MEASURES[measure]
    target = sum(r[final] for r in reference) / len(reference)
    own = [first_time(r["curve"], r[final], key) for r in reference]
    if any(t is None for t in own):  # cannot happen for curves this benchmark wrote: the final is a curve point
        return {"value": None, "why": f"a {ref_name} run's curve lacks its own final {measure} AUROC"}
    ref_time = sum(own) / len(own)  # a run reaches its own final value at the latest at that epoch
    theirs = time_to(contender, target, key)
    out = {
        "target_auroc": target,
        f"{ref_name}_time_to_own_final_s": ref_time,
        f"{name}_time_to_target_s": theirs["mean_s"],
        f"{name}_per_seed_s": theirs["per_seed_s"],
    }
    if theirs["mean_s"] is None:
        return {
            "value": None,
            "why": f"{name} did not reach {ref_name}'s mean final {measure} AUROC {target:.4f} in "
            f"{theirs['never']} of {theirs['n']} seed(s)",
            **out,
        }
    return {"value": ref_time / theirs["mean_s"] if theirs["mean_s"] > 0 else None, **out}


def summarize_arm(
    runs: Sequence[dict[str, Any]], plain_target: Optional[float], plain_site_target: Optional[float] = None
) -> dict[str, Any]:
    finals = [r["final_test_auroc"] for r in runs]
    own = [first_time(r["curve"], r["final_test_auroc"]) for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "final_test_auroc": t_interval(finals),
        "total_wall_s": t_interval([r["total_wall_s"] for r in runs]),
        f"time_to_{AUROC_BAR:.3f}_s": time_to(runs, AUROC_BAR),
        "time_to_plain_final_s": time_to(runs, plain_target),
        "time_to_own_final_s": t_interval(own),
        **(
            {
                "site_auroc": t_interval([r["site_auroc"] for r in runs]),
                "time_to_plain_site_final_s": time_to(runs, plain_site_target, "site_auroc"),
            }
            if all("site_auroc" in r for r in runs)
            else {}
        ),
        "peak_rss_mb": {
            "max": max(r["peak_rss_mb"] for r in runs),
            "mean": sum(r["peak_rss_mb"] for r in runs) / len(runs),
        },
    }


def fast_minus_shipped(fast: Sequence[dict], shipped: Sequence[dict], metric: str) -> dict[str, Any]:
    """``metric`` of fast minus shipped, paired by seed: mean, 95 % t-interval, and whether the interval decides
    the "within 0.005" target (its low end above -0.005, or its high end below)."""
    seeds = sorted({r["seed"] for r in fast} & {r["seed"] for r in shipped})
    f = {r["seed"]: r[metric] for r in fast}
    s = {r["seed"]: r[metric] for r in shipped}
    paired = {"seeds": seeds, **t_interval([f[k] - s[k] for k in seeds])}
    low, margin = paired["ci_low"], -TARGETS["fast_auroc_within_shipped"]
    paired["interval_decides"] = None if low is None else bool(low >= margin or paired["ci_high"] < margin)
    return paired


def summarize(runs: Sequence[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per-arm summary, the two speed-ups, the targets and whether each is met."""
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}
    by_arm = {arm: rows for arm, rows in by_arm.items() if rows}
    plain = by_arm.get("plain", [])
    plain_target = sum(r["final_test_auroc"] for r in plain) / len(plain) if plain else None
    with_site = bool(plain) and all("site_auroc" in r for r in plain)
    plain_site_target = sum(r["site_auroc"] for r in plain) / len(plain) if with_site else None
    summary = {arm: summarize_arm(rows, plain_target, plain_site_target) for arm, rows in by_arm.items()}
    fast, shipped = by_arm.get("fast", []), by_arm.get("shipped", [])
    vs_plain = speedup(plain, fast, "plain")
    vs_shipped = speedup(shipped, fast, "shipped")
    on_site = {}  # each speed-up on the site needs site scores in both of its arms
    for name, reference in (("plain", plain), ("shipped", shipped)):
        if reference and fast and all("site_auroc" in r for r in [*reference, *fast]):
            on_site[f"speedup_vs_{name}_on_site"] = speedup(reference, fast, name, measure="site")
    paired = paired_site = None
    if fast and shipped:
        paired = fast_minus_shipped(fast, shipped, "final_test_auroc")
        if all("site_auroc" in r for r in fast + shipped):
            paired_site = fast_minus_shipped(fast, shipped, "site_auroc")
    met: dict[str, Optional[bool]] = {
        "speedup_vs_plain": None if vs_plain["value"] is None else vs_plain["value"] >= TARGETS["speedup_vs_plain"],
        "fast_total_wall_s": None,
        "fast_auroc_within_shipped": None,
        "peak_rss_gib": None,
    }
    if fast:
        met["fast_total_wall_s"] = summary["fast"]["total_wall_s"]["mean"] <= TARGETS["fast_total_wall_s"]
        met["peak_rss_gib"] = summary["fast"]["peak_rss_mb"]["max"] < TARGETS["peak_rss_gib"] * 1024
        if shipped:
            met["fast_auroc_within_shipped"] = (
                summary["fast"]["final_test_auroc"]["mean"]
                >= summary["shipped"]["final_test_auroc"]["mean"] - TARGETS["fast_auroc_within_shipped"]
            )
    splits = {r.get("test_split") for r in runs}
    return {
        "summary": summary,
        "speedup_vs_plain": vs_plain,
        "speedup_vs_shipped": vs_shipped,
        **on_site,
        "fast_minus_shipped_auroc": paired,
        **({"fast_minus_shipped_site_auroc": paired_site} if paired_site else {}),
        "same_test_split": len(splits) == 1,
        "targets": dict(TARGETS),
        "targets_met": met,
    }


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    def ci(entry: dict[str, Any], digits: int) -> str:
        if entry["mean"] is None:
            return "-"
        if entry["ci_low"] is None:
            return f"{entry['mean']:.{digits}f}"
        return f"{entry['mean']:.{digits}f} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"

    def reach(entry: dict[str, Any]) -> str:
        mean = "-" if entry["mean_s"] is None else f"{entry['mean_s']:.0f}"
        return f"{mean} ({entry['reached']}/{entry['n']})"

    rows = []
    for arm, s in summary.items():
        rows.append(
            {
                "arm": arm,
                "seeds": len(s["seeds"]),
                "final test AUROC": ci(s["final_test_auroc"], 4),
                "total wall s": ci(s["total_wall_s"], 0),
                f"s to {AUROC_BAR:.3f}": reach(s[f"time_to_{AUROC_BAR:.3f}_s"]),
                "s to plain's final": reach(s["time_to_plain_final_s"]),
                "s to own final": ci(s["time_to_own_final_s"], 0),
                **({"site AUROC": ci(s["site_auroc"], 4)} if "site_auroc" in s else {}),
                **(
                    {"s to plain's site final": reach(s["time_to_plain_site_final_s"])}
                    if s.get("time_to_plain_site_final_s", {}).get("target") is not None
                    else {}
                ),
                "peak RSS MiB (max)": f"{s['peak_rss_mb']['max']:,.0f}",
            }
        )
    return rows


# ---------------------------------------------------------------------------------- one run (child)
class Clock:
    """Wall seconds since :meth:`start`, minus the time spent inside :meth:`paused`."""

    def __init__(self) -> None:
        self.started: Optional[float] = None
        self.paused_s = 0.0

    def start(self) -> None:
        self.started, self.paused_s = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.paused_s

    @contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class TestCurve:
    """Scores a model on the test split after each epoch, with the clock paused, and keeps the curve."""

    def __init__(self, dataset, clock: Clock, batch_size: int = 64, site=None) -> None:
        self.loader = self._loader(dataset, batch_size)
        self.site_loader = None if site is None else self._loader(site, batch_size)
        self.clock = clock
        self.points: list[dict[str, Any]] = []

    @staticmethod
    def _loader(dataset, batch_size: int):
        import torch
        from torch.utils.data import DataLoader

        # Its own generator: iterating this loader draws nothing from the global RNG the training uses.
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, generator=torch.Generator())

    def record(self, model) -> None:
        device = next(model.parameters()).device
        _sync(device)
        wall = self.clock.elapsed()
        with self.clock.paused():
            auroc = self.score(model, device)
            site = None if self.site_loader is None else self.score(model, device, self.site_loader)
        point = {"epoch": len(self.points) + 1, "wall_s": round(wall, 3), "test_auroc": auroc}
        self.points.append(point if self.site_loader is None else {**point, "site_auroc": site})
        shown = "n/a" if auroc is None else f"{auroc:.4f}"
        print(
            f"    epoch {len(self.points)}: {wall:.1f} s on the clock, test AUROC {shown}"
            + ("" if self.site_loader is None else f", site AUROC {'n/a' if site is None else f'{site:.4f}'}"),
            flush=True,
        )

    def score(self, model, device, loader=None) -> Optional[float]:
        import random

        import numpy as np
        import torch
        from sklearn.metrics import roc_auc_score

        from medtricks.train.inference import predict

        states = (
            torch.get_rng_state(),
            np.random.get_state(),
            random.getstate(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        )
        try:
            targets, probs, _ = predict(model, self.loader if loader is None else loader, device=device)
        finally:  # the benchmark's scoring must not change what the run draws next
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])
        if len(set(targets.tolist())) < 2:
            return None
        return float(roc_auc_score(targets, probs[:, 1]))


def site_dataset(args, *, image_size: int, mean, std, in_chans: int, augment: str):
    """Every image of ``--site`` (a second test set from other patients, e.g. the deployment-site sample) with the
    arm's eval transform, built before the clock; no model selection ever sees it. None without ``--site``."""
    if not args.site:
        return None
    from medtricks.data import build_eval_dataset

    dataset, _ = build_eval_dataset(
        args.card,
        args.site,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        in_chans=in_chans,
        augment=augment,
        progress=False,
    )
    return dataset


def _split_fingerprint(bundle, root) -> dict[str, Any]:
    """sha256 over the sorted test image paths (relative to the data root): equal in every arm."""
    rows = bundle.manifest[bundle.manifest["split"] == "test"]
    root = Path(root).expanduser().resolve()
    names = sorted(
        str(Path(p).resolve().relative_to(root)) if Path(p).resolve().is_relative_to(root) else str(p)
        for p in rows["path"]
    )
    return {"test_split": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16], "n_test": len(names)}


def _check_scored(curve: TestCurve, card) -> None:
    if any(p["test_auroc"] is None for p in curve.points):
        raise SystemExit(f"the test split of card {card!r} holds one class only: no AUROC; use more images")


def _binary_classes(classes: Sequence[str], card) -> None:
    if len(classes) != 2:
        raise SystemExit(
            f"card {card!r} has {len(classes)} classes ({', '.join(classes)}); the benchmark scores "
            "the AUROC of a binary task's positive class (column 1)"
        )


def run_plain(args, seed: int, clock: Clock) -> dict[str, Any]:
    """Arm (a): the fine-tune a timm user writes by hand."""
    import random

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from medtricks.data import build_datasets, load_card
    from medtricks.models import create_model, get_data_config

    quick = QUICK if args.quick else None
    card = args.card
    classes = list(load_card(card).classes)
    _binary_classes(classes, card)
    image_size = QUICK["image_size"] if quick else PLAIN["image_size"]
    splits = dict(SPLITS, **({k: QUICK[k] for k in ("val_fraction", "test_fraction", "test_by")} if quick else {}))
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    epochs = args.epochs_plain
    max_steps = QUICK["max_steps_per_epoch"] if quick else None

    def data(model):
        config = get_data_config(model)
        return build_datasets(
            card,
            args.root,
            image_size=image_size,
            mean=config["mean"],
            std=config["std"],
            in_chans=PLAIN["in_chans"],
            augment=PLAIN["augment"],
            progress=False,
            **splits,
        )

    # Before the clock: the test split the benchmark scores on (the arm builds its own copy on the clock).
    probe = create_model(PLAIN["model"], weights=PLAIN["weights"], num_classes=2, in_chans=PLAIN["in_chans"])
    reference = data(probe)
    config = get_data_config(probe)
    site = site_dataset(
        args,
        image_size=image_size,
        mean=config["mean"],
        std=config["std"],
        in_chans=PLAIN["in_chans"],
        augment=PLAIN["augment"],
    )
    curve = TestCurve(reference.test, clock, site=site)

    clock.start()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = create_model(PLAIN["model"], weights=PLAIN["weights"], num_classes=len(classes), in_chans=PLAIN["in_chans"])
    bundle = data(model)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(bundle.train, batch_size=PLAIN["batch_size"], shuffle=True, num_workers=0, generator=generator)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PLAIN["lr"], weight_decay=PLAIN["weight_decay"])
    per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for step, (images, labels) in enumerate(loader):
            if step >= per_epoch:
                break
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        curve.record(model)
    _sync(device)
    total = clock.elapsed()
    _check_scored(curve, args.card)
    return {
        "curve": curve.points,
        "final_test_auroc": curve.points[-1]["test_auroc"],
        **({"site_auroc": curve.points[-1]["site_auroc"]} if args.site else {}),
        "best_epoch": epochs,
        "total_wall_s": round(total, 3),
        "n_train": len(bundle.train),
        "image_size": image_size,
        "device": str(device),
        "updates": epochs * per_epoch,
        **_split_fingerprint(reference, args.root),
    }


def recipe_overrides(args, arm: str, seed: int, scratch: Path) -> list[str]:
    """The ``--set`` overrides of a recipe arm: seed, data root, a temporary run folder and MLflow store."""
    from medtricks.recipe import load_recipe

    overrides = [
        f"experiment.seed={seed}",
        f"data.root={args.root}",
        f"experiment.output_dir={scratch / 'runs'}",
        "tracking.backend=mlflow",
        f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}",
        "train.progress=false",
    ]
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    if args.quick:
        overrides += [
            f"data.card={args.card}",
            "data.synth=null",
            f"data.image_size={QUICK['image_size']}",
            f"data.val_fraction={QUICK['val_fraction']}",
            f"data.test_fraction={QUICK['test_fraction']}",
            f"data.test_by={QUICK['test_by']}",
            f"train.epochs={QUICK['epochs']}",
            f"train.max_steps_per_epoch={QUICK['max_steps_per_epoch']}",
            f"eval.n_bootstrap={QUICK['n_bootstrap']}",
            "tracking.log_model=false",
        ]
    recipe = load_recipe(args.recipe[arm], overrides=overrides)
    if args.quick and recipe.schedule.progressive_resize is not None:  # ramps to 32 px from 32 px
        overrides += [
            f"schedule.progressive_resize.start={QUICK['image_size']}",
            "schedule.progressive_resize.end=null",
            "schedule.progressive_resize.final_epochs=1",
        ]
    if args.quick and recipe.schedule.warmup_epochs >= QUICK["epochs"]:
        overrides.append("schedule.warmup_epochs=1")
    if recipe.data.cache_dir is not None:  # a cold decode cache in every run: filling it is part of its cost
        overrides.append(f"data.cache_dir={scratch / 'decode_cache'}")
    return overrides


def _mlflow_store(scratch: Path) -> None:
    """An empty, migrated MLflow sqlite store at ``scratch/mlflow.db``: a copy of a template made once per machine
    and MLflow version (migrating a new store takes ~10 s; a user's store already exists). The template is the
    one the test suite makes (tests/conftest.py), same name, same content."""
    import mlflow
    from mlflow.tracking import MlflowClient

    template = Path(tempfile.gettempdir()) / f"medtricks-test-mlflow-{mlflow.__version__}.db"
    if not template.is_file():
        tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, template)
    shutil.copy(template, scratch / "mlflow.db")


def run_recipe_arm(args, arm: str, seed: int, clock: Clock, scratch: Path) -> dict[str, Any]:
    """Arms (b) and (c): a shipped recipe through medtricks' Python API, scored on the test split after each epoch."""
    import medtricks.run as run_module
    import medtricks.tracking.mlflow_store  # noqa: F401 - imported before the clock, like every other module
    from medtricks.data import build_datasets, load_card
    from medtricks.recipe import load_recipe
    from medtricks.train import resolve_device
    from medtricks.posthoc.load import build_model

    path = args.recipe[arm]
    overrides = recipe_overrides(args, arm, seed, scratch)
    recipe = load_recipe(path, overrides=overrides)
    classes = list(load_card(recipe.data.card).classes)
    _binary_classes(classes, recipe.data.card)
    data = recipe.data
    # Before the clock: the run's test split, built as medtricks.run builds it (no decode cache: filling the run's
    # own cache here would make its run cheaper).
    _, data_config = build_model(recipe, num_classes=len(classes))
    reference = build_datasets(
        data.card,
        data.root,
        image_size=recipe.input_image_size(),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        in_chans=recipe.model.in_chans,
        augment=data.augment,
        split_seed=data.split_seed,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        test_by=data.test_by,
        on_bad_image=data.on_bad_image,
        progress=False,
    )
    if reference.test is None:
        raise SystemExit(
            f"{path}: the recipe builds no test split (data.test_fraction is 0 and {data.root} has no "
            "test/ folder); the benchmark needs one"
        )
    site = site_dataset(
        args,
        image_size=recipe.input_image_size(),
        mean=data_config["mean"],
        std=data_config["std"],
        in_chans=recipe.model.in_chans,
        augment=data.augment,
    )
    curve = TestCurve(reference.test, clock, batch_size=recipe.train.batch_size, site=site)
    _mlflow_store(scratch)

    # BENCHMARK-ONLY monkeypatch (never do this in the package): medtricks.run calls fit(..., evaluate_fn=...)
    # once per run; this wrapper hands fit an evaluate_fn that runs the run's own validation (on the clock, it is
    # the run's cost) and then, with the clock paused, scores the same model on the test split.
    original_fit = getattr(run_module, "fit", None)
    if original_fit is None:
        raise SystemExit("medtricks.run no longer has a module-level `fit`: update this benchmark's hook")

    def fit_with_test_curve(*fit_args, evaluate_fn, **fit_kwargs):
        def evaluate_then_score(eval_model):
            metrics = evaluate_fn(eval_model)
            curve.record(eval_model)
            return metrics

        return original_fit(*fit_args, evaluate_fn=evaluate_then_score, **fit_kwargs)

    run_module.fit = fit_with_test_curve
    try:
        clock.start()
        result = run_module.run_recipe(recipe, quiet=True)
        total = clock.elapsed()
    finally:
        run_module.fit = original_fit
    if not curve.points:
        raise SystemExit(
            f"{path}: the run never called medtricks.run.fit's evaluate_fn, so no test curve was "
            "recorded; this benchmark's hook needs updating for how run.py trains now"
        )
    _check_scored(curve, data.card)
    best = result.best_epoch or len(curve.points)
    test = result.test_metrics.values if result.test_metrics is not None else {}
    site = {}
    if args.site:  # and the run's own saved checkpoint, loaded and scored as `medtricks evaluate RUN --root SITE` does
        from medtricks.posthoc import evaluate_trained

        report = evaluate_trained(
            str(result.run_dir), card=data.card, root=args.site, n_bootstrap=0, log=False, progress=False
        )
        site = {
            "site_auroc": curve.points[best - 1]["site_auroc"],
            "run_site_auroc": float(report.metrics.values["auroc"]),
        }
    return {
        "curve": curve.points,
        "final_test_auroc": curve.points[best - 1]["test_auroc"],
        **site,
        "best_epoch": best,
        "run_test_auroc": float(test["auroc"]) if "auroc" in test else None,
        "total_wall_s": round(total, 3),
        "n_train": len(reference.train),
        "image_size": recipe.data.image_size,
        "device": str(resolve_device(recipe.train.device)),
        "recipe": _relative(path),
        "recipe_sha256": _sha256(path),
        "overrides": [o.replace(str(scratch), "<scratch>") for o in overrides],
        **_split_fingerprint(reference, data.root),
    }


def child_main(args) -> int:
    """``--one ARM --seed S --json PATH``: one run in this process; writes its row to PATH."""
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="ttq-"))
    scratch.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    began = time.perf_counter()
    if args.one == "plain":
        row = run_plain(args, args.seed, clock)
    else:
        row = run_recipe_arm(args, args.one, args.seed, clock, scratch)
    row = {
        "arm": args.one,
        "seed": args.seed,
        **row,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "process_s": round(time.perf_counter() - began, 1),
        "key": run_key(args, args.one),
        "finished_at": now(),
    }
    path = Path(args.json)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, path)
    return 0


# ---------------------------------------------------------------------------------------- parent
def _sha256(path: Path) -> Optional[str]:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def run_key(args, arm: str) -> dict[str, Any]:
    """What a stored (arm, seed) result depends on; a rerun reuses it only when this is unchanged."""
    key: dict[str, Any] = {
        "quick": bool(args.quick),
        "root": str(args.root),
        "card": str(args.card),
        "device": args.device,
    }
    if args.site:
        key["site"] = str(args.site)
    if arm == "plain":
        key["epochs_plain"] = args.epochs_plain
    else:
        key.update(recipe=_relative(args.recipe[arm]), recipe_sha256=_sha256(args.recipe[arm]))
    return key


def _quick_data(tmp: Path) -> tuple[Path, Path]:
    """Two-class phantoms and a binary card for them (drawn once): (card path, data root)."""
    import yaml

    from medtricks.data.synthetic import synthesize_phantoms

    root = tmp / "phantoms"
    if not (root / "phantoms.csv").is_file():
        synthesize_phantoms(root, n=QUICK["n"], classes=("normal", "pneumonia"), size=QUICK["size"], seed=0)
    card = yaml.safe_load((REPO_ROOT / "data_cards" / "synthetic-phantoms.yaml").read_text())
    card.update(name="binary-phantoms", task="binary", classes=["normal", "pneumonia"])
    path = tmp / "binary-phantoms.yaml"
    path.write_text(yaml.safe_dump(card))
    return path, root


def _check_inputs(args, parser: argparse.ArgumentParser) -> None:
    root = Path(args.root)
    if not args.quick and not (root / "train").is_dir():
        parser.error(
            f"--root {root} has no train/ folder: put the Kermany pediatric pneumonia training images there "
            f"as {root}/train/NORMAL/*.jpeg and {root}/train/PNEUMONIA/*.jpeg (the team keeps a 224 px copy "
            "at ../shared/data/kermany224 next to the repository; see ../shared/data/README.md), pass "
            "--root DIR, or run --quick (phantoms)"
        )
    if args.site and not Path(args.site).is_dir():
        parser.error(
            f"--site {args.site} is not a folder: pass a second test set of other patients laid out as the card "
            f"{args.card!r} expects (e.g. ../shared/data/kermany224_site with NORMAL/ and PNEUMONIA/), or leave "
            "--site out"
        )
    for arm in ("shipped", "fast"):
        if arm in args.arms and not Path(args.recipe[arm]).is_file():
            written = " (issue 29's fast recipe: not written yet?)" if arm == "fast" else ""
            others = [a for a in args.arms if a != arm] or [a for a in ARMS if a != arm]
            parser.error(
                f"--recipe-{arm} {args.recipe[arm]} does not exist{written}: pass --recipe-{arm} PATH, or "
                f"leave the arm out (--arms {' '.join(others)})"
            )


def _child_command(args, arm: str, seed: int, json_path: Path, scratch: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.time_to_quality",
        "--one",
        arm,
        "--seed",
        str(seed),
        "--json",
        str(json_path),
        "--scratch",
        str(scratch),
        "--root",
        str(args.root),
        "--card",
        str(args.card),
        "--epochs-plain",
        str(args.epochs_plain),
        "--recipe-shipped",
        str(args.recipe["shipped"]),
        "--recipe-fast",
        str(args.recipe["fast"]),
        "--device",
        args.device,
    ]
    cmd += ["--site", str(args.site)] if args.site else []
    return cmd + (["--quick"] if args.quick else [])


def run_all(args, work: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (arm, seed), interleaved, each in a fresh process; finished ones are read back, not rerun."""
    rows, failed = [], []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for seed in args.seeds:
        for arm in args.arms:
            path = work / f"{arm}-s{seed}.json"
            if path.is_file():
                row = json.loads(path.read_text())
                if row.get("key") != run_key(args, arm):
                    raise SystemExit(
                        f"{path} was measured with another configuration ({row.get('key')} vs now "
                        f"{run_key(args, arm)}): delete it, or pass another --work folder"
                    )
                print(f"{arm} seed {seed}: done earlier ({path.name})", flush=True)
                rows.append(row)
                continue
            print(f"{now()} {arm} seed {seed} ...", flush=True)
            # The run folder and MLflow store live here and go away with it; cwd too, so nothing lands in the repo.
            with tempfile.TemporaryDirectory(prefix=f"ttq-{arm}-s{seed}-") as scratch:
                proc = subprocess.run(_child_command(args, arm, seed, path, Path(scratch)), cwd=scratch, env=env)
            if proc.returncode != 0 or not path.is_file():
                print(
                    f"  {arm} seed {seed} FAILED (exit {proc.returncode}); see above. Rerun the same command to "
                    "retry it (finished runs are kept)",
                    flush=True,
                )
                failed.append(f"{arm}-s{seed}")
                continue
            row = json.loads(path.read_text())
            print(
                f"  {row['total_wall_s']:.1f} s, final test AUROC {row['final_test_auroc']}, peak RSS "
                f"{row['peak_rss_mb']:,.0f} MiB",
                flush=True,
            )
            rows.append(row)
    return rows, failed


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        default=None,
        help="Kermany folder holding train/NORMAL and train/PNEUMONIA (default ../shared/data/"
        "kermany224 next to the repository)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--epochs-plain", type=int, default=None, help="epochs of the plain arm (default 3; --quick 2)")
    parser.add_argument("--recipe-shipped", default=str(RECIPES["shipped"]), help="recipe of the shipped arm")
    parser.add_argument("--recipe-fast", default=str(RECIPES["fast"]), help="recipe of the fast arm")
    parser.add_argument("--device", default="auto", help="auto (the recipes' default), cpu or cuda[:N], every arm")
    parser.add_argument(
        "--site",
        default=None,
        metavar="DIR",
        help="also score each arm's final model on every image of this second test set (other patients; e.g. "
        "../shared/data/kermany224_site), after the clock",
    )
    parser.add_argument(
        "--work",
        default=None,
        metavar="DIR",
        help="per-(arm, seed) results, reused by a rerun (default <out>/time_to_quality_work)",
    )
    parser.add_argument("--one", choices=ARMS, default=None, help=argparse.SUPPRESS)  # child: one run
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--card", default=CARD, help=argparse.SUPPRESS)  # --quick: the binary phantom card
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.recipe = {
        "shipped": Path(args.recipe_shipped).expanduser().resolve(),
        "fast": Path(args.recipe_fast).expanduser().resolve(),
    }
    if args.epochs_plain is None:
        args.epochs_plain = QUICK["epochs"] if args.quick else 3
    if args.one:
        if args.json is None:
            parser.error("--one needs --json PATH")
        args.root = str(Path(args.root or DEFAULT_ROOT).expanduser().resolve())
        args.site = str(Path(args.site).expanduser().resolve()) if args.site else None
        return child_main(args)

    started = time.perf_counter()
    out = results_dir(args.out, args.quick)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.quick:
        card, root = _quick_data(out / f"{NAME}_tmp")
        args.card, args.root = str(card), str(root.resolve())
    else:
        args.root = str(Path(args.root).expanduser().resolve() if args.root else DEFAULT_ROOT.resolve())
    args.site = str(Path(args.site).expanduser().resolve()) if args.site else None
    _check_inputs(args, parser)
    work = Path(args.work).expanduser() if args.work else out / f"{NAME}_work"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / ".gitignore").exists():  # per-run results are a cache, never committed
        (work / ".gitignore").write_text("# time_to_quality per-(arm, seed) results: a cache for reruns\n*\n")
    machine = machine_info()

    rows, failed = run_all(args, work)
    result = summarize(rows, args.arms) if rows else {}
    table = table_rows(result.get("summary", {}))
    if table:
        columns = list(dict.fromkeys(c for row in table for c in row))  # an arm without site scores shows "-"
        print(format_table(table, columns))
    for name in ("speedup_vs_plain", "speedup_vs_shipped", "speedup_vs_plain_on_site", "speedup_vs_shipped_on_site"):
        if name.endswith("_on_site") and name not in result:
            continue
        entry = result.get(name) or {}
        value = entry.get("value")
        print(
            f"{name}: {'-' if value is None else f'{value:.2f}x'}{'  (' + entry['why'] + ')' if 'why' in entry else ''}"
        )
    if result:
        print(
            "targets met: "
            + ", ".join(f"{k} {'-' if v is None else 'yes' if v else 'NO'}" for k, v in result["targets_met"].items())
        )
    payload = {
        "name": NAME,
        "quick": bool(args.quick),
        "machine": machine,
        "config": {
            "root": _relative(Path(args.root)),
            "card": _relative(Path(args.card)) if args.quick else CARD,
            "arms": args.arms,
            "seeds": args.seeds,
            "epochs_plain": args.epochs_plain,
            "device": args.device,
            "site": _relative(Path(args.site)) if args.site else None,
            "auroc_bar": AUROC_BAR,
            "splits": SPLITS
            if not args.quick
            else {**SPLITS, **{k: QUICK[k] for k in ("val_fraction", "test_fraction", "test_by")}},
            "plain": PLAIN,
            "quick": QUICK if args.quick else None,
            "recipes": {
                arm: {"path": _relative(args.recipe[arm]), "sha256": _sha256(args.recipe[arm])}
                for arm in ("shipped", "fast")
                if arm in args.arms
            },
            "work": str(work),
        },
        "method": METHOD,
        "runs": rows,
        **result,
        "failed": failed,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"wrote {write_results(payload, out, NAME)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
