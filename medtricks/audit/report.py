"""The audit result: MLflow-ready metrics, a JSON report, a terminal table and PNG figures.

:class:`AuditResult` holds plain numbers (every metric with its bootstrap CI) and a few example
images; :func:`corruption_error` compares it with a baseline run's result ImageNet-C style.
Figures are built on the Agg canvas without pyplot (``medtricks.evaluate.plots``' figure helper): no
display needed, nothing kept alive by pyplot's registry.

Metric keys (``AuditResult.metrics``)::

    audit/clean/<metric>                              accuracy, auroc, sensitivity/<class>, ...
    audit/<attack>/eps_<eps:.4f>/<metric>             + attack_success_rate
    audit/corrupt/<name>/<severity>/<metric>          accuracy, auroc
    audit/corrupt/mean/{accuracy,auroc}               mean over every corruption and severity
    audit/corrupt/relative_drop/{accuracy,auroc}      (clean - mean) / clean

and ``<key>_ci_low`` / ``<key>_ci_high`` for each of them. A targeted audit names its attacks
``<attack>_to_<class>`` (e.g. ``pgd_linf_to_pneumonia``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from medtricks.errors import ConfigError

__all__ = ["AuditResult", "AuditExamples", "corruption_error", "metric_key", "safe_name", "eps_label"]

_JSON_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow metric names: alnum, _ - . space /


def safe_name(name: str) -> str:
    """A class or attack name made safe as *one* part of an MLflow metric key (``/``, ``=``, ``(``
    ... become ``_``).

    >>> safe_name("viral (covid/sars)")
    'viral _covid_sars_'
    """
    return _UNSAFE.sub("_", str(name)).replace("/", "_")


def metric_key(*parts: str) -> str:
    """Join key parts with ``/``; characters MLflow rejects become ``_``.

    >>> metric_key("audit", "pgd_linf", eps_label(1 / 255), "accuracy")
    'audit/pgd_linf/eps_0.0039/accuracy'
    """
    return "/".join(_UNSAFE.sub("_", str(p)) for p in parts)


def eps_label(eps: float) -> str:
    """``eps_<eps:.4f>``, the ε part of a metric key (``1/255`` -> ``eps_0.0039``)."""
    return f"eps_{eps:.4f}"


@dataclass
class AuditExamples:
    """A few images of one attack at its largest ε, for the examples figure (not in the JSON)."""

    attack: str
    eps: float
    clean: np.ndarray  # (k, C, H, W) in [0, 1]
    adversarial: np.ndarray  # (k, C, H, W) in [0, 1]
    labels: np.ndarray  # (k,) true class index
    clean_probs: np.ndarray  # (k, K)
    adversarial_probs: np.ndarray  # (k, K)


@dataclass
class AuditResult:
    """Everything one audit measured (see the module docstring for the metric keys).

    Attributes:
        classes: class names (column order of the model's logits).
        config: how the audit ran: attacks, eps, budgets, n_images, seed, bootstrap settings...
        clean: flat metrics of the unperturbed images (``accuracy``, ``accuracy_ci_low``, ...).
        attacks: attack label -> eps -> flat metrics (incl. ``attack_success_rate``).
        corruptions: corruption name -> severity -> flat metrics (``accuracy``, ``auroc`` + CIs).
        corruption_summary: ``mean/accuracy``, ``mean/auroc``, ``relative_drop/accuracy``,
            ``relative_drop/auroc`` (+ CIs), over all corruptions and severities.
        examples: a few clean/adversarial image pairs, or ``None``.
    """

    classes: list[str]
    config: dict[str, Any]
    clean: dict[str, float]
    attacks: dict[str, dict[float, dict[str, float]]] = field(default_factory=dict)
    corruptions: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    corruption_summary: dict[str, float] = field(default_factory=dict)
    examples: Optional[AuditExamples] = None
    masking: list[dict[str, Any]] = field(default_factory=list)  # gradient-masking checks (check, passed, detail)

    # ---------------------------------------------------------------- metrics / JSON
    @property
    def metrics(self) -> dict[str, float]:
        """Flat ``{key: value}`` for ``tracker.log_metrics`` (undefined values are ``nan``)."""
        out: dict[str, float] = {}
        for name, value in self.clean.items():
            out[metric_key("audit", "clean", name)] = float(value)
        for attack, by_eps in self.attacks.items():
            for eps, values in by_eps.items():
                for name, value in values.items():
                    out[metric_key("audit", attack, eps_label(eps), name)] = float(value)
        for corruption, by_sev in self.corruptions.items():
            for severity, values in by_sev.items():
                for name, value in values.items():
                    out[metric_key("audit", "corrupt", corruption, str(severity), name)] = float(value)
        for name, value in self.corruption_summary.items():
            out["audit/corrupt/" + name] = float(value)
        for check in self.masking:
            out[metric_key("audit", "masking", check["check"].replace(":", "_"), "passed")] = float(check["passed"])
        return out

    def to_json(self, indent: int = 2) -> str:
        """The report as strict JSON (``nan`` becomes ``null``); :meth:`from_json` reads it back."""
        doc = {
            "version": _JSON_VERSION,
            "classes": self.classes,
            "config": self.config,
            "clean": self.clean,
            "attacks": {
                a: [{"eps": eps, **vals} for eps, vals in by_eps.items()] for a, by_eps in self.attacks.items()
            },
            "corruptions": {
                c: [{"severity": s, **vals} for s, vals in by_sev.items()] for c, by_sev in self.corruptions.items()
            },
            "corruption_summary": self.corruption_summary,
            "masking": self.masking,
        }
        return json.dumps(_nan_to_none(doc), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "AuditResult":
        """Rebuild a result (without example images) from :meth:`to_json` output, e.g. a baseline's
        ``audit/report.json`` for :func:`corruption_error`."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"audit report is not valid JSON: {err}") from err
        missing = [
            k
            for k in ("version", "classes", "config", "clean", "attacks", "corruptions", "corruption_summary")
            if k not in doc
        ]
        if missing:
            raise ConfigError(f"audit report lacks key(s) {missing}; expected the output of AuditResult.to_json()")
        if doc["version"] != _JSON_VERSION:
            raise ConfigError(f"audit report version {doc['version']!r} is not supported (expected {_JSON_VERSION})")

        def floats(d: dict) -> dict[str, float]:
            return {k: (math.nan if v is None else float(v)) for k, v in d.items()}

        attacks = {
            a: {float(r["eps"]): floats({k: v for k, v in r.items() if k != "eps"}) for r in rows}
            for a, rows in doc["attacks"].items()
        }
        corruptions = {
            c: {int(r["severity"]): floats({k: v for k, v in r.items() if k != "severity"}) for r in rows}
            for c, rows in doc["corruptions"].items()
        }
        return cls(
            classes=list(doc["classes"]),
            config=dict(doc["config"]),
            clean=floats(doc["clean"]),
            attacks=attacks,
            corruptions=corruptions,
            corruption_summary=floats(doc["corruption_summary"]),
            masking=list(doc.get("masking", [])),
        )

    # ---------------------------------------------------------------- terminal table
    def table(self) -> str:
        """Plain-text summary; every number is followed by its bootstrap CI."""
        level = f"{100 * self.config.get('ci', 0.95):g}% CI"
        lines = [
            f"Robustness audit: n={self.config.get('n_images', '?')} images, classes {self.classes}, "
            f"percentile bootstrap {self.config.get('n_bootstrap', '?')} resamples, [{level}]"
        ]
        lines.append(f"clean: accuracy {_with_ci(self.clean, 'accuracy')}  AUROC {_with_ci(self.clean, 'auroc')}")
        if self.attacks:
            rows = [("attack", "eps", "eps*255", "accuracy", "AUROC", "attack success")]
            for attack, by_eps in self.attacks.items():
                for eps, vals in by_eps.items():
                    rows.append(
                        (
                            attack,
                            f"{eps:.4f}",
                            f"{eps * 255:.3g}",
                            _with_ci(vals, "accuracy"),
                            _with_ci(vals, "auroc"),
                            _with_ci(vals, "attack_success_rate"),
                        )
                    )
            lines += ["", *_align(rows)]
            if self.config.get("notes"):
                lines += [f"  note: {note}" for note in self.config["notes"]]
            for check in self.masking:
                lines.append(
                    f"{'  ok' if check['passed'] else 'WARNING'} gradient-masking check {check['check']}: "
                    f"{check['detail']}"
                )
        if self.corruptions:
            rows = [("corruption", "severity", "accuracy", "AUROC")]
            for name, by_sev in self.corruptions.items():
                for sev, vals in by_sev.items():
                    rows.append((name, str(sev), _with_ci(vals, "accuracy"), _with_ci(vals, "auroc")))
            s = self.corruption_summary
            rows.append(("mean (all)", "", _with_ci(s, "mean/accuracy"), _with_ci(s, "mean/auroc")))
            rows.append(
                ("relative drop", "", _with_ci(s, "relative_drop/accuracy"), _with_ci(s, "relative_drop/auroc"))
            )
            lines += ["", *_align(rows)]
        return "\n".join(lines)

    # ---------------------------------------------------------------- figures
    def figures(self) -> dict[str, Any]:
        """PNG-ready matplotlib figures keyed by artifact path (``audit/accuracy_vs_eps.png``,
        ``audit/auroc_vs_eps.png``, ``audit/corruption_heatmap.png``, ``audit/examples.png``);
        a figure is left out when its part of the audit did not run."""
        figs: dict[str, Any] = {}
        if self.attacks:
            figs["audit/accuracy_vs_eps.png"] = self._vs_eps_figure("accuracy", "Accuracy")
            figs["audit/auroc_vs_eps.png"] = self._vs_eps_figure("auroc", "AUROC")
        if self.corruptions:
            figs["audit/corruption_heatmap.png"] = self._heatmap_figure()
        if self.examples is not None:
            figs["audit/examples.png"] = self._examples_figure()
        return figs

    def _vs_eps_figure(self, metric: str, label: str):
        fig = _new_figure(6.4, 4.2)
        ax = fig.add_subplot()
        for attack, by_eps in self.attacks.items():
            eps = np.array(sorted(by_eps))
            vals = [by_eps[e] for e in eps]
            y = np.array([v.get(metric, math.nan) for v in vals])
            lo = np.array([v.get(f"{metric}_ci_low", math.nan) for v in vals])
            hi = np.array([v.get(f"{metric}_ci_high", math.nan) for v in vals])
            (line,) = ax.plot(eps * 255, y, marker="o", label=attack)
            ax.fill_between(eps * 255, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        clean = self.clean.get(metric, math.nan)
        if math.isfinite(clean):
            ax.axhline(clean, color="0.4", linestyle="--", linewidth=1, label="clean")
        if metric == "auroc":
            ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1, label="chance")
        grid = sorted({e * 255 for by_eps in self.attacks.values() for e in by_eps})
        ax.set_xscale("symlog", linthresh=0.5)  # 0 and 0.5..8 grey levels on one readable axis
        ax.set_xticks(grid, [f"{g:.3g}" for g in grid])
        ax.set_xlim(-0.1, max(grid) * 1.15 if max(grid) > 0 else 1.0)
        ax.set_xlabel("ε (grey levels of 255; L2: per-pixel RMS)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(
            f"{label} under attack (n={self.config.get('n_images', '?')}, "
            f"{100 * self.config.get('ci', 0.95):g}% bootstrap CI)"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    def _heatmap_figure(self):
        names = list(self.corruptions)
        severities = sorted({s for by_sev in self.corruptions.values() for s in by_sev})
        fig = _new_figure(4.0 + 1.1 * len(severities), 1.2 + 0.45 * len(names))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, metric, label in zip(axes, ("accuracy", "auroc"), ("Accuracy", "AUROC")):
            grid = np.array([[self.corruptions[n].get(s, {}).get(metric, math.nan) for s in severities] for n in names])
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for i in range(len(names)):
                for j in range(len(severities)):
                    v = grid[i, j]
                    text = "n/a" if not math.isfinite(v) else f"{v:.2f}"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if not math.isfinite(v) or v < 0.6 else "black",
                    )
            ax.set_xticks(range(len(severities)), [str(s) for s in severities])
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("severity")
            clean = self.clean.get(metric, math.nan)
            ax.set_title(f"{label} (clean {clean:.2f})" if math.isfinite(clean) else label)
        fig.colorbar(image, ax=axes, shrink=0.8)
        return fig

    def _examples_figure(self):
        ex = self.examples
        k = len(ex.labels)
        fig = _new_figure(9.0, 2.7 * k)
        axes = np.atleast_2d(fig.subplots(k, 3))
        gain = 0.5 / ex.eps if ex.eps > 0 else 1.0  # +-eps maps to the full display range
        for row in range(k):
            clean, adv = ex.clean[row], ex.adversarial[row]
            panels = (
                (clean, f"clean\n{self._verdict(ex.labels[row], ex.clean_probs[row])}"),
                (np.clip(0.5 + gain * (adv - clean), 0.0, 1.0), f"perturbation ×{gain:.0f}\n(grey = none)"),
                (
                    adv,
                    f"adversarial, ε={ex.eps * 255:.3g}/255\n{self._verdict(ex.labels[row], ex.adversarial_probs[row])}",
                ),
            )
            for ax, (img, title) in zip(axes[row], panels):
                ax.imshow(_display(img), cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_title(title, fontsize=8)
                ax.set_axis_off()
        fig.suptitle(f"{ex.attack} at ε={ex.eps:.4f}: true class → prediction (probability)", fontsize=9)
        return fig

    def _verdict(self, label: int, probs: np.ndarray) -> str:
        pred = int(np.argmax(probs))
        mark = "✓" if pred == int(label) else "✗"
        return f"{self.classes[int(label)]} → {self.classes[pred]} ({probs[pred]:.2f}) {mark}"


# ------------------------------------------------------------------------------------ baseline
def corruption_error(result: AuditResult, baseline: AuditResult) -> dict[str, float]:
    """ImageNet-C corruption errors of ``result`` relative to a ``baseline`` audit.

    ``CE_c = sum_s err(c, s) / sum_s err_base(c, s)`` per corruption ``c`` (err = 1 - accuracy),
    ``mCE`` = mean of ``CE_c``, and the relative mCE that first subtracts each model's clean error.
    Below 1 means more robust than the baseline. Where neither model makes an error the ratio is
    1; where only the baseline makes none it is ``inf``. Both audits must cover the same corruptions
    and severities.

    Returns keys ``audit/corrupt/ce/<name>``, ``audit/corrupt/mce``, ``audit/corrupt/relative_mce``.

    >>> corruption_error(trick_run_audit, AuditResult.from_json(baseline_report_text))
    """
    if set(result.corruptions) != set(baseline.corruptions):
        raise ConfigError(
            f"result and baseline audited different corruptions: {sorted(result.corruptions)} vs "
            f"{sorted(baseline.corruptions)}; audit both with the same corruptions"
        )
    if not result.corruptions:
        raise ConfigError(
            "no corruptions were audited: run the audit with corruptions=('all',) to compare with a baseline"
        )
    out: dict[str, float] = {}
    ces, rel = [], []
    clean_err = 1.0 - result.clean["accuracy"]
    base_clean_err = 1.0 - baseline.clean["accuracy"]
    for name, by_sev in result.corruptions.items():
        if set(by_sev) != set(baseline.corruptions[name]):
            raise ConfigError(
                f"corruption {name!r}: severities {sorted(by_sev)} vs baseline {sorted(baseline.corruptions[name])}"
            )
        err = sum(1.0 - v["accuracy"] for v in by_sev.values())
        base = sum(1.0 - v["accuracy"] for v in baseline.corruptions[name].values())
        ce = _ratio(err, base)
        n_sev = len(by_sev)
        out[metric_key("audit", "corrupt", "ce", name)] = ce
        ces.append(ce)
        rel.append(_ratio(err - n_sev * clean_err, base - n_sev * base_clean_err))
    out["audit/corrupt/mce"] = float(np.mean(ces))
    out["audit/corrupt/relative_mce"] = float(np.mean(rel))
    return out


# ------------------------------------------------------------------------------------ helpers
def _ratio(num: float, den: float) -> float:
    """``num / den`` where no errors on either side (0 / 0) counts as "equally robust" (1.0)."""
    if abs(den) < 1e-12:
        return 1.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / den


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _with_ci(values: dict[str, float], key: str) -> str:
    v = values.get(key, math.nan)
    if not math.isfinite(v):
        return "n/a"
    lo, hi = values.get(f"{key}_ci_low", math.nan), values.get(f"{key}_ci_high", math.nan)
    ci = f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else " [no CI]"
    return f"{v:.3f}{ci}"


def _align(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _display(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> what imshow wants: (H, W) for one channel, (H, W, 3) for RGB, else channel 0."""
    if img.shape[0] == 3:
        return np.transpose(img, (1, 2, 0))
    return img[0]


def _new_figure(width: float, height: float):
    # evaluate.plots imports matplotlib at import time (~0.5 s): loaded only when figures are drawn,
    # so reading or tabulating an audit report does not pay for it.
    from medtricks.evaluate.plots import _new_figure as agg_figure

    return agg_figure(width, height)
