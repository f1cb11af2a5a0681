"""The public API in ``medtricks/__init__.py``: every name resolves and says what it does."""

import pytest

import medtricks


@pytest.mark.parametrize("name", [n for n in medtricks.__all__ if n != "__version__"])
def test_public_name_resolves_with_a_docstring(name):
    obj = getattr(medtricks, name)
    assert (getattr(obj, "__doc__", None) or "").strip(), f"medtricks.{name} has no docstring"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        medtricks.no_such_thing  # noqa: B018
