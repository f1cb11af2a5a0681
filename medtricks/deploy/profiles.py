"""Site profiles: how a trained run decides at one deployment site, stored with the run.

A profile is ``model/sites/<name>.json`` in the run folder (written atomically), and the artifact
``sites/<name>.json`` of a ``site_profile`` run nested under the trained run in its run store (MLflow
or the local store), so a run found by id finds its profiles too. ``evaluate --site NAME`` and
``predict --site NAME`` apply it.

What the decision is: the model's probabilities are temperature-scaled (``temperature``), optionally
prior-shifted from ``shift_from`` to ``prevalence`` (EM profiles of unlabelled images), then the
positive class is predicted when its probability is ``>= threshold``. A profile fitted on a labelled
site sample (``calibrate``) fits the threshold on the site's own temperature-scaled probabilities, so
no prior shift follows (the sample's prevalence is already in the threshold); its ``prevalence`` is
the sample's, reported with an interval.

Example::

    profile = load_site_profile(trained, "hospital-b")
    print(profile.threshold, profile.temperature, profile.prevalence)
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from medtricks._atomic import atomic_path
from medtricks.errors import ConfigError, MissingFileError
from medtricks.rundir import MODEL_ARTIFACT_DIR, RunDir
from medtricks.tracking import RunNotFoundError

__all__ = [
    "SiteProfile",
    "SITES_DIR",
    "SITE_ARTIFACT_DIR",
    "PROFILE_FORMAT",
    "check_site_name",
    "site_profile_path",
    "save_site_profile",
    "load_site_profile",
    "log_site_profile",
    "load_logged_site_profile",
    "list_site_profiles",
    "SITE_PROFILE_KIND",
]

SITES_DIR = "sites"  # model/sites/<name>.json in a run folder
SITE_ARTIFACT_DIR = "sites"  # sites/<name>.json in the store run of kind site_profile
SITE_PROFILE_KIND = "site_profile"  # the medtricks.kind tag of that store run
PROFILE_FORMAT = "medtricks-site-profile/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_site_name(name: str) -> str:
    """A site name is one plain file name: letters, digits, ``_ . -``, at most 64 characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".json"):
        raise ConfigError(
            f"--site/--name {name!r}: a site name is letters, digits, '_', '.', '-' (at most 64, "
            "starting with a letter or digit), such as 'hospital-b'"
        )
    return name


@dataclass
class SiteProfile:
    """One site's decision rule and the evidence behind it (see the module docstring)."""

    name: str
    method: str  # "youden" | "sensitivity" (labelled sample) | "em-prior" (unlabelled images)
    threshold: float
    temperature: float = 1.0
    prevalence: Optional[float] = None  # of classes[positive_index] at the site
    shift_from: Optional[list[float]] = None  # priors the posteriors are shifted from (em-prior); None: no shift
    positive_index: int = 1
    classes: list[str] = field(default_factory=list)
    target_sensitivity: Optional[float] = None
    intervals: dict[str, Optional[list[float]]] = field(default_factory=dict)  # threshold/temperature/prevalence
    ci_level: float = 0.95
    n_bootstrap: int = 0
    cross_fit: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)  # n_images, n_patients, per_class, image_set, card, root
    source_run: Optional[str] = None
    stored_threshold: Optional[float] = None  # the run's validation-chosen threshold, for comparison
    notes: list[str] = field(default_factory=list)
    created: str = ""
    format: str = PROFILE_FORMAT

    def __post_init__(self) -> None:
        check_site_name(self.name)
        if not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"site profile {self.name!r}: threshold must be in (0, 1), got {self.threshold!r}")
        if not float(self.temperature) > 0:
            raise ConfigError(f"site profile {self.name!r}: temperature must be > 0, got {self.temperature!r}")
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # -------------------------------------------------------------------------------- plain data
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<profile>") -> "SiteProfile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ConfigError(f"{source}: not a medtricks site profile (format {PROFILE_FORMAT!r} expected)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown} in a site profile (written by a newer medtricks?)")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{source}: not a medtricks site profile ({err})") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "SiteProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, str(path))

    def to_json(self, path: str | Path) -> Path:
        """Write atomically (a crash keeps the previous profile)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    # ----------------------------------------------------------------------------------- display
    def describe(self) -> str:
        """One line: what the rule does and where it came from."""
        how = {
            "youden": "Youden's J",
            "sensitivity": f"sensitivity >= {self.target_sensitivity}",
            "em-prior": "the run's stored threshold after an EM prior shift",
        }.get(self.method, self.method)
        text = f"site profile {self.name!r}: threshold {self.threshold:.4f} ({how}"
        if self.method != "em-prior":
            text += " on the site sample"
        text += ")"
        if self.temperature != 1.0:
            text += f", temperature {self.temperature:.3f}"
        if self.prevalence is not None:
            verb = "shifted to" if self.shift_from else "sample"
            text += f", prevalence {verb} {self.prevalence:.3f}"
        n = self.sample.get("n_images")
        if n:
            text += f"; fitted on {n} site images"
        return text

    def table(self) -> str:
        """The profile as a small text table with intervals and the cross-fitted check."""

        def iv(key: str) -> str:
            v = self.intervals.get(key)
            return f" [{v[0]:.4g}, {v[1]:.4g}]" if v else ""

        lines = [self.describe(), ""]
        lines.append(f"  threshold    {self.threshold:.4f}{iv('threshold')}")
        lines.append(f"  temperature  {self.temperature:.4f}{iv('temperature')}")
        if self.prevalence is not None:
            lines.append(
                f"  prevalence   {self.prevalence:.4f}{iv('prevalence')}  ({self.classes[self.positive_index] if self.classes else 'positive'})"
            )
        if self.sample:
            per = self.sample.get("per_class")
            lines.append(
                f"  sample       {self.sample.get('n_images')} images, {self.sample.get('n_patients', '?')} "
                f"patients{f', {per}' if per else ''}"
            )
        if self.n_bootstrap:
            lines.append(f"  intervals    {self.ci_level:.0%} patient bootstrap, {self.n_bootstrap} resamples")
        cf = self.cross_fit
        if cf.get("site"):
            ci = cf.get("ci", {})

            def row(label: str, part: str, values: dict) -> str:
                cells = []
                for key in ("sensitivity", "specificity", "accuracy", "ece"):
                    if key in values:
                        b = ci.get(f"{part}/{key}")
                        cells.append(f"{key} {values[key]:.3f}" + (f" [{b[0]:.3f}, {b[1]:.3f}]" if b else ""))
                return f"  {label:<30} " + ", ".join(cells)

            lines += [
                "",
                f"cross-fitted by patient ({cf.get('folds')} folds; every image predicted by a profile "
                "fitted on other patients):",
            ]
            lines.append(row("site profile", "site", cf["site"]))
            if cf.get("stored"):
                lines.append(row(f"run's threshold {cf['stored']['threshold']:.4f}", "stored", cf["stored"]))
            if cf.get("uncalibrated"):
                u = cf["uncalibrated"]
                lines.append(
                    f"  {'uncalibrated probabilities':<30} ece {u['ece']:.3f}, nll {u['nll']:.3f} "
                    f"(site profile nll {cf['site'].get('nll', float('nan')):.3f})"
                )
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def metrics(self, prefix: str = "site/") -> dict[str, float]:
        """Flat numbers for a run store: the fitted values, their intervals and the cross-fitted check."""
        out: dict[str, float] = {f"{prefix}threshold": self.threshold, f"{prefix}temperature": self.temperature}
        if self.prevalence is not None:
            out[f"{prefix}prevalence"] = self.prevalence
        for key, bounds in self.intervals.items():
            if bounds:
                out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = bounds
        for part in ("site", "stored"):
            for key, value in (self.cross_fit.get(part) or {}).items():
                if key != "threshold" and isinstance(value, (int, float)):
                    out[f"{prefix}crossfit/{part}/{key}"] = float(value)
        return out


# ------------------------------------------------------------------------------- run folder
def site_profile_path(run_dir: str | Path, name: str) -> Path:
    """``<run>/model/sites/<name>.json``."""
    return RunDir(run_dir).model_dir / SITES_DIR / f"{check_site_name(name)}.json"


def save_site_profile(run_dir: str | Path, profile: SiteProfile) -> Path:
    """Write ``profile`` into the run folder (atomically; an older profile of that name is replaced)."""
    return profile.to_json(site_profile_path(run_dir, profile.name))


def list_site_profiles(run_dir: Optional[str | Path]) -> list[str]:
    """Names of the site profiles stored in a run folder."""
    if run_dir is None:
        return []
    folder = RunDir(run_dir).model_dir / SITES_DIR
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


# -------------------------------------------------------------------------------- run store
def _profile_tags(name: str, run_id: Optional[str]) -> dict[str, str]:
    return {"medtricks.kind": SITE_PROFILE_KIND, "medtricks.site": name, "medtricks.profiled_run": str(run_id)}


def log_site_profile(
    store, profile: SiteProfile, *, experiment: str, run_id: Optional[str], params: Optional[dict[str, Any]] = None
) -> Optional[str]:
    """A ``site_profile`` run in ``store`` nested under the trained run ``run_id``: the profile's numbers as
    metrics, its settings as params, the profile itself as the artifact ``sites/<name>.json``. Returns its id."""
    tags = _profile_tags(profile.name, run_id)
    parent = run_id if run_id and store.run_exists(run_id) else None
    logged = store.start(experiment=experiment, run_name=f"site-{profile.name}", tags=tags, parent_run_id=parent)
    try:
        store.log_params(
            {
                "site": profile.name,
                "method": profile.method,
                "target_sensitivity": profile.target_sensitivity,
                "n_bootstrap": profile.n_bootstrap,
                "ci": profile.ci_level,
                "source_run": str(run_id),
                **{k: v for k, v in (params or {}).items()},
            }
        )
        store.log_metrics(profile.metrics(), step=0)
        with tempfile.TemporaryDirectory(prefix="medtricks-site-") as tmp:
            store.log_artifact(profile.to_json(Path(tmp) / f"{profile.name}.json"), SITE_ARTIFACT_DIR)
    except BaseException:
        store.end("FAILED")
        raise
    store.end()
    return logged


def load_logged_site_profile(store, *, experiment: str, run_id: Optional[str], name: str) -> Optional[SiteProfile]:
    """The newest profile ``name`` logged for run ``run_id`` in ``store`` (``None`` when there is none)."""
    check_site_name(name)
    try:
        runs = store.search_runs(experiment, tags=_profile_tags(name, run_id), statuses=["FINISHED"])
    except RunNotFoundError:
        return None
    for record in reversed(runs):  # newest first
        with tempfile.TemporaryDirectory(prefix="medtricks-site-") as tmp:
            path = store.download_artifact(record.run_id, f"{SITE_ARTIFACT_DIR}/{name}.json", tmp)
            if path is not None:
                return SiteProfile.from_json(path)
    return None


def load_site_profile(trained, name: str, *, store=None) -> SiteProfile:
    """Profile ``name`` of a trained run: its folder's ``model/sites/<name>.json``, else the newest one logged
    for the run in ``store`` (pass the run's store: :func:`medtricks.posthoc.store.posthoc_store`)."""
    check_site_name(name)
    run_dir = getattr(trained, "run_dir", None)
    if run_dir is not None:
        path = site_profile_path(run_dir, name)
        if path.is_file():
            return _checked(SiteProfile.from_json(path), trained, str(path))
    if store is not None and getattr(trained, "run_id", None):
        experiment = trained.recipe.tracking.experiment or trained.recipe.experiment.name
        found = load_logged_site_profile(store, experiment=experiment, run_id=trained.run_id, name=name)
        if found is not None:
            return _checked(found, trained, f"{store.describe()} (run {trained.run_id})")
    where = f"{run_dir}/{MODEL_ARTIFACT_DIR}/{SITES_DIR}/" if run_dir is not None else "the run folder"
    have = list_site_profiles(run_dir)
    raise MissingFileError(
        f"no site profile {name!r} for run {getattr(trained, 'run_id', None) or run_dir}: not in "
        f"{where}{' or its run store' if store is not None else ''} (profiles there: "
        f"{', '.join(have) or 'none'}); make one with `medtricks calibrate RUN --card C --root SITE "
        f"--name {name}` or `medtricks adapt RUN --root SITE --method em-prior --name {name}`"
    )


def _checked(profile: SiteProfile, trained, source: str) -> SiteProfile:
    classes = list(getattr(trained, "classes", []) or [])
    if profile.classes and classes and list(profile.classes) != classes:
        raise ConfigError(
            f"site profile {profile.name!r} ({source}) is for classes {profile.classes}, but the run has {classes}"
        )
    return profile
