"""The deployment site (issue 30): the Kermany patient key, site calibration profiles, unlabelled
adaptation (EM prior, AdaBN, TENT). Small synthetic data and tiny models only."""
from __future__ import annotations

import re

import pytest


# ------------------------------------------------------------------------------ the patient key
def _kermany_key(name: str, card: str = "kermany-pneumonia") -> str:
    from medtricks.data import load_card

    m = re.search(load_card(card).patient.regex, name)
    assert m is not None, name
    return m.group("patient")


@pytest.mark.parametrize("card", ["kermany-pneumonia", "kermany-pneumonia-3class"])
def test_kermany_patient_key_is_person_number_and_subtype(card):
    # Kermany numbers pneumonia patients per sub-type: person12_bacteria and person12_virus are two children
    assert _kermany_key("person12_bacteria_46.jpeg", card) == "person12_bacteria"
    assert _kermany_key("person12_bacteria_47.jpeg", card) == "person12_bacteria"
    assert _kermany_key("person12_virus_1.jpeg", card) == "person12_virus"
    assert _kermany_key("person447_virus_921_1.jpeg", card) == "person447_virus"
    assert _kermany_key("IM-0115-0001.jpeg", card) == "IM-0115"
    assert _kermany_key("NORMAL2-IM-0115-0001.jpeg", card) == "NORMAL2-IM-0115"
    assert _kermany_key("IM-0429-0001-0002.jpeg", card) == "IM-0429"
