"""The evaluation study: ADM, its ablations, beyond-the-paper options and classic baselines on the
same patient-level folds, voxels and metrics (``admanomaly study``).

Protocol (method.md, 'Evaluation protocol', applied to a folder of labelled cases):

* patients are split into ``n_folds`` disjoint folds; each fold in turn is the test set and the
  other patients are the training patients (no patient is ever in both);
* learned methods are trained on the training patients' lesion-free slices (lesion margin
  ``lesion_margin`` slices) -- ADM at network resolution, the intensity baselines on the same slices'
  native voxels;
* every method's operating threshold is its best-F1 threshold over the brain voxels of the training
  patients' lesion slices (the validation set), at native resolution;
* metrics are computed on the test patients' whole brains at native resolution (every brain voxel
  of every test case, the same voxels for every method): AUROC and AUPRC pooled over the test
  voxels, Dice / precision / recall at the validation threshold, and the best possible Dice (an
  oracle threshold on the test data, reported as such);
* every (fold, seed) is a run; the table gives mean +- sd over runs.

Methods share work where they can: the ADM variants that use CtoC share one CtoC per (fold, seed)
(step 1 is identical for them), its translations of every case are computed once, and
post-processing variants re-use their base network's energies.

The JSON written by :func:`run_study` holds everything the report needs; :mod:`ADMAnomalyLib.figures`
draws the figures and :func:`write_report` writes ``docs/results.md`` from it.
"""

from __future__ import annotations

from .methods import (DEFAULT_METHODS, METHODS, NETWORKS, QUICK_METHODS, MethodSpec, StudySettings, full_settings,
                      network_config, postprocess_for, quick_settings)
from .report import format_table, make_report, write_report
from .runner import SUMMARY_METRICS, CaseData, load_case_data, patient_folds, run_study, summarise

__all__ = [
    "CaseData", "DEFAULT_METHODS", "METHODS", "MethodSpec", "NETWORKS", "QUICK_METHODS", "SUMMARY_METRICS",
    "StudySettings", "format_table", "full_settings", "load_case_data", "make_report", "network_config",
    "patient_folds", "postprocess_for", "quick_settings", "run_study", "summarise", "write_report",
]
