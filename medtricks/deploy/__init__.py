"""The deployment site: calibrate and adapt a trained run to a new hospital's images (issue 30).

- :mod:`~medtricks.deploy.profiles` — site profiles (``model/sites/<name>.json``; logged to the run store)
  that ``evaluate``/``predict --site NAME`` apply.
- :mod:`~medtricks.deploy.fit` — temperature, threshold, prevalence and EM prior fits on plain arrays, with
  patient-level bootstrap intervals and cross-fitting.
- :mod:`~medtricks.deploy.bn` — AdaBN and TENT (BatchNorm surgery, in place, with a report).
- :mod:`~medtricks.deploy.calibrate` — ``medtricks calibrate`` (a labelled site sample).
- :mod:`~medtricks.deploy.adapt` — ``medtricks adapt`` (unlabelled site images: em-prior, adabn, tent).
- :mod:`~medtricks.deploy.finetune` — ``medtricks adapt --method finetune``: fine-tuning on a labelled site
  sample, patient-level cross-fitted, then once on the whole sample (a run that records its parent).
  Its parts: :mod:`~medtricks.deploy.finetune_setup` (the parent, the site sample and the plan, checked before
  any training), :mod:`~medtricks.deploy.finetune_recipe` (the fine-tuning and fold recipes),
  :mod:`~medtricks.deploy.finetune_folds` (folds, fold data and the run folders a rerun resumes),
  :mod:`~medtricks.deploy.finetune_report` (the cross-fitted metrics and table) and
  :mod:`~medtricks.deploy.finetune_final` (the final run's record and operating point).

Names are loaded on first use (``from medtricks.deploy import calibrate_site``), so the lower layers
(``posthoc`` reads profiles) never import the orchestration.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SiteProfile": "medtricks.deploy.profiles",
    "load_site_profile": "medtricks.deploy.profiles",
    "save_site_profile": "medtricks.deploy.profiles",
    "em_prior": "medtricks.deploy.fit",
    "fit_temperature": "medtricks.deploy.fit",
    "apply_temperature": "medtricks.deploy.fit",
    "adabn": "medtricks.deploy.bn",
    "tent": "medtricks.deploy.bn",
    "calibrate_site": "medtricks.deploy.calibrate",
    "calibrate_predictions": "medtricks.deploy.calibrate",
    "adapt_run": "medtricks.deploy.adapt",
    "finetune_run": "medtricks.deploy.finetune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medtricks.deploy' has no attribute {name!r}")


def __dir__():
    return __all__
