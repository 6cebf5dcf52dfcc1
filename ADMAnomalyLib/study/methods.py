"""The study's settings and its methods: every row of the table, what it trains and how it is
post-processed (no training values live anywhere else)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import ADMConfig, PostprocessConfig, preset

# ------------------------------------------------------------------------------------------------
# settings


@dataclass
class StudySettings:
    """What one study run does; ``quick_settings()`` / ``full_settings()`` are the two presets."""

    name: str = "quick"
    n_folds: int = 3
    seeds: tuple[int, ...] = (0,)
    preset: str = "small"
    image_size: int = 64
    epochs_ctoc: int = 4
    epochs_joint: int = 3
    batch_size: int = 16
    lesion_margin: int = 3
    methods: tuple[str, ...] = ()
    """Methods to run (empty: all of :data:`DEFAULT_METHODS`)."""
    ocsvm_max_train: int = 10_000
    mahalanobis_max_train: int = 500_000
    smoothing_sigma_mm: float = 3.0
    rim_erosion_mm: float = 3.0
    flair_median_size: int = 5
    flair_min_component_voxels: int = 20
    dagmm_lambda_energy: float = 5e-4
    dagmm_lambda_cov: float = 5e-3
    dagmm_jitter: float = 1e-6
    singularity_steps: int = 300
    singularity_lambda: float = 5.0
    singularity_eps: float = 1e-6
    singularity_image_size: int = 64
    singularity_lr: float = 3e-3
    curve_points: int = 300
    device: str = "auto"
    max_cases: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quick_settings(**overrides: Any) -> StudySettings:
    """2-core CPU setting (< 30 min): 3 folds, 1 seed, 64x64 slices, 4 + 3 epochs of the small preset."""
    return dataclasses.replace(StudySettings(methods=QUICK_METHODS), **overrides)


def full_settings(**overrides: Any) -> StudySettings:
    """GPU setting: 3 folds x 3 seeds, the paper preset at 128x128 with the paper's 50 + 50 epochs."""
    base = StudySettings(name="full", seeds=(0, 1, 2), preset="paper", image_size=128, epochs_ctoc=50,
                         epochs_joint=50, ocsvm_max_train=50_000, singularity_steps=1500,
                         singularity_image_size=128)
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------------------------
# methods registry


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table."""

    kind: str
    """'adm' (engine-trained network), 'dagmm', 'flair', 'flair_filtered', 'mahalanobis', 'ocsvm'."""
    group: str
    """'paper' (the paper's ADM and ablations), 'baseline' or 'improvement'."""
    description: str
    network: str | None = None
    """For 'adm': which trained network (key of :data:`NETWORKS`)."""
    postprocess: dict[str, Any] = field(default_factory=dict)
    """For 'adm': PostprocessConfig overrides; the values 'smooth' and 'rim' take the settings'."""
    flair_weight: bool = False
    """For 'adm': add w x FLAIR z-score to E, w chosen on the validation data."""
    small_components: bool = False
    """For 'adm': at the threshold, lower voxels in components smaller than the settings'
    ``flair_min_component_voxels`` to just below it (as the FLAIR +med+cc baseline does)."""


NETWORKS: dict[str, dict[str, dict[str, Any]]] = {
    "ADM": {},
    "ADM_ct": {"model": {"use_dr": False}},
    "ADM_dr": {"model": {"use_ctoc": False}},
    "ADM_woj": {"train": {"joint": False}},
    "ADM+X": {"model": {"density_intensities": True}},
}
"""Config overrides of each trained ADM network (all on top of the study's preset)."""


METHODS: dict[str, MethodSpec] = {
    "ADM": MethodSpec("adm", "paper", "ADM as published (faithful default)", "ADM"),
    "ADM_ct": MethodSpec("adm", "paper", "ablation: no DR (z = Z_ct)", "ADM_ct"),
    "ADM_dr": MethodSpec("adm", "paper", "ablation: no CtoC (z = Z_dr)", "ADM_dr"),
    "ADM_woj": MethodSpec("adm", "paper", "ablation: DR and DE losses optimised separately", "ADM_woj"),
    "DAGMM-conv": MethodSpec("dagmm", "baseline", "convolutional DAGMM, 1/Sigma_ii penalty"),
    "OCSVM": MethodSpec("ocsvm", "baseline", "one-class SVM, RBF on the 4 intensities, gamma 0.25"),
    "Mahalanobis": MethodSpec("mahalanobis", "baseline", "Mahalanobis distance of the 4 z-scored intensities"),
    "FLAIR z": MethodSpec("flair", "baseline", "FLAIR z-score inside the brain"),
    "FLAIR z +med+cc": MethodSpec("flair_filtered", "baseline",
                                  "FLAIR z-score, 3-D median filter, small components removed at the threshold"),
    "ADM +flip": MethodSpec("adm", "improvement", "ADM, left-right flip test-time augmentation", "ADM",
                            {"flip_tta": True}),
    "ADM +smooth": MethodSpec("adm", "improvement", "ADM, 3-D Gaussian smoothing of E", "ADM",
                              {"smoothing_sigma_mm": "smooth"}),
    "ADM +smooth+rim": MethodSpec("adm", "improvement", "ADM, smoothing and brain-rim suppression", "ADM",
                                  {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"}),
    "ADM +med+rim": MethodSpec("adm", "improvement", "ADM, 3-D median filter of E and rim suppression", "ADM",
                               {"median_size": "median", "rim_erosion_mm": "rim"}),
    "ADM +smooth+rim+FLAIR": MethodSpec("adm", "improvement",
                                        "ADM +smooth+rim plus w x FLAIR z (w chosen on validation)", "ADM",
                                        {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"},
                                        flair_weight=True),
    "ADM +smooth+rim+FLAIR+med": MethodSpec("adm", "improvement",
                                            "ADM +smooth+rim+FLAIR, then a 3-D median filter", "ADM",
                                            {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim",
                                             "median_size": "median"}, flair_weight=True),
    "ADM +smooth+rim+FLAIR+med+cc": MethodSpec("adm", "improvement",
                                               "ADM +smooth+rim+FLAIR+med, small components removed at the threshold",
                                               "ADM", {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim",
                                                       "median_size": "median"}, flair_weight=True,
                                               small_components=True),
    "ADM+X": MethodSpec("adm", "improvement", "ADM with the intensities X in the density features", "ADM+X"),
    "ADM+X +smooth+rim": MethodSpec("adm", "improvement", "ADM+X with smoothing and rim suppression", "ADM+X",
                                    {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"}),
    "ADM+X +flip+smooth+rim": MethodSpec("adm", "improvement", "ADM+X, flip TTA, smoothing, rim suppression",
                                         "ADM+X", {"flip_tta": True, "smoothing_sigma_mm": "smooth",
                                                   "rim_erosion_mm": "rim"}),
    "ADM+X +smooth+rim+FLAIR": MethodSpec("adm", "improvement",
                                          "ADM+X +smooth+rim plus w x FLAIR z (w chosen on validation)",
                                          "ADM+X", {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"},
                                          flair_weight=True),
}

DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)
QUICK_METHODS: tuple[str, ...] = tuple(m for m in METHODS
                                       if m not in ("ADM +flip", "ADM +smooth", "ADM+X +flip+smooth+rim"))
"""The quick setting leaves out the flip-TTA variants and smoothing without rim suppression (in the
full setting) to fit a 2-core CPU."""
FLAIR_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
"""Candidate weights of the FLAIR z-score added to E (picked by validation AUPRC)."""


def postprocess_for(spec: MethodSpec, settings: StudySettings) -> PostprocessConfig:
    values = {}
    for key, value in spec.postprocess.items():
        if value == "smooth":
            value = settings.smoothing_sigma_mm
        elif value == "rim":
            value = settings.rim_erosion_mm
        elif value == "median":
            value = settings.flair_median_size
        values[key] = value
    return PostprocessConfig(**values)


def network_config(name: str, settings: StudySettings, seed: int) -> ADMConfig:
    """The engine config of study network ``name`` (preset + study sizes + the variant's overrides)."""
    overrides: dict[str, dict[str, Any]] = {
        "preprocess": {"image_size": settings.image_size},
        "train": {"epochs_ctoc": settings.epochs_ctoc, "epochs_joint": settings.epochs_joint,
                  "batch_size": settings.batch_size, "lesion_margin": settings.lesion_margin, "seed": seed},
    }
    for section, values in NETWORKS[name].items():
        overrides.setdefault(section, {}).update(values)
    return preset(settings.preset, **overrides)


