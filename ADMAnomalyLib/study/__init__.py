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

Leave-one-domain-out (``split='domains'``, a domains file, :mod:`.domains`): each domain in turn is
the test set; the networks train on the other domains' normal slices and every data-driven choice
(FLAIR weight, post-processing, threshold) is made on the training domains' validation voxels with
the mean over those domains of the per-domain criterion, so no domain dictates. Results per domain
(mean +- sd over seeds) and pooled over every left-out test case of a seed.

Methods share work where they can: cases are prepared once per distinct preprocessing; ADM
variants whose CtoC-determining settings are equal share one CtoC per run (:func:`.methods.ctoc_key`),
its translations of every case are computed once, and post-processing variants re-use their base
network's energies.

The JSON written by :func:`run_study` holds everything the report needs; :mod:`ADMAnomalyLib.figures`
draws the figures and :func:`write_report` writes ``docs/results.md`` from it.
"""

from __future__ import annotations

from ..domains import KNOWN_PATTERNS, load_domains
from .methods import (DEFAULT_METHODS, DOMAIN_METHODS, METHODS, NETWORKS, POST_CANDIDATES, QUICK_METHODS, MethodSpec,
                      StudySettings, ctoc_groups, ctoc_key, full_settings, network_config, postprocess_for,
                      quick_settings)
from .report import format_table, make_report, write_report
from .runner import (SUMMARY_METRICS, CaseData, load_case_data, patient_folds, run_study, selection_groups, summarise,
                     validation_auprc, validation_threshold)

__all__ = [
    "CaseData", "DEFAULT_METHODS", "DOMAIN_METHODS", "KNOWN_PATTERNS", "METHODS", "MethodSpec", "NETWORKS",
    "POST_CANDIDATES", "QUICK_METHODS", "SUMMARY_METRICS", "StudySettings", "ctoc_groups", "ctoc_key",
    "format_table", "full_settings", "load_case_data", "load_domains", "make_report", "network_config",
    "patient_folds", "postprocess_for", "quick_settings", "run_study", "selection_groups", "summarise",
    "validation_auprc", "validation_threshold", "write_report",
]
