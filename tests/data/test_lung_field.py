"""The lung field's one home and the ``cxr_lungfield`` preset (issue 35): the lungs are never erased, what lies
outside them or along the edges is, with one grey per image; reproducible under Python's seed; the shortcut
audit uses the same field."""

from __future__ import annotations

import random

import numpy as np
import pytest

from medtricks.audit import shortcut
from medtricks.data.lung_field import OutsideLungErasing, lung_field_mask
from medtricks.data.transforms import PRESETS, build_transforms


def _ramp(size=64) -> np.ndarray:
    return np.tile(np.linspace(0.05, 0.95, size, dtype=np.float32), (size, 1))[..., None]


def test_mask_area_widening_and_audit_share_one_field():
    base = lung_field_mask(200, 200)
    assert 0.28 < base.mean() < 0.36  # about 32 % of the image, as documented
    wide = lung_field_mask(200, 200, scale=1.3)
    assert wide.mean() > base.mean() and not (base & ~wide).any()  # widening only adds
    assert shortcut.lung_field_mask is lung_field_mask


@pytest.mark.parametrize("seed", range(6))
def test_erasing_never_touches_the_lungs_and_fills_one_grey(seed):
    op = OutsideLungErasing(p=1.0)
    op.set_random_seed(seed)
    img = _ramp()
    out = op(image=img)["image"]
    lungs = lung_field_mask(64, 64)
    assert np.array_equal(out[lungs], img[lungs])
    changed = ~np.isclose(out[..., 0], img[..., 0])
    assert changed.any() and not (changed & lungs).any()
    assert len(np.unique(out[..., 0][changed])) == 1  # one grey, no per-pixel noise


def test_both_erasures_happen_outside_and_edge_bands():
    op = OutsideLungErasing(p=1.0)
    kinds = set()
    for seed in range(40):
        op.set_random_seed(seed)
        params = op.get_params()
        kinds.add("outside" if params["bands"] is None else "bands")
        if params["bands"] is not None:
            assert any(b > 0 for b in params["bands"]) and all(b <= 0.15 for b in params["bands"])
        else:
            assert 1.0 <= params["scale"] <= 1.4
    assert kinds == {"outside", "bands"}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_band"):
        OutsideLungErasing(max_band=0.7)
    with pytest.raises(ValueError, match="scale_range"):
        OutsideLungErasing(scale_range=(1.4, 1.0))


def test_preset_is_reproducible_and_erases_about_half_the_images():
    assert "cxr_lungfield" in PRESETS
    t = build_transforms("cxr_lungfield", 48, mean=(0.5,), std=(0.5,), in_chans=3, train=True)
    img = np.full((56, 56), 0.4, np.float32)
    random.seed(3)
    first = [t(img) for _ in range(40)]
    random.seed(3)
    again = [t(img) for _ in range(40)]
    assert all((a == b).all() for a, b in zip(first, again))
    last = t.pipeline.transforms[-1]  # cxr_light's geometry first, then the erasing on half of the images
    assert isinstance(last, OutsideLungErasing) and last.p == 0.5
    ev = build_transforms("cxr_lungfield", 48, mean=(0.5,), std=(0.5,), in_chans=1, train=False)
    assert np.allclose(ev(img).numpy(), (0.4 - 0.5) / 0.5)  # evaluation never erases
