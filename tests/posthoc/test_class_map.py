"""Issue 16 item 3: score a model on a dataset whose class names differ (--class-map), with clear errors
for unmapped classes and a note (not a silent nan) when the mapped set holds one class only."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from medtricks.cli import main
from medtricks.data.class_map import apply_class_map, parse_class_map, resolve_class_map
from medtricks.errors import ConfigError
from medtricks.posthoc import evaluate_trained

ROOT = Path(__file__).resolve().parents[2]


def _other_site_card(tmp_path) -> Path:
    """The phantoms described as another site would: classes 'healthy' / 'infection'."""
    card = yaml.safe_load((ROOT / "data_cards" / "synthetic-phantoms.yaml").read_text())
    card.update(
        name="other-site",
        task="binary",
        classes=["healthy", "infection"],
        label_map={"normal": "healthy", "bacterial": "infection", "covid": "infection"},
    )
    path = tmp_path / "other-site.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def test_parse_and_resolve_the_map():
    assert parse_class_map("covid=pneumonia, normal=normal") == {"covid": "pneumonia", "normal": "normal"}
    with pytest.raises(ConfigError, match="not CARD_CLASS=MODEL_CLASS"):
        parse_class_map("covid")
    model = ["normal", "pneumonia"]
    card = ["covid", "pneumonia", "normal"]
    assert resolve_class_map("c", card, model, {"covid": "pneumonia"}) == {
        "covid": "pneumonia",
        "pneumonia": "pneumonia",
        "normal": "normal",
    }  # same names map to themselves
    with pytest.raises(ConfigError, match=r"classes \['covid'\] are not mapped"):
        resolve_class_map("c", card, model, {"normal": "normal"})
    with pytest.raises(ConfigError, match=r"--class-map covid=pneumonia,pneumonia=pneumonia,normal=normal"):
        resolve_class_map("c", card, model, None)  # no map and different classes: the error shows one
    with pytest.raises(ConfigError, match=r"targets \['viral'\] are not classes of the model"):
        resolve_class_map("c", card, model, {"covid": "viral"})
    with pytest.raises(ConfigError, match=r"names \['sars'\], which card 'c' does not have"):
        resolve_class_map("c", card, model, {"sars": "pneumonia"})
    manifest = pd.DataFrame({"label": ["covid", "normal", "pneumonia", "covid"], "target": [0, 2, 1, 0]})
    kept, dropped = apply_class_map(manifest, {"covid": "drop", "normal": "normal", "pneumonia": "pneumonia"}, model)
    assert kept["target"].tolist() == [0, 1] and dropped == {"covid": 2}


def test_evaluate_on_another_sites_classes(trained_run, tmp_path):
    result, uri, tmp = trained_run
    card = _other_site_card(tmp_path)
    with pytest.raises(ConfigError, match="map them with --class-map"):
        evaluate_trained(str(result.run_dir), card=str(card), root=str(tmp / "phantoms"), log=False, progress=False)
    report = evaluate_trained(
        str(result.run_dir),
        card=str(card),
        root=str(tmp / "phantoms"),
        log=False,
        progress=False,
        n_bootstrap=0,
        class_map="healthy=normal,infection=covid",
    )
    assert set(np.unique(report.y_true)) <= {0, 2}  # indices of the model's classes normal, covid
    assert any("healthy -> normal" in note for note in report.notes)


def test_a_one_class_set_says_which_metrics_are_undefined(trained_run, tmp_path, capsys):
    result, uri, tmp = trained_run
    card = _other_site_card(tmp_path)
    code = main(
        [
            "evaluate",
            str(result.run_dir),
            "--card",
            str(card),
            "--root",
            str(tmp / "phantoms"),
            "--class-map",
            "healthy=drop,infection=covid",
            "--n-bootstrap",
            "0",
            "--no-log",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "left out by the class map: healthy" in out
    assert "holds only class 'covid': AUROC" in out


@pytest.mark.parametrize("text", [",,,", "", " , ", "covid=pneumonia,,normal=normal"])
def test_a_class_map_without_entries_is_refused(text):
    from medtricks.data.class_map import parse_class_map

    with pytest.raises(ConfigError, match="--class-map"):
        parse_class_map(text)
    assert parse_class_map(None) == {}


@pytest.mark.slow
def test_commands_without_a_class_map_do_not_advise_one(untracked_binary_run, tmp_path):
    from medtricks.data import synthesize_phantoms
    from medtricks.posthoc import eval_dataset
    from medtricks.posthoc.load import load_trained

    result, _, _ = untracked_binary_run
    synthesize_phantoms(tmp_path / "three", n=12, size=32, seed=3)
    trained = load_trained(str(result.run_dir))
    with pytest.raises(ConfigError, match="--class-map CARD_CLASS=MODEL_CLASS"):  # evaluate: its own option
        eval_dataset(trained, "synthetic-phantoms", tmp_path / "three", progress=False)
    with pytest.raises(ConfigError, match="model's classes only") as err:  # audit, ensemble: none
        eval_dataset(trained, "synthetic-phantoms", tmp_path / "three", progress=False, class_map_option=None)
    assert "map them with" not in str(err.value)
