"""Seeds until the answer is clear: group-sequential *repeated confidence intervals* for paired Δs.

``medtricks ablate ... --until-ci W --max-seeds N`` trains seeds in rounds and looks at the paired
differences (variant − baseline, one per seed) after each round. It stops when, for every variant,
the 95 % interval of Δ is narrower than ±W or excludes 0 — or when N seeds are reached.

Looking after every round and stopping when the interval looks good would make an ordinary
t-interval too narrow (optional stopping). The intervals here are **repeated confidence intervals**
(RCIs; Jennison & Turnbull 1989, *J. R. Stat. Soc. B* 51:305, and *Group Sequential Methods*, 2000,
ch. 9): at look ``k`` with ``n_k`` paired seeds,

    Δ̄_k ± c_k · s_k / √n_k,

where the critical values ``c_1 .. c_K`` come from a group-sequential boundary for the **fixed look
schedule** ``n_1 < n_2 < ... < n_K = N`` (known before the first seed trains: ``--seeds`` for the first
round, then ``--seed-step`` more per round). They are chosen so that, for normal differences,
P(Δ is inside the interval at *every* look) = 1 − α. Because the guarantee holds jointly over all
looks, the interval reported at whatever look the rule stops at covers Δ with probability at least
1 − α, for *any* stopping rule (the width rule and the excludes-0 rule included).

Boundaries (``boundary=``):

* ``pocock`` (default): the same nominal level at every look (``z_k = C``; C = 2.413 for five equally
  spaced looks at α = 0.05). Early intervals are usable, the last one is wider than a fixed-n one.
* ``obrien_fleming``: ``z_k = C·√(N / n_k)`` (C = 2.040 for five looks): very wide early, close to the
  fixed-n interval at N. Prefer it when you expect to run to N anyway.

The normal boundary is computed by numerical integration of the Brownian-motion crossing
probabilities (Armitage, McPherson & Rowe 1969). Seed variance is unknown and ``n_k`` is small, so
each ``z_k`` is carried over to Student's t at the same nominal significance level, ``c_k =
t_{n_k−1}^{−1}(Φ(z_k))`` (Jennison & Turnbull 2000, §3.8 / §9.2). The coverage of the reported interval
under this stopping rule is checked by simulation in ``tests/ablation/test_sequential_seeds.py``.

The coverage is per comparison (each variant vs the baseline); with several variants it is not
family-wise. Everything here is pure numpy/scipy: no training.

Example::

    >>> from medtricks.ablation.sequential import look_schedule, critical_values
    >>> look_schedule(3, 12)
    [3, 6, 9, 12]
    >>> [round(z, 3) for z in critical_values([5, 10, 15, 20, 25], kind="pocock", df=False)]
    [2.413, 2.413, 2.413, 2.413, 2.413]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import optimize, stats

from medtricks.errors import ConfigError

__all__ = [
    "BOUNDARIES",
    "look_schedule",
    "critical_values",
    "repeated_ci",
    "SequentialLook",
    "sequential_look",
    "run_sequence",
]

BOUNDARIES = ("pocock", "obrien_fleming")
_GRID = 801  # points per look in the numerical integration (odd: Simpson's rule)


def look_schedule(first: int, max_seeds: int, step: Optional[int] = None) -> list[int]:
    """The seeds counts at which the rule looks: ``first``, ``first + step``, ... and ``max_seeds`` last.

    ``step`` defaults to ``first``. Fixed before any seed trains (what makes the boundary valid).

    >>> look_schedule(4, 10, 3)
    [4, 7, 10]
    """
    for name, value in (("first", first), ("max_seeds", max_seeds)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    if first < 2:
        raise ConfigError(f"the first round needs at least 2 seeds (an interval needs a spread), got seeds={first}")
    if max_seeds < first:
        raise ConfigError(f"max_seeds ({max_seeds}) must be >= the first round's seeds ({first})")
    step = first if step is None else step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ConfigError(f"seed_step must be an int >= 1, got {step!r}")
    looks = list(range(int(first), int(max_seeds), int(step)))
    return [*looks, int(max_seeds)]


def _simpson_weights(n: int, h: float) -> np.ndarray:
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * h / 3.0


def _no_crossing_probability(z: np.ndarray, t: np.ndarray) -> float:
    """P(|B(t_k)| / √t_k < z_k for every k) for standard Brownian motion B (recursive integration)."""
    bounds = z * np.sqrt(t)
    x = np.linspace(-bounds[0], bounds[0], _GRID)
    w = _simpson_weights(_GRID, x[1] - x[0])
    density = stats.norm.pdf(x, scale=math.sqrt(t[0]))
    for k in range(1, len(t)):
        sd = math.sqrt(t[k] - t[k - 1])
        y = np.linspace(-bounds[k], bounds[k], _GRID)
        kernel = stats.norm.pdf((y[None, :] - x[:, None]) / sd) / sd
        density = (w * density) @ kernel
        x, w = y, _simpson_weights(_GRID, y[1] - y[0])
    return float(np.sum(w * density))


@functools.lru_cache(maxsize=256)
def _normal_boundary(looks: tuple[int, ...], alpha: float, kind: str) -> tuple[float, ...]:
    t = np.asarray(looks, dtype=float) / looks[-1]
    shape = np.ones_like(t) if kind == "pocock" else 1.0 / np.sqrt(t)
    if len(t) == 1:
        return (float(stats.norm.ppf(1 - alpha / 2)),)
    target = 1.0 - alpha
    c = optimize.brentq(lambda c: _no_crossing_probability(c * shape, t) - target, 1.0, 10.0, xtol=1e-6)
    return tuple(float(v) for v in c * shape)


def critical_values(looks: Sequence[int], *, ci: float = 0.95, kind: str = "pocock", df: bool = True) -> list[float]:
    """The critical value ``c_k`` of each look: ``Δ̄ ± c_k · s / √n_k`` is the repeated CI.

    ``df=False`` gives the normal (known-variance) boundary ``z_k``; ``df=True`` carries each to
    Student's t with ``n_k − 1`` degrees of freedom at the same nominal level.
    """
    if kind not in BOUNDARIES:
        raise ConfigError(f"boundary must be one of {', '.join(BOUNDARIES)}, got {kind!r}")
    if not (0.0 < float(ci) < 1.0):
        raise ConfigError(f"ci must be strictly between 0 and 1, got {ci!r}")
    looks = tuple(int(n) for n in looks)
    if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 2:
        raise ConfigError(f"looks must be increasing seed counts >= 2, got {list(looks)}")
    return list(_boundary(looks, round(1.0 - float(ci), 12), kind, bool(df)))


@functools.lru_cache(maxsize=256)
def _boundary(looks: tuple[int, ...], alpha: float, kind: str, df: bool) -> tuple[float, ...]:
    z = _normal_boundary(looks, alpha, kind)
    if not df:
        return z
    return tuple(float(stats.t.ppf(stats.norm.cdf(zk), df=n - 1)) for zk, n in zip(z, looks))


def repeated_ci(
    diffs: Sequence[float], looks: Sequence[int], *, ci: float = 0.95, kind: str = "pocock"
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the paired differences at the look where ``len(diffs)`` seeds are in.

    ``len(diffs)`` must be one of ``looks`` (the schedule fixed in advance).
    """
    d = np.asarray(diffs, dtype=float)
    looks = [int(n) for n in looks]
    if d.ndim != 1 or d.size not in looks:
        raise ConfigError(f"{d.size} paired differences is not one of the scheduled looks {looks}")
    if not np.all(np.isfinite(d)):
        raise ConfigError("paired differences must be finite")
    c = critical_values(looks, ci=ci, kind=kind)[looks.index(d.size)]
    mean = float(d.mean())
    half = c * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


@dataclass
class SequentialLook:
    """The decision at one look: the repeated CI of every variant and whether to stop."""

    n_seeds: int
    look: int  # 1-based
    n_looks: int
    stop: bool
    reason: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> mean, low, high, half_width, clear

    def describe(self) -> str:
        return f"look {self.look}/{self.n_looks} at {self.n_seeds} seeds: {self.reason}"


def sequential_look(
    diffs: Mapping[str, Sequence[float]], looks: Sequence[int], *, width: float, ci: float = 0.95, kind: str = "pocock"
) -> SequentialLook:
    """Decide at one look: stop when every variant's repeated CI has half-width ≤ ``width`` or excludes 0,
    or when this is the last look.

    Args:
        diffs: variant -> its paired differences (variant − baseline), one per seed, all of length ``n_k``.
        looks: the fixed look schedule (:func:`look_schedule`).
        width: the wanted half-width ``W`` (stop once ``±W`` or narrower), on the metric's scale.
    """
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0 and math.isfinite(width)):
        raise ConfigError(f"until_ci (the wanted half-width W of every Δ interval) must be a number > 0, got {width!r}")
    looks = [int(n) for n in looks]
    if not diffs:
        raise ConfigError("no variant to compare with the baseline")
    sizes = {len(v) for v in diffs.values()}
    if len(sizes) != 1:
        raise ConfigError(f"every variant needs the same number of paired seeds at a look, got {sorted(sizes)}")
    n = sizes.pop()
    rows = {}
    for name, values in diffs.items():
        mean, low, high = repeated_ci(values, looks, ci=ci, kind=kind)
        half = (high - low) / 2
        rows[name] = {
            "mean": mean,
            "low": low,
            "high": high,
            "half_width": half,
            "narrow": bool(half <= width),
            "excludes_zero": bool(low > 0 or high < 0),
        }
    open_ = [name for name, r in rows.items() if not (r["narrow"] or r["excludes_zero"])]
    look = looks.index(n) + 1
    if not open_:
        reason = f"every Δ interval is within ±{width:g} or excludes 0"
    elif look == len(looks):
        reason = f"max seeds ({n}) reached; still unclear: {', '.join(open_)}"
    else:
        reason = f"unclear: {', '.join(open_)}; next look at {looks[look]} seeds"
    return SequentialLook(
        n_seeds=n, look=look, n_looks=len(looks), stop=not open_ or look == len(looks), reason=reason, rows=rows
    )


def run_sequence(
    diffs: Mapping[str, Sequence[float]], looks: Sequence[int], *, width: float, ci: float = 0.95, kind: str = "pocock"
) -> SequentialLook:
    """Replay the rule on fully known differences (N each): the look at which it stops and its intervals.

    What :func:`medtricks.ablation.run_ablation` does round by round, for simulations and tests.
    """
    for n in looks:
        decision = sequential_look({k: list(v)[:n] for k, v in diffs.items()}, looks, width=width, ci=ci, kind=kind)
        if decision.stop:
            return decision
    raise AssertionError("the last look always stops")  # pragma: no cover
