"""Layout of medtricks.models / medtricks.audit after the split: names stay where they were
importable, modules stay small and cheap to import, errors derive from MedtricksError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medtricks.errors import MedtricksError

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 550


@pytest.mark.parametrize("path", sorted((ROOT / "medtricks" / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_modules_stay_small(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it"


def test_weights_still_exports_the_state_dict_helpers():
    from medtricks.models import state_dict, weights

    for name in (
        "parse_file_spec",
        "read_state_dict",
        "normalize_state_dict",
        "default_key_map",
        "map_lite_state_dict",
    ):
        assert getattr(weights, name) is getattr(state_dict, name)
        assert name in weights.__all__
    for name in weights.__all__:
        assert hasattr(weights, name), name


def test_backbones_still_exports_names_and_layout():
    from medtricks.models import backbones, layout, model_names as names

    assert backbones.resolve_model_name is names.resolve_model_name
    assert backbones.ALIASES is names.ALIASES and backbones.MONAI_ARCHS is names.MONAI_ARCHS
    assert backbones.stage_of_parameter is layout.stage_of_parameter
    assert backbones.find_backbone is layout.find_backbone
    for name in backbones.__all__:
        assert hasattr(backbones, name), name


def test_package_exports_resolve():
    import medtricks.models as models

    for name in models.__all__:
        assert getattr(models, name) is not None, name
    assert models.stage_of_parameter is models.backbones.stage_of_parameter


def test_weights_zoo_imports_without_torch():
    code = (
        "import sys; import medtricks.models.weights, medtricks.models.state_dict, medtricks.models.model_names; "
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _error_classes():
    from medtricks.audit.adversarial import PerturbationBudgetError
    from medtricks.data.errors import BadImageError, CardError, DataError, LeakageError, ManifestError
    from medtricks.models.weights import WeightsUnavailableError
    from medtricks.train.engine import NonFiniteLossError

    user_errors = [
        (DataError, ValueError),
        (CardError, ValueError),
        (BadImageError, ValueError),
        (ManifestError, ValueError),
        (LeakageError, ValueError),
        (WeightsUnavailableError, FileNotFoundError),
        (NonFiniteLossError, RuntimeError),
    ]
    return user_errors, PerturbationBudgetError


def test_user_errors_are_medtricks_errors_and_keep_their_builtin():
    user_errors, _ = _error_classes()
    for cls, builtin in user_errors:
        assert issubclass(cls, MedtricksError) and issubclass(cls, builtin), cls


def test_error_messages_and_attributes_unchanged():
    from medtricks.data.errors import BadImageError, LeakageError
    from medtricks.models.weights import WeightsUnavailableError

    err = BadImageError("/x/a.png", "truncated")
    assert str(err) == "/x/a.png: truncated" and err.path == "/x/a.png" and err.problem == "truncated"
    leak = LeakageError("same patient", ["a", "b"])
    assert str(leak) == "same patient" and leak.files == ["a", "b"]
    assert str(WeightsUnavailableError("put it at /p")) == "put it at /p"
    with pytest.raises(FileNotFoundError):
        raise WeightsUnavailableError("x")


def test_perturbation_budget_error_is_a_bug_not_a_user_error():
    _, budget = _error_classes()
    assert issubclass(budget, AssertionError) and not issubclass(budget, MedtricksError)


def test_audit_uses_the_evaluate_auroc():
    from medtricks.audit import scoring as runner
    from medtricks.evaluate import metrics

    assert runner._auroc is metrics._auroc
