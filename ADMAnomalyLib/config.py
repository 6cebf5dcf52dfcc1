"""Configuration dataclasses and named presets.

The ``paper`` preset holds the settings of Kim et al. (2021) exactly as ``method.md`` gives them;
``small`` keeps every paper choice except the CtoC width and epochs so it trains on a 2-core CPU;
``tiny`` exists for tests. Every size the method names is a field here, never a literal in code.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

CONTRASTS: tuple[str, ...] = ("flair", "t1", "t1c", "t2")
"""Canonical contrast order of the four input channels."""
POSTPROCESS_CONTRASTS: tuple[str, ...] = ("flair", "t1", "t2")
"""The contrasts whose native z-scored volumes post-processing may read: FLAIR (its term, its asymmetry,
the normal-tissue scale), T1 (which tissue is CSF-like, for the T2 term) and T2 (its term and asymmetry).
:attr:`PostprocessConfig.native_contrasts` names those one configuration reads."""

CONTRAST_NAMES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "t2flair", "t2_flair", "t2-flair"),
    "t1": ("t1", "t1n", "t1w"),
    "t1c": ("t1c", "t1ce", "t1gd", "t1post", "t1wce", "t1_gd", "t1-gd", "t1_post", "t1-post", "t1_ce", "t1-ce"),
    "t2": ("t2", "t2w"),
}
"""The usual spellings of each contrast (lower case), shared by file discovery
(:mod:`ADMAnomalyLib.cases`) and the Slicer module's guessing from node names."""


NORMALISATIONS = ("zscore", "robust", "histogram")
"""Per-contrast intensity normalisations (``PreprocessConfig.normalisation``)."""

SMALL_LESION_LOADS = ("always", "thin", "never")
"""Where a case scored for its small lesions keeps the load term (``PostprocessConfig.small_lesion_load``)."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Precision of the CtoC network, for training (``train.precision``, see
:func:`ADMAnomalyLib.device.training_dtype`) and inference (see
:func:`ADMAnomalyLib.device.inference_dtype`)."""

@dataclass
class PreprocessConfig:
    """How a case becomes network input."""

    image_size: int = 128
    """Side of the square slice the networks see (bilinear resize)."""
    pad_to_square: bool = True
    """Zero-pad non-square slices before resizing so the anatomy keeps its aspect ratio."""
    orientation: str = "LPS"
    """Canonical orientation (SimpleITK DICOMOrient code) every case is brought to before slicing,
    so that axial slices and in-plane directions follow the direction cosines, not the array order."""
    brain_threshold: float = 0.0
    """A voxel is brain when |value| > this in any contrast (used when no mask is supplied)."""
    max_brain_fraction: float = 0.9
    """Without a supplied mask, refuse a case whose non-zero "brain" covers more than this fraction
    of the field of view: its background is not zero (not skull-stripped, or an offset), and every
    voxel would be scored as brain."""
    min_brain_pixels: int = 64
    """A slice with fewer brain pixels (at network resolution) is treated as containing no brain."""
    grid_tolerance: float = 1e-4
    """Relative tolerance when comparing spacing, origin and direction of the four contrasts."""
    normalisation: str = "zscore"
    """Per-contrast intensity normalisation over the brain: 'zscore' (method.md: mean and standard
    deviation), 'robust' (beyond the paper: median and IQR / 1.349, so a large lesion or a site's
    histogram tail does not move where normal tissue lands) or 'histogram' (beyond the paper:
    piecewise-linear histogram standardisation at :attr:`histogram_landmarks`, which also matches the
    histogram's shape between sites; see :func:`~ADMAnomalyLib.preprocess.standardise_histogram`)."""
    histogram_landmarks: tuple[float, ...] = (10.0, 25.0, 50.0, 75.0, 90.0)
    """Brain-voxel percentiles that 'histogram' normalisation maps onto the standard normal's quantiles
    at the same percentiles. Kept inside 10-90 so that a glioma of up to a tenth of the brain, bright
    on FLAIR and T2 or dark on T1, does not sit on a landmark and have its contrast squeezed."""
    native_normalisation: Optional[str] = None
    """Normalisation of the native-grid contrasts the post-processing reads (its FLAIR intensity term,
    the energy gate, normal-looking tissue), one of those of :attr:`normalisation`; None: the network
    input's. The network input and the intensity term need not agree: robust statistics steady the
    network's input across sites, while for thresholding FLAIR intensity whole-brain mean and SD,
    which widen with a bright lesion, put the best threshold of every case at nearly the same z."""
    bias_correction_levels: int = 0
    """Beyond the paper: N4 bias-field correction of all four contrasts, inside the brain and before their
    normalisation, with this many fitting levels (as :attr:`native_bias_correction_levels`), so that the
    networks see, and are trained on, corrected intensities; the native contrasts the post-processing
    reads are then the corrected ones too. 0 = off (the paper: none). Unlike the native correction it
    changes the network input, so a model must be trained with it."""
    native_bias_correction_levels: int = 0
    """Beyond the paper: N4 bias-field correction of the native-grid FLAIR the post-processing reads
    (its FLAIR term and asymmetry; the T1 and T2 it may read are left uncorrected,
    :data:`~ADMAnomalyLib.preprocess.NATIVE_N4_CONTRASTS`), inside the brain and before its normalisation,
    with this many fitting levels (each doubles the B-spline grid of the field, from 4 control points per axis);
    0 = off (the network input is never corrected: it stays as the network was trained). A smooth
    multiplicative field makes one side of a brain brighter on FLAIR than the other, so FLAIR
    thresholding marks the bright side's normal tissue and misses a lesion on the dark side; published
    BraTS data are not bias-corrected. Two levels leave a large glioma's own brightness alone, while a
    third starts to fit it into the field (docs/domain_analysis.md, twenty-seventh round)."""

    max_slice_mm: float = 0.0
    """Beyond the paper: a case sampled coarser than this along any axis (a scanner's 5 mm slices) is
    resampled to this spacing along those axes for the networks and the post-processing, which were made on
    1 mm volumes, and its energy carried back onto its own grid (:mod:`ADMAnomalyLib.slicing`); 0 = off (the
    paper: every case as it is). Training data are left alone. On the raw TCGA scans (5.5 mm slices) 2 mm
    raised AUPRC from 0.81 to 0.89 and Dice at the model's threshold from 0.67 to 0.81 (docs/raw_case.md)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_slice_mm, bool) or not isinstance(self.max_slice_mm, (int, float)) or not (
                math.isfinite(self.max_slice_mm) and self.max_slice_mm >= 0):
            raise ValueError(f"preprocess.max_slice_mm must be a finite number of mm >= 0 (0 = off), "
                             f"got {self.max_slice_mm!r}")
        self.max_slice_mm = float(self.max_slice_mm)
        for name in ("bias_correction_levels", "native_bias_correction_levels"):
            levels = getattr(self, name)
            if isinstance(levels, bool) or levels not in range(0, 5):
                raise ValueError(f"preprocess.{name} must be an integer from 0 (off) to 4, got {levels!r}")
        if self.bias_correction_levels and self.native_bias_correction_levels not in (0, self.bias_correction_levels):
            raise ValueError("preprocess.native_bias_correction_levels cannot differ from bias_correction_levels: "
                             "the post-processing reads the contrasts the network input was corrected from "
                             f"({self.native_bias_correction_levels} against {self.bias_correction_levels})")
        for name in ("normalisation", "native_normalisation"):
            value = getattr(self, name)
            if value not in NORMALISATIONS and not (name == "native_normalisation" and value is None):
                raise ValueError(f"preprocess.{name} must be one of {', '.join(NORMALISATIONS)}, not {value!r}")
        landmarks = tuple(float(p) for p in self.histogram_landmarks)
        if len(landmarks) < 2 or any(not 0 < p < 100 for p in landmarks) or list(landmarks) != sorted(set(landmarks)):
            raise ValueError("preprocess.histogram_landmarks must be two or more increasing percentiles strictly "
                             f"between 0 and 100, got {self.histogram_landmarks!r}")
        self.histogram_landmarks = landmarks


@dataclass(frozen=True)
class SliceContext:
    """The slices a CtoC input carries beside its own (``ModelConfig.slice_context``): ``each_side``
    neighbouring axial slices before and after it, then, with ``mirror``, its mirror image across the
    mid-sagittal plane (:meth:`~ADMAnomalyLib.preprocess.PreparedCase.neighbours`)."""

    each_side: int = 0
    mirror: bool = False

    @property
    def images(self) -> int:
        """Slices of four contrasts each carried beside the slice itself."""
        return 2 * self.each_side + int(self.mirror)

    def __bool__(self) -> bool:
        return self.images > 0


@dataclass
class ModelConfig:
    """Network and mixture sizes (method.md, 'Networks')."""

    n_contrasts: int = 4
    ctoc_width: int = 64
    """Width of the CtoC stem; doubled by each of the two stride-2 convs (64 -> 128 -> 256)."""
    ctoc_res_blocks: int = 4
    ctoc_stem_kernel: int = 7
    ctoc_context_slices: int = 0
    """Beyond the paper: CtoC also sees this many neighbouring axial slices on each side (every
    contrast but the one it makes, which is replaced by its median in the neighbours too, so it cannot
    be copied from the slice above), giving the 2-D translation the through-plane anatomy that decides
    partial volume at tissue boundaries. 0 is the faithful ADM (one slice)."""
    ctoc_mirror_context: bool = False
    """Beyond the paper: CtoC also sees the slice mirrored across the brain's mid-sagittal plane, every
    contrast included (the one it makes too). Normal tissue has a twin across the midline that
    predicts it, a one-sided lesion has none, so the translation of a lesion follows its normal mirror
    image and the lesion stays in the residual even where the other contrasts show it. False is the
    faithful ADM."""
    ctoc_flair_hides_t2: bool = False
    """Beyond the paper: CtoC makes FLAIR with T2 hidden as well (replaced by its brain median, like
    FLAIR itself, in the slice and its neighbours). Oedema and MS lesions are bright in both, so a FLAIR
    translation that reads T2 rebuilds much of the lesion and leaves little of it in the FLAIR residual
    (docs/domain_analysis.md, twenty-second round). T2's own translation still reads FLAIR: were both
    hidden in both, the two inputs would be alike and the network could not tell which contrast to
    make. False is the faithful ADM."""
    median_bias: bool = True
    """Feed the median map to CtoC's last layer as an intensity bias (method.md)."""
    dr_encoder_widths: tuple[int, ...] = (16, 8)
    dr_latent: int = 3
    dr_decoder_widths: tuple[int, ...] = (8, 16)
    de_hidden: int = 8
    de_dropout: float = 0.5
    n_components: int = 6
    eps: float = 1e-6
    """Lower bound on covariance eigenvalues: Lambda_p = ReLU(Lambda - eps) + eps."""
    ctoc_uncertainty: bool = False
    """Beyond the paper: CtoC also predicts the log-variance of each translated pixel (trained by a
    beta-NLL loss) and Z_ct becomes |X - X_hat| / sigma_hat, so tissue boundaries that are hard to
    predict everywhere stop dominating the energy. False is the faithful ADM (Z_ct = |X - X_hat|)."""
    use_ctoc: bool = True
    """Include Z_ct in the density features (False gives the ADM_dr ablation)."""
    use_dr: bool = True
    """Include Z_dr in the density features (False gives the ADM_ct ablation)."""
    density_intensities: tuple[str, ...] = ()
    """Beyond the paper: the contrasts whose normalised intensities X themselves also enter the density
    features (z = concat(Z_ct, Z_dr, X_k)), so the mixture models how bright a contrast is, not only
    how well it is predicted; with ``residual_direction`` 'brighter' only the part above the brain's
    normalisation centre, max(X_k, 0), as for the residuals. () is the faithful ADM. (Model files
    before this field stored a flag: true means all four contrasts.)"""

    density_residuals: tuple[str, ...] = CONTRASTS
    """Beyond the paper: the contrasts whose CtoC residual Z_ct enters the density features (all four
    in the paper). The T1 and T1c residuals mark tissue boundaries on every site and point away from
    the lesion off the training site (docs/domain_analysis.md); ('flair', 't2') keeps the two that
    show oedema and MS lesions."""
    residual_direction: str = "both"
    """Beyond the paper: which CtoC residuals count in the density features. 'both' is the paper's
    Z_ct = |X - X_hat| (brighter and darker than predicted alike); 'brighter' keeps max(X - X_hat, 0):
    only where a contrast is brighter than the others predict, as FLAIR is in oedema and MS lesions,
    while partial-volume CSF at tissue boundaries comes out darker than predicted. It sides the
    ``density_intensities`` the same way."""

    @property
    def slice_context(self) -> "SliceContext":
        """What the CtoC sees beside each slice (nothing without a CtoC)."""
        if not self.use_ctoc:
            return SliceContext()
        return SliceContext(self.ctoc_context_slices, self.ctoc_mirror_context)

    @property
    def feature_dim(self) -> int:
        """Dimension of the per-pixel feature z fed to the density estimator."""
        return ((len(self.density_residuals) if self.use_ctoc else 0) + (self.dr_latent if self.use_dr else 0)
                + len(self.density_intensities))


@dataclass
class TrainConfig:
    """Two-step training schedule (method.md, 'Training')."""

    epochs_ctoc: int = 50
    epochs_joint: int = 50
    batch_size: int = 16
    lr_ctoc: float = 2e-4
    lr_joint: float = 1e-3
    lambda_energy: float = 5e-4
    joint: bool = True
    """Optimise the DR and DE losses jointly (False gives the ADM_woj ablation: each loss updates
    only its own sub-network)."""
    lesion_margin: int = 3
    """Slices within this many slices of a labelled lesion are neither training nor validation."""
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    """Range of the random per-contrast intensity scaling applied to training slices."""
    augmentation: str = "scaling"
    """'scaling' (method.md: the random intensity scaling above) or 'site' (beyond the paper: the
    scaling plus a smooth bias field, a contrast/gamma change, noise and blur per contrast, modelling
    what changes between scanners and sites)."""
    bias_field_sd: float = 0.15
    """'site' augmentation: standard deviation of the smooth multiplicative bias field (log scale)."""
    gamma_log_sd: float = 0.15
    """'site' augmentation: standard deviation of log(gamma) of the per-contrast intensity curve."""
    noise_sd_max: float = 0.05
    """'site' augmentation: Gaussian noise with a standard deviation up to this (z-score units)."""
    blur_sigma_max: float = 1.0
    """'site' augmentation: Gaussian blur with a sigma up to this (network pixels)."""
    through_plane_mix: float = 0.0
    """Beyond the paper, with ``model.ctoc_context_slices``: before the augmentation, each contrast's
    neighbouring slices move towards their centre slice by a random share up to this (per slice and
    contrast), as if that contrast had been acquired in thicker slices and interpolated. Sites differ
    in which contrasts are smooth through the plane (docs/domain_analysis.md); 0 leaves them as they are."""
    nll_beta: float = 0.5
    """With ``model.ctoc_uncertainty``: beta of the beta-NLL loss (Seitzer et al. 2022; 0 is plain
    Gaussian NLL, 1 weights like MSE), which keeps the mean prediction as good as MSE training."""
    seed: int = 0
    precision: str = "auto"
    """CtoC precision while training, one of :data:`PRECISIONS`: 'auto' is bf16 where the device runs
    it natively (GPUs, CPUs with AVX512-BF16/AMX), else fp32; 'fp16' is refused (it needs loss scaling)."""
    max_gmm_pixels_per_batch: int = 32768
    """Brain pixels sampled per batch for the mixture statistics of the energy loss."""
    num_workers: int = 0
    """DataLoader worker processes reading training batches (useful with a memory-mapped slice cache)."""
    fallback_threshold_percentile: float = 99.0
    """Without labelled validation slices the threshold is this percentile of the normal training
    energies."""


@dataclass
class PostprocessConfig:
    """Beyond the paper: optional post-processing of the energy map at inference (all off by
    default, which is the faithful ADM). Stored in the model file, so a model trained with these
    settings applies them whenever it predicts; its threshold is then chosen on post-processed
    energies."""

    flip_tta: bool = False
    """Test-time augmentation: average the energy of each slice and of its left-right mirror."""
    case_mixture: bool = False
    """Score each case with the mixture's π, μ, Σ re-estimated over its own normal-looking brain pixels
    (network-input FLAIR z at most ``normal_max_flair_z``; memberships from G_de) instead of the
    mixture frozen over the training data (method.md). Off its training sites the frozen mixture finds
    a new site's normal tissue, above all its tissue boundaries, as improbable as lesions
    (docs/domain_analysis.md); the case's own mixture does not, while the FLAIR-hyperintense lesions
    it leaves out stay improbable. False is the faithful ADM."""
    case_mixture_share: float = 1.0
    """With ``case_mixture``: the energy is ``share`` x the case mixture's energy plus ``1 - share`` x
    the frozen mixture's, i.e. minus the log of the two densities' weighted geometric mean. A voxel
    then scores high only where the training sites' normal tissue and the case's own both find it
    improbable: the frozen mixture keeps what was learnt of normal anatomy, the case's removes the
    site's own tissue from the evidence. 1 = the case mixture alone; must lie in (0, 1]."""
    smoothing_sigma_mm: float = 0.0
    """3-D Gaussian smoothing of E on the native grid (sigma in mm; normalised inside the brain,
    so background never leaks in); 0 = off."""
    rim_erosion_mm: float = 0.0
    """Voxels closer than this (mm) to the brain boundary get the lowest brain energy (the rim,
    where skull-stripping residue and partial volume give false positives); 0 = off."""
    flair_weight: float = 0.0
    """After smoothing and rim suppression, z-score E over the case's brain voxels and add this weight
    times the FLAIR z-score (native grid, z-scored over the brain), combining the model's evidence
    with FLAIR hyperintensity; 0 = off (E unchanged)."""
    median_size_mm: float = 0.0
    """3-D median filter of the score with a window of about this many mm along each axis (an odd
    number of voxels, at least 1, per axis: 5 mm is 5x5x5 voxels at 1 mm and 5x5x1 on 5.5 mm
    slices), as published FLAIR-thresholding baselines use; 0 = off."""
    final_smoothing_sigma_mm: float = 0.0
    """Beyond the paper: after the median filter and the standardisation (so the threshold stays in SDs of the
    unsmoothed score), 3-D Gaussian smoothing (sigma in mm, normalised inside the brain like
    ``smoothing_sigma_mm``) of the whole combined score, the FLAIR and T2 terms included, not of E alone. The
    median removes speckle but leaves a score that is flat-topped and ragged at a lesion's outline; the
    Gaussian grades it from the lesion's core to its edge, where the reference outlines
    (drawn by hand or by segmentation algorithms) are smooth, and thins the isolated bright voxels of
    normal tissue. It also blurs lesions of a few mm into their surroundings, so it is chosen on
    validation, not fixed. 0 = off."""
    standardise: str = "none"
    """Last step: 'robust' rescales the score of each case to (score - median) / (1.4826 MAD) over
    its brain, so a threshold means "this many robust SDs above the case's typical tissue" and
    carries over between sites; 'zscore' to (score - mean) / SD over the brain (the scale of the
    FLAIR z-score baselines, whose thresholds transfer); 'normal' to (score - mean) / SD over the
    brain voxels that look normal on FLAIR (FLAIR z-score at most ``normal_max_flair_z``), so that
    the lesion's own size does not set the scale (a large glioma inflates a whole-brain SD, a few
    small MS lesions do not); with the FLAIR term the energy is standardised on the same voxels;
    'none' keeps the energy's own scale (the faithful ADM)."""
    normal_max_flair_z: float = 1.0
    """With ``standardise = 'normal'`` or ``case_mixture``: the highest FLAIR z-score (in the model's
    normalisation) of a voxel that counts as normal-looking tissue (the gliomas and MS lesions the
    product targets are FLAIR-hyperintense; the strong FLAIR baseline's transferred thresholds lie at
    1.06-1.10)."""
    load_weight: float = 0.0
    """After standardisation: add ``load_weight`` x ln(share of the case's brain scoring at least
    ``load_reference`` / 1 %) to every brain voxel, i.e. lower the case's effective threshold by that
    much where its apparent lesion load is large and raise it where it is small. A threshold in
    per-case SDs means more voxels where a large glioma fills the brain than where a few MS lesions
    barely move it (the Dice-best threshold of a case fell with its lesion volume, correlation -0.72
    over the study's 19 cases); the share above a fixed level is the load estimate available without
    labels. A per-case constant, so it keeps each case's ranking; 0 = off. Needs a standardised
    score (``standardise`` not 'none'), whose units ``load_reference`` is in."""
    load_reference: float = 1.0
    """With ``load_weight``: the score (in the standardised units) above which a voxel counts towards
    the apparent lesion load."""
    asymmetry_weight: float = 0.0
    """Beyond the paper: with the FLAIR term, also add this weight times the FLAIR asymmetry of each
    voxel, how far its FLAIR z-score exceeds the brightest FLAIR z-score within
    ``asymmetry_window_mm`` of its mirror image across the mid-sagittal plane (0 where it does not).
    A glioma, a metastasis or an MS lesion is one-sided at the scale of a few mm, while the bright
    normal tissue that FLAIR thresholding mistakes for lesion (cortex, periventricular caps, the
    choroid plexus) has a bright twin in the other hemisphere; the window absorbs the few mm by which
    the two hemispheres' anatomy differs. 0 = off."""
    flair_sheet_weight: float = 0.0
    """Beyond the paper: the FLAIR z-score that the FLAIR term and the FLAIR asymmetry read is first lowered by
    this weight times its sheet response (:func:`~ADMAnomalyLib.postprocess.sheet_response` at
    ``sheet_sigma_mm``): how much a voxel lies on a bright sheet, thin across and extended along two axes.
    Normal FLAIR-bright tissue is mostly such sheets (the cortical ribbon, the insular cortex, the lining of
    sulci and ventricles), and so are the false positives left once the asymmetry has removed what has a twin
    across the midline (the insular cortex of both hemispheres); lesions are blobs, or flat inside. The
    energy gate reads it lowered as well (a sheet is no hyperintensity the energy may raise); the T2 term and the
    normal-tissue scale read the FLAIR as it is. 0 = off."""
    score_sheet_weight: float = 0.0
    """Beyond the paper: just before the median filter, the combined score (E with its asymmetry and rim, the
    FLAIR and T2 terms) is lowered by this weight times its own sheet response
    (:func:`~ADMAnomalyLib.postprocess.sheet_response` at ``sheet_sigma_mm``, in the score's units). Off its
    training sites E lights up grey matter and tissue boundaries, which are sheets as FLAIR's bright normal tissue
    is; this removes both, whatever term they come from. 0 = off."""
    sheet_sigma_mm: float = 1.5
    """With ``flair_sheet_weight`` or ``score_sheet_weight``: the scale (Gaussian sigma, mm) of the sheets, about
    the half-thickness of the cortical ribbon."""
    t2_asymmetry_weight: float = 0.0
    """Beyond the paper: with the FLAIR term, also add this weight times the same asymmetry of the
    native T2 z-score (``asymmetry_window_mm`` wide). Oedema and tumour are T2-bright and one-sided as
    well; where a site's FLAIR is poor (older sequences, little contrast between lesion and grey matter)
    the T2 carries the one-sided evidence FLAIR lacks, while T2-bright normal tissue (CSF) is
    symmetric. 0 = off."""
    t2_weight: float = 0.0
    """Beyond the paper: with the FLAIR term, also add up to this weight times the native T2 (in the units
    of the FLAIR term), on the cases whose FLAIR shows their hyperintensities less than their T2 does. Per
    case the weight is scaled by ``clip(q99(T2) - q99(FLAIR), 0, 1)``, the 99th percentiles of the two
    contrasts' mean/SD z-scores over the brain (whatever the normalisation), taken over the tissue that is
    not CSF-like; CSF-like voxels (T1 z-score at most ``t2_csf_max_t1_z``) get no T2 term. Older or 2-D
    FLAIR sequences show oedema barely above grey matter while their T2 shows it clearly; a scan whose FLAIR
    separates its hyperintensities as well as its T2 (every case of a modern protocol measured) is left as
    it was, and the CSF that makes T2 alone useless is gated out by its dark T1. Measured with T2 weighted as
    FLAIR (the bundled model: both 1): a ``flair_weight`` set otherwise leaves this weight where it was, so set
    both. 0 = off."""
    t2_csf_max_t1_z: float = -1.0
    """With ``t2_weight``: the highest T1 mean/SD z-score over the brain of a CSF-like voxel (no T2 term
    there, and left out of the percentiles that scale the term)."""
    shared_hyperintensity_weight: float = 0.0
    """Beyond the paper: with the FLAIR term, also add this weight times ``max(min(FLAIR, T2), 0)`` (the native
    FLAIR the FLAIR term reads and the native T2, in the same normalisation): the hyperintensity the two
    fluid-sensitive contrasts share. Oedema, tumour and MS lesions are bright on both; what FLAIR thresholding
    mistakes for lesion is mostly bright on one only: grey matter and FLAIR's artefacts (flow, the insular cortex)
    barely on T2, CSF not on FLAIR. On every scan, whatever its protocol, unlike ``t2_weight``. 0 = off."""
    energy_asymmetry_weight: float = 0.0
    """Beyond the paper: after smoothing and rim suppression, add this weight times the energy's own
    left-right asymmetry (how far E exceeds the highest E within ``asymmetry_window_mm`` of the voxel's
    mirror image across the mid-sagittal plane, 0 where it does not; in E's units, so the weight is
    relative to E). Off its training sites E lights up grey matter, CSF and tissue boundaries in both
    hemispheres, while a lesion is one-sided at the scale of a few mm; the term keeps E's ranking and
    lifts the part of it that has no twin across the midline. Needs no FLAIR. 0 = off."""
    asymmetry_window_mm: float = 5.0
    """With ``asymmetry_weight``, ``t2_asymmetry_weight`` or ``energy_asymmetry_weight``: width (mm along each axis, an odd number of voxels as for
    ``median_size_mm``) of the neighbourhood of the mirror image whose brightest voxel a voxel is
    compared with."""
    energy_gate_z: float | None = None
    """With the FLAIR term: the model's standardised evidence may raise a voxel's score only where
    the FLAIR z-score exceeds this value; elsewhere it is capped at its brain median (typical
    tissue), so it can only lower the score; None = off. The lesions the
    product targets (gliomas, MS) are FLAIR-hyperintense, while the energy's false positives on
    unseen sites lie in CSF, grey matter and tissue boundaries, which are not."""

    small_lesion_ml: float = 0.0
    """Beyond the paper: a case whose largest connected region (26-connected) scoring at least
    ``small_lesion_level`` is smaller than this many ml is scored again without the energy's smoothing and the
    median filter (``smoothing_sigma_mm`` and ``median_size_mm`` as 0; the final Gaussian and every other step
    as they are). Filters sized for gliomas of tens of ml round off the outlines of lesions a few mm across,
    and on the MS scan most of the error lay within 1 mm of the reference's outline; the largest region a
    glioma scan shows is tens of ml, an MS scan's a few (docs/domain_analysis.md, thirty-seventh round). The
    filter scale then follows the lesion scale the case itself shows, whatever the pathology. 0 = off."""
    small_lesion_level: float = 2.0
    """With ``small_lesion_ml``: the score (in the final units, load term included) at which the case's
    regions are measured: about where thresholds of standardised scores lie."""
    small_lesion_load: str = "always"
    """With ``small_lesion_ml``: whether a case scored again for its small lesions keeps the load term
    (``load_weight``): 'always', 'never', or 'thin': only when the scan's own slices are the grid it is scored on
    (at most ``preprocess.max_slice_mm`` apart), not on the thinner slices made from thicker ones
    (:mod:`~ADMAnomalyLib.slicing`). The load term reads the lesion load from the share of the brain above
    ``load_reference``; on a case already found to hold no region of ``small_lesion_ml``, that share is mostly
    the tail of normal tissue. Thresholds and load weights are chosen on 1 mm scans, where the term fits the MS
    scan; on thick slices partial volume lifts that tail (the MS scan made of 5 mm slices: 2.3 % → 4.2 % of the
    brain) and the term quadruples the label (docs/domain_analysis.md, forty-first round). Without the term a
    case's threshold reads as for a load of :data:`~ADMAnomalyLib.postprocess.LOAD_BASE_SHARE`."""
    min_component_mm3: float = 0.0
    """Beyond the paper, at the threshold: regions of the anomaly label (face-connected) smaller than this many
    mm³ are left out of it; the energy map keeps their scores. A voxel-scale speck above the threshold is noise
    for the lesions the product targets; the strong FLAIR baselines of the study drop the same (20 mm³). The
    voxel count follows each case's voxel size. 0 = off."""

    def __post_init__(self) -> None:
        if not 0 < self.case_mixture_share <= 1:
            raise ValueError(f"postprocess.case_mixture_share must lie in (0, 1], got {self.case_mixture_share!r} "
                             "(the frozen mixture alone is postprocess.case_mixture=false)")
        for name in ("load_weight", "asymmetry_weight", "flair_sheet_weight", "score_sheet_weight",
                     "t2_asymmetry_weight", "final_smoothing_sigma_mm", "t2_weight", "energy_asymmetry_weight",
                     "small_lesion_ml", "min_component_mm3", "shared_hyperintensity_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"postprocess.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("sheet_sigma_mm", "asymmetry_window_mm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"postprocess.{name} must be > 0, got {getattr(self, name)!r}")
        if self.energy_gate_z is not None:
            if (isinstance(self.energy_gate_z, bool) or not isinstance(self.energy_gate_z, numbers.Real)
                    or not math.isfinite(self.energy_gate_z)):
                raise ValueError(f"postprocess.energy_gate_z must be a finite FLAIR z-score or None (off), "
                                 f"got {self.energy_gate_z!r}")
            self.energy_gate_z = float(self.energy_gate_z)  # a --set 0 arrives as an int
        if not math.isfinite(self.small_lesion_ml) or not math.isfinite(self.small_lesion_level):
            raise ValueError("postprocess.small_lesion_ml and small_lesion_level must be finite numbers")
        if self.small_lesion_load not in SMALL_LESION_LOADS:
            raise ValueError(f"postprocess.small_lesion_load must be one of {SMALL_LESION_LOADS}, "
                             f"got {self.small_lesion_load!r}")
        if not math.isfinite(self.min_component_mm3):
            raise ValueError(f"postprocess.min_component_mm3 must be a finite volume, got {self.min_component_mm3!r}")
        if self.load_weight and self.standardise == "none":
            raise ValueError("postprocess.load_weight needs a standardised score (postprocess.standardise "
                             "'robust', 'zscore' or 'normal'): its reference level is in those units")

    @property
    def native_active(self) -> bool:
        """Whether any native-grid step (smoothing, rim, energy asymmetry, FLAIR term, the score's sheets, median
        filter, final smoothing, standardisation, load term) is enabled."""
        return (self.smoothing_sigma_mm > 0 or self.rim_erosion_mm > 0 or self.energy_asymmetry_weight != 0
                or self.intensity_term or self.score_sheet_weight != 0
                or self.median_size_mm > 0 or self.final_smoothing_sigma_mm > 0 or self.standardise != "none"
                or self.load_weight != 0)

    @property
    def intensity_term(self) -> bool:
        """Whether the score is combined with the FLAIR z-score (a FLAIR weight, its asymmetry, T2's term or
        asymmetry, the shared hyperintensity, or an energy gate)."""
        return (self.flair_weight != 0 or self.asymmetry_weight != 0 or self.t2_asymmetry_weight != 0
                or self.t2_weight != 0 or self.shared_hyperintensity_weight != 0 or self.energy_gate_z is not None)

    @property
    def needs_flair(self) -> bool:
        """Whether the native FLAIR z-score is an input (the FLAIR term, or the normal-tissue scale)."""
        return self.intensity_term or self.standardise == "normal"

    @property
    def native_contrasts(self) -> tuple[str, ...]:
        """The contrasts whose native z-scored volumes the native-grid steps read (what
        ``prepare_case(..., keep_native=...)`` must keep)."""
        reads = {"flair"} | ({"t1", "t2"} if self.t2_weight else set())
        reads |= {"t2"} if self.t2_asymmetry_weight or self.shared_hyperintensity_weight else set()
        return tuple(c for c in POSTPROCESS_CONTRASTS if c in reads)

    @property
    def active(self) -> bool:
        """Whether any post-processing is enabled."""
        return self.flip_tta or self.case_mixture or self.native_active


@dataclass
class ADMConfig:
    """Everything needed to rebuild, train and apply one model."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "paper"
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    """Inference post-processing (absent in older model files, which load with the defaults: off)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ADMConfig":
        """Inverse of :meth:`to_dict`; unknown keys are rejected so typos do not pass silently."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ADMConfig section(s): {', '.join(sorted(unknown))}")
        train = dict(data.get("train", {}))
        if "amp" in train:  # model files before the shared precision vocabulary
            amp = train.pop("amp")
            train.setdefault("precision", {"off": "fp32"}.get(amp, amp))
        model = dict(data.get("model", {}))
        if isinstance(model.get("density_intensities"), bool):  # model files before per-contrast intensities
            model["density_intensities"] = CONTRASTS if model["density_intensities"] else ()
        postprocess = dict(data.get("postprocess", {}))
        if "median_size" in postprocess:  # model files before mm-sized post-processing (1 mm data)
            postprocess.setdefault("median_size_mm", float(postprocess.pop("median_size")))
        return cls(
            preprocess=_build(PreprocessConfig, data.get("preprocess", {})),
            model=_build(ModelConfig, model),
            train=_build(TrainConfig, train),
            preset=str(data.get("preset", "custom")),
            postprocess=_build(PostprocessConfig, postprocess),
        )


def _build(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        kwargs[name] = tuple(value) if isinstance(default, tuple) else value
    return cls(**kwargs)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "small": {
        "model": {"ctoc_width": 16},
        "train": {"epochs_ctoc": 12, "epochs_joint": 6, "batch_size": 16},
    },
    "tiny": {
        "model": {"ctoc_width": 4, "ctoc_res_blocks": 1},
        "train": {"epochs_ctoc": 1, "epochs_joint": 1, "batch_size": 4},
        "preprocess": {"image_size": 32, "min_brain_pixels": 8},
    },
}


PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "faithful": {},
    "transfer": {
        "preprocess": {"normalisation": "robust", "native_bias_correction_levels": 2, "max_slice_mm": 2.0},
        "train": {"augmentation": "site"},
        "model": {"ctoc_uncertainty": True, "density_residuals": ("flair",)},
        "postprocess": {"smoothing_sigma_mm": 2.0, "rim_erosion_mm": 3.0, "flair_weight": 1.0,
                        "asymmetry_weight": 1.0, "energy_asymmetry_weight": 2.0, "median_size_mm": 5.0,
                        "final_smoothing_sigma_mm": 1.0, "standardise": "zscore", "load_weight": 0.6,
                        "t2_weight": 1.0, "energy_gate_z": 0.0, "small_lesion_ml": 10.0, "small_lesion_load": "thin",
                        "min_component_mm3": 20.0},
    },
}
"""What a model is trained for, orthogonal to the size presets: 'faithful' is the ADM of the paper
(every default); 'transfer' is the bundled model's configuration for scans from other sites and
pathologies (robust normalisation, site-shift augmentation, CtoC uncertainty, only the FLAIR residual
among the density features, slices thicker than 2 mm resampled to 2 mm at inference, the FLAIR term read from an
N4-corrected FLAIR, the T2 term weighted as the FLAIR term, a Gaussian of the combined score after its
standardisation, the energy gated by FLAIR (it may not raise a voxel whose FLAIR z-score is at most 0 above typical
tissue), the energy smoothing and the median filter left out on a case whose largest region at the score 2 is under
10 ml (small lesions), and there without the load term on the thin slices made from thick ones, regions under 20 mm³
left out of the anomaly label, and the post-processing the
leave-one-domain-out study chose, with the load weight ``admanomaly calibrate --choose-load-weight`` chose
over the four domains; see README, "The method as implemented")."""
LABEL_FIELDS = ("min_component_mm3",)
"""The post-processing fields that shape only the anomaly label at the threshold, never the energy: a model's
threshold stays valid when they change."""
INFERENCE_PREPROCESS_FIELDS = ("native_normalisation", "native_bias_correction_levels", "max_slice_mm")
"""The preprocessing fields a trained model may take at inference, like post-processing: those that shape only
the native volumes the post-processing reads, and the resampling of thick slices (the networks then see slices
like those they were trained on)."""
TRAINING_SECTIONS = ("preprocess", "model", "train")
"""The config sections that shape the trained networks (post-processing is applied after them)."""


def ctoc_model_fields(config: ADMConfig) -> dict[str, Any]:
    """The model settings that shape the CtoC network (its sizes, the median bias, the contrasts);
    with the preparation, what decides whether one trained CtoC can serve another configuration."""
    return {k: v for k, v in config.to_dict()["model"].items()
            if k.startswith("ctoc_") or k in ("median_bias", "n_contrasts")}


def profile_overrides(name: str) -> dict[str, dict[str, Any]]:
    """The section overrides of profile ``name`` (copies; a ValueError names the choices)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return {section: dict(values) for section, values in PROFILES[name].items()}


def preset(name: str, **overrides: dict[str, Any]) -> ADMConfig:
    """Return the named preset, optionally with section overrides, e.g.
    ``preset("small", train={"epochs_joint": 2})``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in PRESETS[name].items()}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    config = ADMConfig.from_dict(sections)
    config.preset = name
    return config
