"""The fixed lung field of a centred frontal chest film, and an augmentation that hides what lies outside it.

One home for the lung field that the shortcut audit probes (:mod:`medtricks.audit.shortcut`) and the
``cxr_lungfield`` augmentation preset trains against: two ellipses centred at 30 % and 70 % of the width
and 50 % of the height, semi-axes 17 % of the width and 30 % of the height (about 32 % of the image). It is
fixed and documented, not segmented: no lung segmentation model ships offline here.

Why an augmentation: COVID-19 collections gather their classes from different sources, and a model can
score by reading the source -- text and laterality markers, borders, collimation, the abdomen's exposure --
instead of the lungs (DeGrave et al., Nature Machine Intelligence 2021). :class:`OutsideLungErasing`
fills, at random, either everything outside a randomly widened lung field or bands along the image's
edges with one random grey, so those cues stop being reliable during training; the lungs are never touched.

    >>> lung_field_mask(4, 8).astype(int).tolist()[1]
    [0, 1, 1, 0, 0, 1, 1, 0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["lung_field_mask", "OutsideLungErasing", "LUNG_CENTRES_X", "LUNG_CENTRE_Y", "LUNG_SEMI_AXES"]  # noqa: F822 - OutsideLungErasing via __getattr__

LUNG_CENTRES_X = (0.30, 0.70)  # fractions of the width
LUNG_CENTRE_Y = 0.50  # fraction of the height
LUNG_SEMI_AXES = (0.17, 0.30)  # (x: fraction of the width, y: fraction of the height)


def lung_field_mask(height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """The fixed lung field as a boolean ``(height, width)`` mask; ``scale`` widens (> 1) both ellipses."""
    yy, xx = np.mgrid[0:height, 0:width]
    y, x = (yy + 0.5) / height, (xx + 0.5) / width
    ax, ay = LUNG_SEMI_AXES[0] * scale, LUNG_SEMI_AXES[1] * scale
    mask = np.zeros((height, width), dtype=bool)
    for cx in LUNG_CENTRES_X:
        mask |= ((x - cx) / ax) ** 2 + ((y - LUNG_CENTRE_Y) / ay) ** 2 <= 1.0
    return mask


def _define_outside_lung_erasing():
    # albumentations takes a second to import: the class is defined on first use, not on import.
    import albumentations as A

    class OutsideLungErasing(A.ImageOnlyTransform):
        """Albumentations transform: hide the image outside the lung field, or along its edges, with one grey.

        With probability ``p`` one of two erasures is drawn (``outside_share`` of the time the first):

        - *outside the lung field*: every pixel outside :func:`lung_field_mask` widened by a factor drawn from
          ``scale_range`` (so some context survives, and a crop that moved the lungs a little does not cut them);
        - *edge bands*: each edge, with probability 1/2, loses a band of up to ``max_band`` of the side (where
          text, markers and film edges sit); at least one edge is chosen.

        The grey is drawn uniformly from ``fill_range`` (images in [0, 1]); one grey per image, so no per-pixel
        noise becomes a new cue. Randomness comes from albumentations' own generator (seeded by the pipeline).
        """

        def __init__(
            self,
            scale_range: tuple[float, float] = (1.0, 1.4),
            max_band: float = 0.15,
            outside_share: float = 0.5,
            fill_range: tuple[float, float] = (0.0, 1.0),
            p: float = 0.5,
        ):
            super().__init__(p=p)
            lo, hi = (float(v) for v in scale_range)
            if not 0.5 <= lo <= hi:
                raise ValueError(f"scale_range={scale_range}: expected 0.5 <= low <= high")
            if not 0.0 < max_band < 0.5:
                raise ValueError(f"max_band={max_band}: expected a fraction of the side in (0, 0.5)")
            if not 0.0 <= outside_share <= 1.0:
                raise ValueError(f"outside_share={outside_share}: expected a probability in [0, 1]")
            self.scale_range, self.max_band, self.outside_share = (lo, hi), float(max_band), float(outside_share)
            self.fill_range = tuple(float(v) for v in fill_range)

        def get_params(self) -> dict[str, Any]:
            rng = self.py_random
            params: dict[str, Any] = {"fill": rng.uniform(*self.fill_range)}
            if rng.random() < self.outside_share:
                params["scale"] = rng.uniform(*self.scale_range)
                params["bands"] = None
            else:
                edges = [rng.random() < 0.5 for _ in range(4)]
                if not any(edges):
                    edges[rng.randrange(4)] = True
                params["scale"] = None
                params["bands"] = tuple(rng.uniform(0.02, self.max_band) if on else 0.0 for on in edges)
            return params

        def apply(self, img: np.ndarray, fill: float = 0.5, scale=None, bands=None, **_: Any) -> np.ndarray:
            height, width = img.shape[:2]
            hidden = np.zeros((height, width), dtype=bool)
            if scale is not None:
                hidden = ~lung_field_mask(height, width, scale)
            else:
                top, bottom, left, right = (int(round(b * s)) for b, s in zip(bands, (height, height, width, width)))
                hidden[:top] = True
                hidden[height - bottom :] = True
                hidden[:, :left] = True
                hidden[:, width - right :] = True
            out = img.copy()
            out[hidden] = np.asarray(fill, dtype=img.dtype)
            return out

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("scale_range", "max_band", "outside_share", "fill_range")

    return OutsideLungErasing


def __getattr__(name: str):
    if name == "OutsideLungErasing":
        value = _define_outside_lung_erasing()
        globals()[name] = value  # cache: later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
