"""The run summary's decision rule over seeds (issue 30, item 4): the recipe family tag, the spread read back
from the run store, and a store that cannot be searched."""

from __future__ import annotations

import math

import pytest


def _record(run_id, seed, metrics, family="fam", status="FINISHED"):
    from medtricks.tracking.base import RunRecord

    return RunRecord(
        run_id=run_id,
        run_name=run_id,
        experiment="e",
        status=status,
        start_time=0,
        tags={"medtricks.recipe_family": family},
        params={"experiment.seed": str(seed)},
        metrics=metrics,
    )


class _Store:
    """search_runs as a run store answers it: tag and status filters, oldest first."""

    def __init__(self, records):
        self.records = records

    def search_runs(self, experiment, *, tags=None, statuses=None):
        return [
            r
            for r in self.records
            if all(r.tags.get(k) == v for k, v in (tags or {}).items()) and (not statuses or r.status in statuses)
        ]


def _binary(thr, sens, spec, auroc=0.9, acc=0.8):
    return {
        "best/op/threshold": thr,
        "best/test/auroc": auroc,
        "best/test/op/accuracy": acc,
        "best/test/op/sensitivity/pneumonia": sens,
        "best/test/op/specificity/pneumonia": spec,
    }


def test_recipe_family_ignores_the_seed_and_folders_not_the_training(tiny_recipe, tmp_path):
    from medtricks.run.seed_spread import recipe_family

    a = recipe_family(tiny_recipe(tmp_path, "experiment.seed=0"))
    assert a == recipe_family(tiny_recipe(tmp_path, "experiment.seed=7"))
    moved = [f"experiment.output_dir={tmp_path / 'elsewhere'}", "train.progress=true", "tracking.uri=x.db"]
    assert a == recipe_family(tiny_recipe(tmp_path, "experiment.seed=7", *moved))
    assert a != recipe_family(tiny_recipe(tmp_path / "other_data", "experiment.seed=0"))  # other images
    assert a != recipe_family(tiny_recipe(tmp_path, "optim.lr=0.123"))


def test_spread_over_the_finished_runs_of_one_family_and_this_run():
    from medtricks.run.seed_spread import seed_spread, spread_report

    store = _Store(
        [
            _record("a", 0, _binary(0.30, 0.90, 0.70)),
            _record("b", 1, _binary(0.10, 0.99, 0.50)),  # an older run of seed 1 ...
            _record("c", 1, _binary(0.20, 0.95, 0.60)),  # ... the newest one wins
            _record("x", 3, _binary(0.90, 0.10, 0.10), family="other"),
            _record("y", 4, _binary(0.90, 0.10, 0.10), status="FAILED"),
            _record("me", 2, _binary(0.99, 0.0, 0.0), status="RUNNING"),
        ]
    )
    spread = seed_spread(
        store,
        "e",
        "fam",
        current_seed=2,
        current_metrics=_binary(0.40, 0.85, 0.80),
        classes=["normal", "pneumonia"],
        has_op=True,
        exclude_run_id="me",
    )
    assert spread.seeds == [0, 1, 2] and spread.split == "test"
    assert spread.values["threshold (stored)"] == pytest.approx([0.30, 0.20, 0.40])
    assert spread.values["specificity/pneumonia"] == pytest.approx([0.70, 0.60, 0.80])
    text = spread_report(spread)
    assert "over 3 seeds of this recipe (0, 1, 2)" in text and "at the stored operating point" in text
    # mean and t-interval of the thresholds: 0.3 +- t(0.975, 2) * 0.1 / sqrt(3)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert f"0.3000 [{0.3 - half:.4f}, {0.3 + half:.4f}]" in text
    assert "(seeds 0.200-0.400)" in text


def test_a_metric_missing_from_one_seed_leaves_its_row_out_and_one_seed_says_how_to_get_more():
    from medtricks.run.seed_spread import seed_spread, spread_report

    old = _binary(0.3, 0.9, 0.7)
    del old["best/op/threshold"]  # a run from before the threshold was logged
    spread = seed_spread(
        _Store([_record("a", 0, old)]),
        "e",
        "fam",
        current_seed=1,
        current_metrics=_binary(0.4, 0.8, 0.8),
        classes=["normal", "pneumonia"],
        has_op=True,
    )
    assert "threshold (stored)" not in spread.values and "accuracy" in spread.values
    alone = seed_spread(
        _Store([]), "e", "fam", current_seed=5, current_metrics=_binary(0.4, 0.8, 0.8), classes="ab", has_op=True
    )
    assert "experiment.seed=6" in spread_report(alone)


def test_two_seeds_of_a_binary_recipe_print_their_spread_and_a_dead_store_costs_one_line(
    tiny_recipe, binary_phantom_card, tmp_path, capsys
):
    from medtricks.data import synthesize_phantoms
    from medtricks.run import run_recipe
    from medtricks.run.seed_spread import say_seed_spread

    synthesize_phantoms(tmp_path / "phantoms", n=48, classes=("normal", "pneumonia"), size=32, seed=0)
    card = binary_phantom_card(tmp_path)

    def recipe(seed):
        return tiny_recipe(
            tmp_path,
            "data.synth=null",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
            "train.epochs=1",
            "schedule.warmup_epochs=0",
            f"data.card={card}",
            f"experiment.seed={seed}",
        )

    run_recipe(recipe(0))
    assert "one seed of this recipe so far (0)" in capsys.readouterr().out
    result = run_recipe(recipe(1))
    out = capsys.readouterr().out
    assert "over 2 seeds of this recipe (0, 1), test split" in out
    assert "specificity/pneumonia" in out and "threshold (stored)" in out

    class Dead:
        run_id = None

        def search_runs(self, *args, **kwargs):
            raise ConnectionError("tracking server went away")

    from medtricks.run.finish import FinalEvaluation

    lines = []
    final = FinalEvaluation(logged={"best/test/auroc": 0.5})
    assert say_seed_spread(recipe(1), Dead(), lines.append, final, ["normal", "pneumonia"]) is None
    assert len(lines) == 1 and "could not be searched (ConnectionError" in lines[0]
    assert result.run_dir.exists()


def test_quiet_runs_do_not_search_the_store_for_a_spread(tiny_recipe, tmp_path, monkeypatch):
    """A quiet run (benchmarks, ablation children run quietly) prints nothing, so it must not pay for the search."""
    import medtricks.run as run_module

    calls = []
    monkeypatch.setattr(run_module, "say_seed_spread", lambda *args, **kwargs: calls.append(args))
    run_module.run_recipe(tiny_recipe(tmp_path, "train.epochs=1", "schedule.warmup_epochs=0"), quiet=True)
    assert calls == []
    run_module.run_recipe(tiny_recipe(tmp_path, "train.epochs=1", "schedule.warmup_epochs=0", "experiment.seed=1"))
    assert len(calls) == 1
