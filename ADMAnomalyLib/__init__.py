"""ADMAnomalyLib: unsupervised pixel-wise anomaly detection in multi-contrast brain MRI.

Implements the ADM network of Kim et al. (2021): contrast-to-contrast translation (CtoC),
dimension reduction (DR) and a Gaussian-mixture density estimator (DE) whose per-pixel energy is
the anomaly score. The public entry points live in :mod:`ADMAnomalyLib.api`.
"""

__version__ = "0.1.0"
