"""The study's settings and its methods: every row of the table, what it trains and how it is
post-processed (no training values live anywhere else)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..config import CONTRASTS, ADMConfig, PostprocessConfig, PreprocessConfig, ctoc_model_fields, preset
from ..postprocess import LOAD_WEIGHTS

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
    split: str = "patients"
    """'patients': ``n_folds`` patient-level folds of one folder; 'domains': leave one domain out
    (each domain of a domains file in turn is the test set, the others train and validate)."""
    left_out: tuple[str, ...] = ()
    """Domain split only: the domains left out in turn (empty: every domain of the domains file). One
    fold of a 128 px study takes most of an hour on a 2-core CPU; a seed or option can be checked on
    the domain it is meant for. Every domain still trains and validates the folds it is not left out of."""
    methods: tuple[str, ...] = ()
    """Methods to run (empty: :data:`DEFAULT_METHODS`, or :data:`DOMAIN_METHODS` for the domain split)."""
    ocsvm_max_train: int = 10_000
    mahalanobis_max_train: int = 500_000
    smoothing_sigma_mm: float = 3.0
    rim_erosion_mm: float = 3.0
    median_size_mm: float = 5.0
    """Window of the 3-D median filter of the 'median' placeholder of the ADM variants."""
    min_component_mm3: float = 20.0
    """``+cc``: regions smaller than this volume are left out of the label at the threshold (20 voxels at 1 mm);
    the transfer profile's ``PostprocessConfig.min_component_mm3`` is the same."""
    search_cases_per_group: int | None = 4
    """The '+post' search scores at most this many training cases of each selection group (spread
    over the group's cases in id order; None: all). The search post-processes every candidate
    on whole brains, which dominates a 2-core run; the threshold is still chosen on all cases."""
    synthetic_cases_per_domain: int = 0
    """Domain split: this many cases of each domain (spread over its cases in id order) are also loaded with small
    lesions painted into their white matter (:mod:`ADMAnomalyLib.synthetic`). In every run the copies made from its
    training domains form one more group of the post-processing search, so that it sees small lesions even when
    every training domain's lesions are large; the threshold and the load weight stay chosen on the real domains.
    0: none (every study before the forty-fifth round)."""
    synthetic_exclusion_mm: float = 5.0
    """A synthetic selection case's validation voxels leave out its scan's own lesion and this margin round it."""
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StudySettings":
        """The settings a study JSON recorded (:meth:`to_dict`; JSON turned its tuples into lists), e.g. to
        find the networks a finished study kept."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

    def method_names(self) -> list[str]:
        """The methods this study runs, in table order."""
        if self.methods:
            return list(self.methods)
        return list(DOMAIN_METHODS if self.split == "domains" else DEFAULT_METHODS)


def quick_settings(**overrides: Any) -> StudySettings:
    """2-core CPU setting (< 30 min): 3 folds, 1 seed, 64x64 slices, 4 + 3 epochs of the small preset;
    the patient split leaves out the costliest in-domain rows (:data:`QUICK_METHODS`), the domain split
    runs :data:`DOMAIN_METHODS`."""
    methods = QUICK_METHODS if overrides.get("split", "patients") == "patients" else ()
    return dataclasses.replace(StudySettings(methods=methods), **overrides)


def full_settings(**overrides: Any) -> StudySettings:
    """GPU setting: 3 folds x 3 seeds, the paper preset at 128x128 with the paper's 50 + 50 epochs."""
    base = StudySettings(name="full", seeds=(0, 1, 2), preset="paper", image_size=128, epochs_ctoc=50,
                         epochs_joint=50, ocsvm_max_train=50_000, singularity_steps=1500,
                         singularity_image_size=128, search_cases_per_group=None)
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------------------------
# methods registry

FLAIR_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
"""Candidate weights of the FLAIR z-score added to E (picked by validation AUPRC)."""
NORMAL_CUTOFFS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.0, -0.5)
"""Candidate ``normal_max_flair_z`` of a case mixture: the highest FLAIR z of the pixels its mixture is
estimated over (the default, 1, first: it stays on ties). With (1, 0.5, 0.25) every fold of the 64 px
study chose 0.25, the edge, so the grid reaches below the brain's typical FLAIR."""
CASE_MIXTURE_SHARES: tuple[float, ...] = (0.5, 1.0, 0.25)
"""Candidate ``case_mixture_share`` of a blend of the case and the frozen mixture (equal weights first:
it stays on ties)."""
FINAL_SMOOTHING_SIGMAS_MM: tuple[float, ...] = (0.0, 0.5, 1.0)
"""Candidate sigmas (mm) of the Gaussian of the combined score: at most 1 mm (full width at half maximum 2.4 mm),
so that a 3 mm lesion keeps its peak. With 2 mm among them the MS fold's search, run on gliomas, took 2 and its
scan lost AUPRC and Dice at threshold (docs/domain_analysis.md, thirty-second round)."""
FLAIR_SHEET_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0)
"""Candidate weights of the FLAIR's sheet response (``PostprocessConfig.flair_sheet_weight``), 0 first: a tie keeps
the row without it. Lowering FLAIR z by 0.5-1 x its sheet response raised FLAIR z +med5 in all four domains on a
first look and 2 lowered MS; in the study every fold then chose 1, and the row gained on TCGA only
(docs/domain_analysis.md, thirty-fifth round)."""
SCORE_SHEET_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
"""Candidate weights of the combined score's own sheet response (``PostprocessConfig.score_sheet_weight``), 0
first: a tie keeps the row without it. Every fold of the study chose 1, with the FLAIR's sheets' result within 0.004
(docs/domain_analysis.md, thirty-fifth round)."""
ENERGY_GATES: tuple[float | None, ...] = (None, -1.0, -0.5, 0.0, 0.5, 1.0)
"""Candidate ``PostprocessConfig.energy_gate_z``: the FLAIR z-score at or below which the standardised energy (with
its asymmetry) may no longer raise a voxel above typical tissue; None (no gate) first, so a tie keeps the row
without it. On the bundled row's own choices, gates from -2 to 0.5 raised MS, BraTS-2013 and TCGA and left CBICA
where it was; 1 and above cost BraTS-2013 (docs/domain_analysis.md, thirty-sixth round)."""
SHARED_HYPERINTENSITY_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
"""Candidate ``PostprocessConfig.shared_hyperintensity_weight``, 0 first: a tie keeps the row without it. Added to
the bundled row's final score on a first look (seeds 1 and 2, the fold models), 0.25-1 raised BraTS-2013 and MS and
lowered TCGA, and CBICA from 0.5; in the study the folds chose 0-1 and the row traded domains, so the bundled model
leaves the term off (docs/domain_analysis.md, forty-second round)."""
SMALL_LESION_ML = 10.0
"""``PostprocessConfig.small_lesion_ml`` of the '+scale' row, unsearched (the training domains of the fold
that leaves the small lesions out hold none to choose it on): a 10 ml sphere is 27 mm across. At the score 2
the largest region of every glioma scan of the study measured 17-198 ml, that of the MS scan 1.9 ml
(docs/domain_analysis.md, thirty-seventh round)."""
POST_CANDIDATES: dict[str, tuple[float | None, ...]] = {
    "normal_max_flair_z": NORMAL_CUTOFFS,
    "case_mixture_share": CASE_MIXTURE_SHARES,
    "smoothing_sigma_mm": (0.0, 2.0),
    "rim_erosion_mm": (0.0, 3.0),
    "flair_weight": FLAIR_WEIGHTS,
    "median_size_mm": (0.0, 3.0, 5.0),
    "asymmetry_weight": (0.0, 0.5, 1.0, 2.0),
    "t2_asymmetry_weight": (0.0, 0.5, 1.0),
    "energy_asymmetry_weight": (0.0, 0.5, 1.0, 2.0, 4.0),
    "final_smoothing_sigma_mm": FINAL_SMOOTHING_SIGMAS_MM,
    "flair_sheet_weight": FLAIR_SHEET_WEIGHTS,
    "score_sheet_weight": SCORE_SHEET_WEIGHTS,
    "energy_gate_z": ENERGY_GATES,
    "shared_hyperintensity_weight": SHARED_HYPERINTENSITY_WEIGHTS,
}
"""Candidate values of the post-processing fields a method chooses on validation (``search``)."""
POST_SEARCH: tuple[str, ...] = ("smoothing_sigma_mm", "rim_erosion_mm", "flair_weight", "median_size_mm")
"""The '+post' search order: one field at a time (greedy, 11 configurations instead of 84)."""
ASYMMETRY_SEARCH: tuple[str, ...] = ("smoothing_sigma_mm", "rim_erosion_mm", "flair_weight", "asymmetry_weight",
                                     "median_size_mm")
""":data:`POST_SEARCH` with the weight of the FLAIR asymmetry chosen after the FLAIR term's."""
T2_ASYMMETRY_SEARCH: tuple[str, ...] = ("smoothing_sigma_mm", "rim_erosion_mm", "flair_weight", "asymmetry_weight",
                                        "t2_asymmetry_weight", "median_size_mm")
""":data:`ASYMMETRY_SEARCH` with the weight of the T2 asymmetry chosen after the FLAIR asymmetry's."""
ENERGY_ASYMMETRY_SEARCH: tuple[str, ...] = ("smoothing_sigma_mm", "rim_erosion_mm", "flair_weight", "asymmetry_weight",
                                            "energy_asymmetry_weight", "median_size_mm")
""":data:`ASYMMETRY_SEARCH` with the weight of the energy's own asymmetry chosen after the FLAIR asymmetry's,
so that the bundled row's choices come first and the search may keep them with the weight 0."""
GATED_ENERGY_ASYMMETRY_SEARCH: tuple[str, ...] = ("smoothing_sigma_mm", "rim_erosion_mm", "energy_gate_z",
                                                  *ENERGY_ASYMMETRY_SEARCH[2:])
""":data:`ENERGY_ASYMMETRY_SEARCH` with the energy gate chosen before the weights: with the energy's FLAIR-dark
false alarms capped, the FLAIR term, the asymmetries and the median filter are chosen on what remains."""
FINAL_SMOOTHING_SIGMA_MM = FINAL_SMOOTHING_SIGMAS_MM[-1]
"""The Gaussian (sigma, mm) of the combined score in the FLAIR baselines that carry one (unsearched: a
baseline has no validation search): the widest the search may choose."""
RAW_SEARCH_FIELDS = frozenset({"normal_max_flair_z", "case_mixture_share"})
"""Searched fields that change a case mixture's raw energies, not only their post-processing: each
candidate is scored by the networks (:func:`raw_variants`)."""


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
    """For 'adm' and 'flair_filtered': PostprocessConfig overrides; the values 'smooth', 'rim' and
    'median' take the settings'."""
    search: tuple[str, ...] = ()
    """For 'adm': PostprocessConfig fields chosen on the validation data, greedily one after the
    other in this order, each from its :data:`POST_CANDIDATES` grid (the others as chosen so far)."""
    search_criterion: str = "mean"
    """What the search maximises over the selection groups' validation AUPRCs (each training domain's,
    in the domain split): 'mean', or 'worst', the lowest of them: a choice that must hold on the
    training site it suits least, as it must on an unseen one."""
    small_components: bool = False
    """At the threshold, the anomaly label leaves out the regions smaller than the settings' ``min_component_mm3``
    (as ``predict`` does with ``PostprocessConfig.min_component_mm3``): Dice, precision and recall read that label;
    AUROC, AUPRC and best Dice read the scores. Study JSONs written before the thirty-ninth round lowered those
    regions' scores to just below the threshold, so their AUPRC read that map (a difference of about 0.001)."""
    native_normalisation: str | None = None
    """``PreprocessConfig.native_normalisation`` of the native FLAIR the row reads: for 'adm' its FLAIR
    term's (None: the network's own normalisation; a post-processing choice that needs no network of
    its own), for 'flair' and 'flair_filtered' the score's (None: the baselines' z-score)."""
    native_bias_correction_levels: int = 0
    """``PreprocessConfig.native_bias_correction_levels`` of the native contrasts the row reads (its
    FLAIR term, a FLAIR baseline's score): N4 before their normalisation; 0 = none."""
    held_out_selection: bool = False
    """For 'adm', domain split only: the training cases' scores that the search, the threshold and the
    load weight read come from the same network trained without the case's domain (on the run's other
    training domains), so that every choice is made on energies of an unseen domain, as the test
    domain's are; the test cases' come from the run's network as always."""
    t2_per_flair_weight: float = 0.0
    """For 'adm': the T2 term's weight (``PostprocessConfig.t2_weight``) as this multiple of the FLAIR weight,
    in every candidate of the search and in the choice (unsearched itself); 0 = no T2 term."""
    load_weights: tuple[float, ...] = ()
    """For 'adm': candidate ``PostprocessConfig.load_weight`` values, one chosen after the search by how
    well its threshold transfers between the selection groups (leave one training domain out in turn,
    :func:`~ADMAnomalyLib.metrics.choose_load_weight`); empty: the spec's own (default 0)."""


def _with_model(network: dict[str, dict[str, Any]], **model: Any) -> dict[str, dict[str, Any]]:
    """The overrides of ``network`` with other model settings: a variant that differs after step 1."""
    return {**network, "model": {**network.get("model", {}), **model}}


T2_TERM_WEIGHT = 1.0
"""The weight of the T2 term (``PostprocessConfig.t2_weight``) in the rows that carry it, relative to the
weight of their FLAIR evidence (1 in a FLAIR baseline; the chosen ``flair_weight`` in an ADM row,
:attr:`MethodSpec.t2_per_flair_weight`): T2 counts as much as FLAIR where FLAIR is the weaker contrast.
Not searched: the term is zero on every case whose FLAIR tail reaches its T2 tail, so training domains
without a weak-FLAIR site tie on every weight and could only ever keep it off; an unscaled weight of 1 on
an ADM row whose FLAIR weight was 0.5 doubled the evidence the threshold was chosen for
(docs/domain_analysis.md, thirtieth and thirty-first rounds)."""
NATIVE_N4_LEVELS = 2
"""Fitting levels of the N4 rows' bias-field correction (of what the post-processing reads, or of the
N4in network's input as well): a third starts to fit a large glioma's own
brightness into the field (docs/domain_analysis.md, twenty-seventh round)."""


_ADM_PLUS: dict[str, dict[str, Any]] = {"preprocess": {"normalisation": "robust"}, "train": {"augmentation": "site"},
                                        "model": {"ctoc_uncertainty": True}}
_ADM_PLUS_F = _with_model(_ADM_PLUS, density_residuals=("flair",))
_ADM_PLUS_F_BRIGHTER = _with_model(_ADM_PLUS_F, residual_direction="brighter")
NETWORKS: dict[str, dict[str, dict[str, Any]]] = {
    "ADM": {},
    "ADM_ct": {"model": {"use_dr": False}},
    "ADM_dr": {"model": {"use_ctoc": False}},
    "ADM_woj": {"train": {"joint": False}},
    "ADM+X": {"model": {"density_intensities": CONTRASTS}},
    "ADM robust-norm": {"preprocess": {"normalisation": "robust"}},
    "ADM site-aug": {"train": {"augmentation": "site"}},
    "ADM unc": {"model": {"ctoc_uncertainty": True}},
    "ADM+": _ADM_PLUS,
    "ADM+ FT2": _with_model(_ADM_PLUS, density_residuals=("flair", "t2")),
    "ADM+ F": _ADM_PLUS_F,
    "ADM+ F>": _ADM_PLUS_F_BRIGHTER,
    "ADM+ F> ct": _with_model(_ADM_PLUS_F_BRIGHTER, use_dr=False),
    "ADM+ F w32": _with_model(_ADM_PLUS_F, ctoc_width=32),
    "ADM+ F hist": {**_ADM_PLUS_F, "preprocess": {"normalisation": "histogram"}},
    "ADM+ F> ct hist": {**_with_model(_ADM_PLUS_F_BRIGHTER, use_dr=False), "preprocess": {"normalisation": "histogram"}},
    "ADM+ F ctx": _with_model(_ADM_PLUS_F, ctoc_context_slices=1),
    "ADM+ F ctx tp": {**_with_model(_ADM_PLUS_F, ctoc_context_slices=1),
                      "train": {**_ADM_PLUS_F["train"], "through_plane_mix": 1.0}},
    "ADM+ F mir": _with_model(_ADM_PLUS_F, ctoc_mirror_context=True),
    "ADM+ F> ct mir": _with_model(_ADM_PLUS_F_BRIGHTER, use_dr=False, ctoc_mirror_context=True),
    "ADM+ F> ct XF": _with_model(_ADM_PLUS_F_BRIGHTER, use_dr=False, density_intensities=("flair",)),
    "ADM+ F noT2": _with_model(_ADM_PLUS_F, ctoc_flair_hides_t2=True),
    "ADM+ F> ct noT2": _with_model(_ADM_PLUS_F_BRIGHTER, use_dr=False, ctoc_flair_hides_t2=True),
    "ADM+ F N4in": {**_ADM_PLUS_F, "preprocess": {**_ADM_PLUS_F["preprocess"], "bias_correction_levels": NATIVE_N4_LEVELS}},
}
"""Config overrides of each trained ADM network (all on top of the study's preset)."""


def _post_cc_row(network: str, standardise: str, description: str, load: bool = False,
                 case_mixture: bool = False, choose_cutoff: bool = False, share: float = 1.0,
                 choose_share: bool = False, flip: bool = False, native_normalisation: str | None = None,
                 asymmetry: bool = False, t2_asymmetry: bool = False, energy_asymmetry: bool = False,
                 search_criterion: str = "mean", held_out: bool = False, n4_levels: int = 0,
                 t2_per_flair_weight: float = 0.0, final_smoothing: bool = False,
                 flair_sheets: bool = False, score_sheets: bool = False, energy_gate: str = "",
                 small_lesion_ml: float = 0.0, shared_hyperintensity: bool = False) -> MethodSpec:
    """An improvement row of ``network`` with the '+post' search, ``standardise`` last and small
    components removed at the threshold; with ``load`` the load weight chosen among
    :data:`~ADMAnomalyLib.postprocess.LOAD_WEIGHTS`; with ``case_mixture`` each case scored with its own
    mixture (``share`` of the energy, the frozen mixture the rest), whose normal-tissue cut-off the
    search chooses first with ``choose_cutoff`` and whose share it chooses next with ``choose_share``;
    with ``flip`` the energy averaged with that of the left-right mirrored slices (flip TTA); with
    ``native_normalisation`` the FLAIR term normalised that way; with ``asymmetry`` the search also
    chooses the weight of the FLAIR asymmetry (:data:`ASYMMETRY_SEARCH`), with ``t2_asymmetry`` then
    T2's (:data:`T2_ASYMMETRY_SEARCH`), with ``energy_asymmetry`` then the energy's own
    (:data:`ENERGY_ASYMMETRY_SEARCH`); ``search_criterion`` is :attr:`MethodSpec.search_criterion` and
    ``held_out`` :attr:`MethodSpec.held_out_selection`; ``n4_levels`` its
    :attr:`MethodSpec.native_bias_correction_levels`; ``t2_per_flair_weight`` its
    :attr:`MethodSpec.t2_per_flair_weight`; with ``final_smoothing`` the search then chooses the Gaussian of the
    combined score, last, on the median filter already chosen (sigma 0 first: a tie keeps the row without it); with
    ``energy_gate`` 'last' the search then chooses the energy gate, 'first' before the weights
    (:data:`GATED_ENERGY_ASYMMETRY_SEARCH`, with ``energy_asymmetry``); with ``flair_sheets`` it then chooses the
    weight of the FLAIR's sheet response, and with ``score_sheets`` that of the combined score's own, last of all
    (0 first), so that the sheets are weighed on the gated energy; with ``shared_hyperintensity`` it then chooses the
    weight of the hyperintensity FLAIR and T2 share (0 first), after the gate; ``small_lesion_ml`` is the unsearched
    ``PostprocessConfig.small_lesion_ml``."""
    if energy_gate not in ("", "first", "last") or (energy_gate == "first" and not energy_asymmetry):
        raise ValueError(f"energy_gate must be '', 'last' or, with energy_asymmetry, 'first'; got {energy_gate!r}")
    post = {"standardise": standardise, **({"case_mixture": True} if case_mixture else {}),
            **({"case_mixture_share": share} if share != 1 else {}), **({"flip_tta": True} if flip else {}),
            **({"small_lesion_ml": small_lesion_ml} if small_lesion_ml else {})}
    search = ((("normal_max_flair_z",) if choose_cutoff else ())
              + (("case_mixture_share",) if choose_share else ())
              + (GATED_ENERGY_ASYMMETRY_SEARCH if energy_gate == "first"
                 else ENERGY_ASYMMETRY_SEARCH if energy_asymmetry else T2_ASYMMETRY_SEARCH if t2_asymmetry
                 else ASYMMETRY_SEARCH if asymmetry else POST_SEARCH)
              + (("final_smoothing_sigma_mm",) if final_smoothing else ())
              + (("energy_gate_z",) if energy_gate == "last" else ())
              + (("shared_hyperintensity_weight",) if shared_hyperintensity else ())
              + (("flair_sheet_weight",) if flair_sheets else ())
              + (("score_sheet_weight",) if score_sheets else ()))
    return MethodSpec("adm", "improvement", description, network, post, search=search,
                      search_criterion=search_criterion, small_components=True, load_weights=LOAD_WEIGHTS if load else (),
                      native_normalisation=native_normalisation, held_out_selection=held_out,
                      native_bias_correction_levels=n4_levels, t2_per_flair_weight=t2_per_flair_weight)


METHODS: dict[str, MethodSpec] = {
    "ADM": MethodSpec("adm", "paper", "ADM as published (faithful default)", "ADM"),
    "ADM_ct": MethodSpec("adm", "paper", "ablation: no DR (z = Z_ct)", "ADM_ct"),
    "ADM_dr": MethodSpec("adm", "paper", "ablation: no CtoC (z = Z_dr)", "ADM_dr"),
    "ADM_woj": MethodSpec("adm", "paper", "ablation: DR and DE losses optimised separately", "ADM_woj"),
    "DAGMM-conv": MethodSpec("dagmm", "baseline", "convolutional DAGMM, 1/Sigma_ii penalty"),
    "OCSVM": MethodSpec("ocsvm", "baseline", "one-class SVM, RBF on the 4 intensities, gamma 0.25"),
    "Mahalanobis": MethodSpec("mahalanobis", "baseline", "Mahalanobis distance of the 4 z-scored intensities"),
    "FLAIR z": MethodSpec("flair", "baseline", "FLAIR z-score inside the brain"),
    "FLAIR z +med3+cc": MethodSpec("flair_filtered", "baseline",
                                   "FLAIR z-score, 3 mm 3-D median filter, small components removed at the threshold",
                                   postprocess={"median_size_mm": 3.0}, small_components=True),
    "FLAIR z +med5+cc": MethodSpec("flair_filtered", "baseline",
                                   "FLAIR z-score, 5 mm 3-D median filter, small components removed at the threshold",
                                   postprocess={"median_size_mm": 5.0}, small_components=True),
    "FLAIR z +asym +med3+cc": MethodSpec("flair_filtered", "improvement", "FLAIR z +med3+cc of FLAIR z plus its "
                                         "left-right asymmetry (weight 1, 5 mm window)",
                                         postprocess={"median_size_mm": 3.0, "asymmetry_weight": 1.0},
                                         small_components=True),
    "FLAIR z +asym +med5+cc": MethodSpec("flair_filtered", "improvement", "FLAIR z +med5+cc of FLAIR z plus its "
                                         "left-right asymmetry (weight 1, 5 mm window)",
                                         postprocess={"median_size_mm": 5.0, "asymmetry_weight": 1.0},
                                         small_components=True),
    "FLAIR z +asym +asymT2 +med3+cc": MethodSpec("flair_filtered", "improvement", "FLAIR z +asym +med3+cc plus the "
                                                 "left-right asymmetry of T2 z (weight 0.5, 5 mm window)",
                                                 postprocess={"median_size_mm": 3.0, "asymmetry_weight": 1.0,
                                                              "t2_asymmetry_weight": 0.5}, small_components=True),
    "FLAIR z +asym +asymT2 +med5+cc": MethodSpec("flair_filtered", "improvement", "FLAIR z +asym +med5+cc plus the "
                                                 "left-right asymmetry of T2 z (weight 0.5, 5 mm window)",
                                                 postprocess={"median_size_mm": 5.0, "asymmetry_weight": 1.0,
                                                              "t2_asymmetry_weight": 0.5}, small_components=True),
    "FLAIR z N4 +med5+cc": MethodSpec("flair_filtered", "improvement", "FLAIR z +med5+cc of the FLAIR after N4 "
                                      f"bias-field correction ({NATIVE_N4_LEVELS} fitting levels)",
                                      postprocess={"median_size_mm": 5.0}, small_components=True,
                                      native_bias_correction_levels=NATIVE_N4_LEVELS),
    "FLAIR z N4 +T2g +med5+cc": MethodSpec("flair_filtered", "improvement", "FLAIR z N4 +med5+cc plus the T2 "
                                           f"term (weight {T2_TERM_WEIGHT:g}): T2 outside CSF-like tissue on the cases "
                                           "whose FLAIR shows their hyperintensities less than their T2",
                                           postprocess={"median_size_mm": 5.0, "t2_weight": T2_TERM_WEIGHT},
                                           small_components=True, native_bias_correction_levels=NATIVE_N4_LEVELS),
    "FLAIR z N4 +T2g +med5 +fsm+cc": MethodSpec(
        "flair_filtered", "improvement", "FLAIR z N4 +T2g +med5+cc with the combined score smoothed after the median "
        f"(Gaussian, sigma {FINAL_SMOOTHING_SIGMA_MM:g} mm)",
        postprocess={"median_size_mm": 5.0, "t2_weight": T2_TERM_WEIGHT,
                     "final_smoothing_sigma_mm": FINAL_SMOOTHING_SIGMA_MM},
        small_components=True, native_bias_correction_levels=NATIVE_N4_LEVELS),
    "FLAIR robust +med5+cc": MethodSpec("flair_filtered", "baseline", "FLAIR z +med5+cc on FLAIR normalised by "
                                        "median and IQR / 1.349 (the ADM+ networks' input) instead of mean and SD",
                                        postprocess={"median_size_mm": 5.0}, small_components=True,
                                        native_normalisation="robust"),
    "FLAIR hist +med5+cc": MethodSpec("flair_filtered", "baseline", "FLAIR z +med5+cc on histogram-standardised "
                                      "FLAIR instead of the z-score", postprocess={"median_size_mm": 5.0},
                                      small_components=True, native_normalisation="histogram"),
    "ADM +flip": MethodSpec("adm", "improvement", "ADM, left-right flip test-time augmentation", "ADM",
                            {"flip_tta": True}),
    "ADM +smooth": MethodSpec("adm", "improvement", "ADM, 3-D Gaussian smoothing of E", "ADM",
                              {"smoothing_sigma_mm": "smooth"}),
    "ADM +smooth+rim": MethodSpec("adm", "improvement", "ADM, smoothing and brain-rim suppression", "ADM",
                                  {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"}),
    "ADM +med+rim": MethodSpec("adm", "improvement", "ADM, 3-D median filter of E and rim suppression", "ADM",
                               {"median_size_mm": "median", "rim_erosion_mm": "rim"}),
    "ADM +smooth+rim+FLAIR": MethodSpec("adm", "improvement",
                                        "ADM +smooth+rim plus w x FLAIR z (w chosen on validation)", "ADM",
                                        {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"},
                                        search=("flair_weight",)),
    "ADM +smooth+rim+FLAIR+med": MethodSpec("adm", "improvement",
                                            "ADM +smooth+rim+FLAIR, then a 3-D median filter", "ADM",
                                            {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim",
                                             "median_size_mm": "median"}, search=("flair_weight",)),
    "ADM +smooth+rim+FLAIR+med+cc": MethodSpec("adm", "improvement",
                                               "ADM +smooth+rim+FLAIR+med, small components removed at the threshold",
                                               "ADM", {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim",
                                                       "median_size_mm": "median"}, search=("flair_weight",),
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
                                          search=("flair_weight",)),
    "ADM +post": MethodSpec("adm", "improvement", "ADM, post-processing chosen on validation (robust per-case "
                            "standardisation last)", "ADM", {"standardise": "robust"}, search=POST_SEARCH),
    "ADM robust-norm": MethodSpec("adm", "improvement", "ADM on median/IQR-normalised contrasts", "ADM robust-norm"),
    "ADM site-aug": MethodSpec("adm", "improvement", "ADM trained with site augmentation (bias field, gamma, "
                               "noise, blur)", "ADM site-aug"),
    "ADM unc": MethodSpec("adm", "improvement", "ADM with CtoC uncertainty (Z_ct divided by the predicted sigma)",
                          "ADM unc"),
    "ADM+": MethodSpec("adm", "improvement", "ADM with robust normalisation, site augmentation and CtoC "
                       "uncertainty", "ADM+"),
    "ADM+ +post": MethodSpec("adm", "improvement", "ADM+, post-processing chosen on validation (robust per-case "
                             "standardisation last)", "ADM+", {"standardise": "robust"}, search=POST_SEARCH),
    "ADM+ +post+cc": MethodSpec("adm", "improvement", "ADM+ +post, small components removed at the threshold",
                                "ADM+", {"standardise": "robust"}, search=POST_SEARCH, small_components=True),
    "ADM+ +post+cc (z)": MethodSpec("adm", "improvement", "ADM+ +post+cc with mean/SD instead of median/MAD "
                                    "standardisation last", "ADM+", {"standardise": "zscore"}, search=POST_SEARCH,
                                    small_components=True),
    "ADM+ +gate+post+cc": MethodSpec("adm", "improvement", "ADM+ +post+cc, the energy raising only FLAIR-"
                                     "hyperintense voxels (FLAIR z > 0)", "ADM+",
                                     {"standardise": "robust", "energy_gate_z": 0.0}, search=POST_SEARCH,
                                     small_components=True),
    "ADM+ FT2": MethodSpec("adm", "improvement", "ADM+ with only the FLAIR and T2 residuals (and Z_dr) in the "
                           "density features", "ADM+ FT2"),
    "ADM+ FT2 +gate+post+cc": MethodSpec("adm", "improvement", "ADM+ FT2 with the +gate+post+cc post-processing",
                                         "ADM+ FT2", {"standardise": "robust", "energy_gate_z": 0.0},
                                         search=POST_SEARCH, small_components=True),
    "ADM+ FT2 +post+cc (z)": MethodSpec("adm", "improvement", "ADM+ FT2 with the +post+cc (z) post-processing",
                                        "ADM+ FT2", {"standardise": "zscore"}, search=POST_SEARCH,
                                        small_components=True),
    "ADM+ FT2 +gate+post+cc (z)": MethodSpec("adm", "improvement", "ADM+ FT2, FLAIR gate, post-processing chosen "
                                             "on validation, mean/SD standardisation, small components removed",
                                             "ADM+ FT2", {"standardise": "zscore", "energy_gate_z": 0.0},
                                             search=POST_SEARCH, small_components=True),
    "ADM+ F": MethodSpec("adm", "improvement", "ADM+ with only the FLAIR residual (and Z_dr) in the density "
                         "features", "ADM+ F"),
    "ADM+ F +post+cc (z)": _post_cc_row("ADM+ F", "zscore", "ADM+ F with the +post+cc (z) post-processing"),
    "ADM+ F +post+cc (normal)": _post_cc_row("ADM+ F", "normal", "ADM+ F +post+cc standardised by mean/SD of the "
                                             "case's normal-looking tissue (FLAIR z <= 1) instead of its whole brain"),
    "ADM+ +post+cc (normal)": _post_cc_row("ADM+", "normal", "ADM+ +post+cc standardised by mean/SD of the case's "
                                           "normal-looking tissue (FLAIR z <= 1)"),
    "ADM+ F>": MethodSpec("adm", "improvement", "ADM+ F with only the brighter-than-predicted part of the FLAIR "
                          "residual, max(X - X_hat, 0)", "ADM+ F>"),
    "ADM+ F> +post+cc (z)": _post_cc_row("ADM+ F>", "zscore", "ADM+ F> with the +post+cc (z) post-processing"),
    "ADM+ F> ct": MethodSpec("adm", "improvement", "ADM+ F> without Z_dr: the density of the brighter FLAIR "
                             "residual alone", "ADM+ F> ct"),
    "ADM+ F> ct +post+cc (z)": _post_cc_row("ADM+ F> ct", "zscore", "ADM+ F> ct with the +post+cc (z) "
                                            "post-processing"),
    "ADM+ F> ct +post+cc (normal)": _post_cc_row("ADM+ F> ct", "normal", "ADM+ F> ct, post-processing chosen on "
                                                 "validation, standardised on the case's FLAIR-normal tissue"),
    "ADM+ F +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F +post+cc (z), the threshold lowered by "
                                              "w x ln(apparent lesion load), w chosen by leave-one-training-domain-"
                                              "out Dice", load=True),
    "ADM+ F +post+cc (z+load) FLAIR z-score": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +post+cc (z+load) whose FLAIR term reads the mean/SD z-score (the strong "
        "baseline's), not the network input's robust normalisation", load=True, native_normalisation="zscore"),
    "ADM+ F +asym +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F +post+cc (z+load) whose search "
                                                    "also chooses the weight of the FLAIR asymmetry", load=True,
                                                    asymmetry=True),
    "ADM+ F +asym +asymT2 +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F +asym +post+cc (z+load) "
                                                           "whose search then also chooses the weight of the T2 "
                                                           "asymmetry", load=True, t2_asymmetry=True),
    "ADM+ F +asym +asymT2 +post+cc (z+load) worst": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymT2 +post+cc (z+load) whose search maximises the lowest training "
        "domain's validation AUPRC instead of their mean", load=True, t2_asymmetry=True, search_criterion="worst"),
    "ADM+ F +asym +post+cc (z+load) held-out": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +post+cc (z+load) whose post-processing, threshold and load weight are "
        "chosen on each training domain's energies from a network trained without that domain", load=True,
        asymmetry=True, held_out=True),
    "ADM+ F +asym +asymT2 +post+cc (z+load) held-out": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymT2 +post+cc (z+load) chosen, as the held-out row, on energies of "
        "networks that did not see the validation domain", load=True, t2_asymmetry=True, held_out=True),
    "ADM+ F +asym +asymE +post+cc (z+load)": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +post+cc (z+load) whose search then also chooses the weight of the "
        "energy's own left-right asymmetry", load=True, energy_asymmetry=True),
    "ADM+ F +asym +asymE +post+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "the bundled row (ADM+ F +asym +asymE +post+cc (z+load)) with its FLAIR term and FLAIR "
        f"asymmetry read from the FLAIR after N4 bias-field correction ({NATIVE_N4_LEVELS} fitting levels)",
        load=True, energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS),
    "ADM+ F +asym +asymE +T2gF +post+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "the bundled row (ADM+ F +asym +asymE +post+cc (z+load) N4) plus the T2 term, weight "
        f"{T2_TERM_WEIGHT:g} x the chosen FLAIR weight (unsearched): T2 outside CSF-like tissue on the cases whose "
        "FLAIR shows their hyperintensities less than their T2", load=True, energy_asymmetry=True,
        n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT),
    "ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +T2gF +post+cc (z+load) N4 whose search then also chooses a Gaussian "
        "of the combined score after its median filter and standardisation", load=True, energy_asymmetry=True,
        n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT, final_smoothing=True),
    "ADM+ F +asym +asymE +T2gF +post+fsm+sheet+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4 (the bundled row) whose search then "
        "also chooses the weight of the FLAIR's sheet response, by which the FLAIR term and the FLAIR asymmetry "
        "are lowered on bright sheets (cortical ribbon, insular cortex)", load=True, energy_asymmetry=True,
        n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT, final_smoothing=True, flair_sheets=True),
    "ADM+ F +asym +asymE +T2gF +post+fsm+sheetS+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4 (the bundled row) whose search then "
        "also chooses the weight of the combined score's own sheet response, by which the score is lowered on "
        "bright sheets (cortical ribbon, tissue boundaries) before its median filter", load=True,
        energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT, final_smoothing=True,
        score_sheets=True),
    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4 (the bundled row) whose search then "
        "also chooses the energy gate, the FLAIR z-score at or below which the energy may not raise a voxel above "
        "typical tissue (CSF, skull-stripping residue)", load=True, energy_asymmetry=True,
        n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT, final_smoothing=True, energy_gate="last"),
    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+sheet+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 (the bundled row) whose search "
        "then also chooses the weight of the FLAIR's sheet response (cortical ribbon, insular cortex), on the gated "
        "energy", load=True, energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT,
        final_smoothing=True, energy_gate="last", flair_sheets=True),
    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 (the bundled row) whose cases "
        f"with no region of more than {SMALL_LESION_ML:g} ml at score {PostprocessConfig().small_lesion_level:g} are "
        "scored again without the energy smoothing and the median filter the search chose (small lesions)",
        load=True, energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT,
        final_smoothing=True, energy_gate="last", small_lesion_ml=SMALL_LESION_ML),
    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+shared+cc (z+load) N4 +scale": _post_cc_row(
        "ADM+ F", "zscore", "the bundled row (ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale) whose "
        "search then also chooses the weight of the hyperintensity FLAIR and T2 share, max(min(FLAIR, T2), 0), after "
        "the gate", load=True, energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT,
        final_smoothing=True, energy_gate="last", small_lesion_ml=SMALL_LESION_ML, shared_hyperintensity=True),
    "ADM+ F> ct +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale": _post_cc_row(
        "ADM+ F> ct", "zscore", "the bundled row's post-processing, search and small-lesion rule on ADM+ F> ct, the "
        "density of the brighter FLAIR residual alone (the learned energy that ranks lesions above raw FLAIR in more "
        "unseen domains than ADM+ F's)", load=True, energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS,
        t2_per_flair_weight=T2_TERM_WEIGHT, final_smoothing=True, energy_gate="last", small_lesion_ml=SMALL_LESION_ML),
    "ADM+ F +gate +asym +asymE +T2gF +post+fsm+cc (z+load) N4": _post_cc_row(
        "ADM+ F", "zscore", "the bundled row whose search chooses the energy gate first, after the smoothing and the "
        "rim, and the FLAIR term, the asymmetries and the median filter on the gated energy", load=True,
        energy_asymmetry=True, n4_levels=NATIVE_N4_LEVELS, t2_per_flair_weight=T2_TERM_WEIGHT, final_smoothing=True,
        energy_gate="first"),
    "ADM+ F +asym +asymE +post+cc (z+load) N4 held-out": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +post+cc (z+load) N4 (the bundled row) chosen, as the held-out "
        "row, on energies of networks that did not see the validation domain", load=True, energy_asymmetry=True,
        n4_levels=NATIVE_N4_LEVELS, held_out=True),
    "ADM+ F +asym +asymE +post+cc (z+load) held-out": _post_cc_row(
        "ADM+ F", "zscore", "ADM+ F +asym +asymE +post+cc (z+load) chosen, as the held-out row, on energies of "
        "networks that did not see the validation domain", load=True, energy_asymmetry=True, held_out=True),
    "ADM+ F noT2": MethodSpec("adm", "improvement", "ADM+ F whose CtoC makes FLAIR with T2 hidden too, so T2 "
                              "cannot rebuild the lesion into the FLAIR translation", "ADM+ F noT2"),
    "ADM+ F> ct noT2": MethodSpec("adm", "improvement", "ADM+ F> ct (the density of the brighter FLAIR residual "
                                  "alone) with the ADM+ F noT2 CtoC", "ADM+ F> ct noT2"),
    "ADM+ F noT2 +asym +asymE +post+cc (z+load)": _post_cc_row(
        "ADM+ F noT2", "zscore", "the bundled row (ADM+ F +asym +asymE +post+cc (z+load)) on ADM+ F noT2", load=True,
        energy_asymmetry=True),
    "ADM+ F N4in": MethodSpec("adm", "improvement", "ADM+ F trained and scored on all four contrasts after N4 "
                              f"bias-field correction ({NATIVE_N4_LEVELS} fitting levels)", "ADM+ F N4in"),
    "ADM+ F N4in +asym +asymE +post+cc (z+load)": _post_cc_row(
        "ADM+ F N4in", "zscore", "the bundled row (ADM+ F +asym +asymE +post+cc (z+load) N4) on ADM+ F N4in, whose "
        "FLAIR term reads the same corrected FLAIR", load=True, energy_asymmetry=True),
    "ADM+ F N4in +asym +asymE +post+cc (z+load) held-out": _post_cc_row(
        "ADM+ F N4in", "zscore", "ADM+ F N4in +asym +asymE +post+cc (z+load) chosen, as the held-out row, on "
        "energies of N4in networks that did not see the validation domain", load=True, energy_asymmetry=True,
        held_out=True),
    "ADM+ F hist": MethodSpec("adm", "improvement", "ADM+ F on histogram-standardised contrasts (landmarks at "
                              "the 10th-90th percentiles mapped to normal quantiles)", "ADM+ F hist"),
    "ADM+ F hist +post+cc (z+load)": _post_cc_row("ADM+ F hist", "zscore", "ADM+ F hist with the +post+cc "
                                                   "(z+load) post-processing", load=True),
    "ADM+ F hist +post+cc (z+load) FLAIR robust": _post_cc_row(
        "ADM+ F hist", "zscore", "ADM+ F hist +post+cc (z+load) whose FLAIR term reads the median/IQR "
        "normalisation (the bundled row's) instead of the histogram-standardised input", load=True,
        native_normalisation="robust"),
    "ADM+ F> ct hist": MethodSpec("adm", "improvement", "ADM+ F> ct on histogram-standardised contrasts: the "
                                  "density of the brighter FLAIR residual alone, with the ADM+ F hist CtoC",
                                  "ADM+ F> ct hist"),
    "ADM+ F> ct hist +post+cc (z+load) FLAIR robust": _post_cc_row(
        "ADM+ F> ct hist", "zscore", "ADM+ F> ct hist with the bundled row's post-processing, its FLAIR term "
        "reading the median/IQR normalisation", load=True, native_normalisation="robust"),
    "ADM+ F> ct XF": MethodSpec("adm", "improvement", "ADM+ F> ct with the brighter half of FLAIR intensity, "
                                "max(FLAIR, 0), beside the brighter FLAIR residual in the density features",
                                "ADM+ F> ct XF"),
    "ADM+ F> ct XF +asym +post+cc (z+load)": _post_cc_row("ADM+ F> ct XF", "zscore", "ADM+ F> ct XF with the "
                                                           "bundled row's post-processing search", load=True,
                                                           asymmetry=True),
    "ADM+ F +flip": MethodSpec("adm", "improvement", "ADM+ F, its energy averaged with that of the left-right "
                               "mirrored slices (flip TTA)", "ADM+ F", {"flip_tta": True}),
    "ADM+ F +flip +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F +post+cc (z+load) on the flip-TTA "
                                                    "energy", load=True, flip=True),
    "ADM+ F w32": MethodSpec("adm", "improvement", "ADM+ F with a CtoC of 32 channels (twice the small "
                             "preset's 16, half the paper's 64)", "ADM+ F w32"),
    "ADM+ F w32 +post+cc (z+load)": _post_cc_row("ADM+ F w32", "zscore", "ADM+ F w32 with the +post+cc (z+load) "
                                                  "post-processing", load=True),
    "ADM+ F> ct +post+cc (z+load)": _post_cc_row("ADM+ F> ct", "zscore", "ADM+ F> ct +post+cc (z) with the "
                                                  "lesion-load term", load=True),
    "ADM+ F ctx": MethodSpec("adm", "improvement", "ADM+ F whose CtoC also sees the slice before and after "
                             "(all contrasts but the one it makes)", "ADM+ F ctx"),
    "ADM+ F ctx +post+cc (z+load)": _post_cc_row("ADM+ F ctx", "zscore", "ADM+ F ctx with the +post+cc (z+load) "
                                                  "post-processing", load=True),
    "ADM+ F ctx tp": MethodSpec("adm", "improvement", "ADM+ F ctx trained with through-plane mixing: each "
                                "contrast's neighbours moved towards their slice by a random share up to 1",
                                "ADM+ F ctx tp"),
    "ADM+ F ctx tp +post+cc (z+load)": _post_cc_row("ADM+ F ctx tp", "zscore", "ADM+ F ctx tp with the +post+cc "
                                                     "(z+load) post-processing", load=True),
    "ADM+ F mir": MethodSpec("adm", "improvement", "ADM+ F whose CtoC also sees the slice mirrored across the "
                             "mid-sagittal plane, every contrast included", "ADM+ F mir"),
    "ADM+ F mir +asym +post+cc (z+load)": _post_cc_row("ADM+ F mir", "zscore", "ADM+ F mir with the bundled row's "
                                                        "post-processing (+asym +post+cc (z+load))", load=True,
                                                        asymmetry=True),
    "ADM+ F> ct mir": MethodSpec("adm", "improvement", "ADM+ F> ct whose CtoC also sees the mirrored slice: the "
                                 "density of the FLAIR brighter than its own mirror image and the other contrasts "
                                 "predict", "ADM+ F> ct mir"),
    "ADM+ F> ct mir +asym +post+cc (z+load)": _post_cc_row("ADM+ F> ct mir", "zscore", "ADM+ F> ct mir with the "
                                                            "bundled row's post-processing", load=True, asymmetry=True),
    "ADM cm": MethodSpec("adm", "improvement", "ADM scored with each case's own mixture: pi, mu, Sigma over its "
                         "FLAIR-normal pixels (FLAIR z <= 1), memberships from G_de", "ADM", {"case_mixture": True}),
    "ADM+ F cm": MethodSpec("adm", "improvement", "ADM+ F scored with each case's own mixture (pi, mu, Sigma over "
                            "its FLAIR-normal pixels)", "ADM+ F", {"case_mixture": True}),
    "ADM+ F cm +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F cm with the +post+cc (z+load) "
                                                 "post-processing", load=True, case_mixture=True),
    "ADM cm*": MethodSpec("adm", "improvement", "ADM cm, the FLAIR z cut-off of normal-looking pixels chosen "
                          "on the training domains' validation AUPRC", "ADM", {"case_mixture": True},
                          search=("normal_max_flair_z",)),
    "ADM+ F cm*": MethodSpec("adm", "improvement", "ADM+ F cm, the FLAIR z cut-off of normal-looking pixels "
                             "chosen on the training domains' validation AUPRC", "ADM+ F", {"case_mixture": True},
                             search=("normal_max_flair_z",)),
    "ADM cm* +post+cc (normal+load)": _post_cc_row("ADM", "normal", "ADM cm* (the faithful networks) with the "
                                                    "+post+cc post-processing, standardised on the case's "
                                                    "FLAIR-normal tissue, and the load term", load=True,
                                                    case_mixture=True, choose_cutoff=True),
    "ADM+ F cm* +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F cm* with the +post+cc (z+load) "
                                                  "post-processing", load=True, case_mixture=True,
                                                  choose_cutoff=True),
    "ADM+ F cm* +post+cc (normal+load)": _post_cc_row("ADM+ F", "normal", "ADM+ F cm* with the +post+cc "
                                                       "post-processing, standardised on the case's FLAIR-normal "
                                                       "tissue, and the load term", load=True, case_mixture=True,
                                                       choose_cutoff=True),
    "ADM+ F blend*": MethodSpec("adm", "improvement", "ADM+ F scored with the frozen and the case mixture: -log "
                                "of their weighted geometric mean, the case mixture's cut-off and share chosen on "
                                "the training domains' validation AUPRC", "ADM+ F",
                                {"case_mixture": True, "case_mixture_share": CASE_MIXTURE_SHARES[0]},
                                search=("normal_max_flair_z", "case_mixture_share")),
    "ADM+ F blend* +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F blend* with the bundled "
                                                     "post-processing", load=True, case_mixture=True,
                                                     choose_cutoff=True, share=CASE_MIXTURE_SHARES[0],
                                                     choose_share=True),
    "ADM+ F blend* +post+cc (normal+load)": _post_cc_row("ADM+ F", "normal", "ADM+ F blend* with the +post+cc "
                                                          "post-processing standardised on the case's FLAIR-normal "
                                                          "tissue, and the load term", load=True, case_mixture=True,
                                                          choose_cutoff=True, share=CASE_MIXTURE_SHARES[0],
                                                          choose_share=True),
    "ADM+ F blend=0.5*": MethodSpec("adm", "improvement", "ADM+ F scored with the frozen and the case mixture in "
                                    "equal shares (-log of the densities' geometric mean), the case mixture's "
                                    "cut-off chosen on the training domains' validation AUPRC", "ADM+ F",
                                    {"case_mixture": True, "case_mixture_share": 0.5},
                                    search=("normal_max_flair_z",)),
    "ADM+ F blend=0.5* +post+cc (z+load)": _post_cc_row("ADM+ F", "zscore", "ADM+ F blend=0.5* with the bundled "
                                                         "post-processing", load=True, case_mixture=True,
                                                         choose_cutoff=True, share=0.5),
    "ADM+ F blend=0.5* +post+cc (normal+load)": _post_cc_row("ADM+ F", "normal", "ADM+ F blend=0.5* with the "
                                                              "+post+cc post-processing standardised on the case's "
                                                              "FLAIR-normal tissue, and the load term", load=True,
                                                              case_mixture=True, choose_cutoff=True, share=0.5),
    "ADM+ F +post+cc (none)": _post_cc_row("ADM+ F", "none", "ADM+ F +post+cc with no standardisation last: the "
                                           "threshold on the scale of the standardised energy plus w x FLAIR z"),
}

BUNDLED_METHOD = "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale"
"""The row whose configuration the bundled model and the 'transfer' training profile carry: the best
mean over left-out domains of AUPRC and of Dice at the threshold in the leave-one-domain-out study
(README, "Bundled model"); the size of the removed small components does not apply to it."""

DOMAIN_METHODS: tuple[str, ...] = ("FLAIR z", "FLAIR z +med3+cc", "FLAIR z +med5+cc", "ADM", "ADM +post",
                                    "ADM robust-norm", "ADM site-aug", "ADM unc", "ADM+", "ADM+ +post",
                                    "ADM+ +post+cc", "ADM+ +post+cc (z)", "ADM+ +gate+post+cc", "ADM+ FT2",
                                    "ADM+ FT2 +gate+post+cc", "ADM+ FT2 +post+cc (z)", "ADM+ FT2 +gate+post+cc (z)",
                                    "ADM+ F", "ADM+ F +post+cc (z)", "ADM+ F +post+cc (none)",
                                    "ADM+ F +post+cc (normal)", "ADM+ +post+cc (normal)", "ADM+ F>",
                                    "ADM+ F> +post+cc (z)", "ADM+ F> ct", "ADM+ F> ct +post+cc (z)",
                                    "ADM+ F> ct +post+cc (normal)", "ADM+ F +post+cc (z+load)",
                                    "ADM+ F> ct +post+cc (z+load)", "ADM+ F ctx", "ADM+ F ctx +post+cc (z+load)",
                                    "ADM+ F ctx tp", "ADM+ F ctx tp +post+cc (z+load)", "ADM cm", "ADM+ F cm",
                                    "ADM+ F cm +post+cc (z+load)", "ADM cm*", "ADM+ F cm*",
                                    "ADM cm* +post+cc (normal+load)", "ADM+ F cm* +post+cc (z+load)",
                                    "ADM+ F cm* +post+cc (normal+load)", "ADM+ F blend*",
                                    "ADM+ F blend* +post+cc (z+load)", "ADM+ F blend* +post+cc (normal+load)",
                                    "ADM+ F blend=0.5*", "ADM+ F blend=0.5* +post+cc (z+load)",
                                    "ADM+ F blend=0.5* +post+cc (normal+load)", "ADM+ F +flip",
                                    "ADM+ F +flip +post+cc (z+load)", "ADM+ F w32", "ADM+ F w32 +post+cc (z+load)",
                                    "FLAIR robust +med5+cc", "FLAIR hist +med5+cc",
                                    "ADM+ F +post+cc (z+load) FLAIR z-score", "ADM+ F hist",
                                    "ADM+ F hist +post+cc (z+load)", "ADM+ F hist +post+cc (z+load) FLAIR robust",
                                    "ADM+ F> ct hist", "ADM+ F> ct hist +post+cc (z+load) FLAIR robust",
                                    "FLAIR z +asym +med3+cc", "FLAIR z +asym +med5+cc",
                                    "ADM+ F +asym +post+cc (z+load)", "ADM+ F mir",
                                    "ADM+ F mir +asym +post+cc (z+load)", "ADM+ F> ct mir",
                                    "ADM+ F> ct mir +asym +post+cc (z+load)", "ADM+ F> ct XF",
                                    "ADM+ F> ct XF +asym +post+cc (z+load)", "FLAIR z +asym +asymT2 +med3+cc",
                                    "FLAIR z +asym +asymT2 +med5+cc", "ADM+ F +asym +asymT2 +post+cc (z+load)",
                                    "ADM+ F +asym +asymT2 +post+cc (z+load) worst",
                                    "ADM+ F +asym +post+cc (z+load) held-out",
                                    "ADM+ F +asym +asymT2 +post+cc (z+load) held-out",
                                    "ADM+ F +asym +asymE +post+cc (z+load)",
                                    "ADM+ F +asym +asymE +post+cc (z+load) held-out", "ADM+ F noT2",
                                    "ADM+ F> ct noT2", "ADM+ F noT2 +asym +asymE +post+cc (z+load)",
                                    "FLAIR z N4 +med5+cc", "ADM+ F +asym +asymE +post+cc (z+load) N4",
                                    "ADM+ F N4in", "ADM+ F N4in +asym +asymE +post+cc (z+load)",
                                    "ADM+ F +asym +asymE +post+cc (z+load) N4 held-out",
                                    "ADM+ F N4in +asym +asymE +post+cc (z+load) held-out",
                                    "FLAIR z N4 +T2g +med5+cc", "ADM+ F +asym +asymE +T2gF +post+cc (z+load) N4",
                                    "FLAIR z N4 +T2g +med5 +fsm+cc",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+sheet+cc (z+load) N4",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+sheetS+cc (z+load) N4",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4",
                                    "ADM+ F +gate +asym +asymE +T2gF +post+fsm+cc (z+load) N4",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+sheet+cc (z+load) N4",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale",
                                    "ADM+ F +asym +asymE +T2gF +post+fsm+gate+shared+cc (z+load) N4 +scale",
                                    "ADM+ F> ct +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale")
"""The default methods of the leave-one-domain-out split: the strong FLAIR baselines, ADM and the
variants aimed at transfer between sites."""
_DOMAIN_ONLY = set(DOMAIN_METHODS) - {"FLAIR z", "FLAIR z +med5+cc", "ADM"}
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in _DOMAIN_ONLY)
QUICK_METHODS: tuple[str, ...] = tuple(m for m in DEFAULT_METHODS
                                       if m not in ("ADM +flip", "ADM +smooth", "ADM+X +flip+smooth+rim"))
"""The quick setting leaves out the flip-TTA variants and smoothing without rim suppression (in the
full setting) to fit a 2-core CPU."""


def postprocess_for(spec: MethodSpec, settings: StudySettings) -> PostprocessConfig:
    values = {}
    for key, value in spec.postprocess.items():
        if value == "smooth":
            value = settings.smoothing_sigma_mm
        elif value == "rim":
            value = settings.rim_erosion_mm
        elif value == "median":
            value = settings.median_size_mm
        values[key] = value
    return PostprocessConfig(**values)


def tie_t2_weight(spec: MethodSpec, post: PostprocessConfig) -> PostprocessConfig:
    """``post`` with the T2 term's weight the spec's multiple of its FLAIR weight
    (:attr:`MethodSpec.t2_per_flair_weight`); unchanged for a row without a tied T2 term."""
    if not spec.t2_per_flair_weight:
        return post
    return dataclasses.replace(post, t2_weight=spec.t2_per_flair_weight * post.flair_weight)


MixtureVariant = tuple[float, float] | None
"""How a raw energy's mixture is made: None, the frozen mixture; else a case mixture's (FLAIR z cut-off
of the pixels it is estimated over, its share beside the frozen mixture)."""


def mixture_variant(post: PostprocessConfig) -> MixtureVariant:
    """The :data:`MixtureVariant` of ``post``."""
    return (post.normal_max_flair_z, post.case_mixture_share) if post.case_mixture else None


def raw_variants(spec: MethodSpec, settings: StudySettings) -> set[tuple[bool, MixtureVariant]]:
    """The (flip TTA, :func:`mixture_variant`) raw energies an ADM row reads: one, or one per candidate
    (combination) when it searches :data:`RAW_SEARCH_FIELDS` fields."""
    post = postprocess_for(spec, settings)
    candidates = [post]
    for name in RAW_SEARCH_FIELDS.intersection(spec.search):
        candidates = [dataclasses.replace(c, **{name: v}) for c in candidates for v in POST_CANDIDATES[name]]
    return {(c.flip_tta, mixture_variant(c)) for c in candidates}


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




def intensity_preprocess(spec: MethodSpec, settings: StudySettings) -> PreprocessConfig:
    """The preparation whose native FLAIR a row reads, with the row's ``native_normalisation`` and
    ``native_bias_correction_levels`` where it sets them: an ADM row's FLAIR term reads its network's
    (what ``predict`` reads for a model whose config carries it), a FLAIR baseline the baselines'."""
    prep = (network_config(spec.network, settings, 0).preprocess if spec.kind == "adm"
            else baseline_preprocess(settings))
    return dataclasses.replace(
        prep, native_normalisation=spec.native_normalisation or prep.native_normalisation,
        native_bias_correction_levels=spec.native_bias_correction_levels or prep.native_bias_correction_levels)


def baseline_preprocess(settings: StudySettings) -> PreprocessConfig:
    """The preparation the baselines read (the default z-score normalisation at the study's size)."""
    return network_config("ADM", settings, 0).preprocess


def preprocess_key(cfg: PreprocessConfig) -> str:
    """Identity of a preparation: cases are prepared once per distinct key."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def training_key(config: ADMConfig) -> str:
    """Identity of a network's training slices: its preparation and, for a CtoC with context, the
    slices each carries (without context, the preparation's key alone; a mirror image adds to it)."""
    key, context = preprocess_key(config.preprocess), config.model.slice_context
    if context.each_side:
        key = f"{key}|context={context.each_side}"
    return f"{key}|mirror" if context.mirror else key


_STEP2_ONLY_TRAIN_FIELDS = frozenset({"epochs_joint", "lr_joint", "lambda_energy", "joint",
                                      "max_gmm_pixels_per_batch", "num_workers", "fallback_threshold_percentile"})
"""Training settings that only act after step 1. Every other training field is taken to shape the
CtoC (a field added later then prevents sharing rather than sharing a CtoC wrongly)."""


def ctoc_key(config: ADMConfig) -> str:
    """What a trained CtoC depends on: the preparation, the CtoC's own model fields (``ctoc_*``,
    ``median_bias``, ``n_contrasts``) and the step-1 training settings (epochs, learning rate, batch,
    augmentation and its parameters, beta-NLL, precision, seed, lesion margin). Networks with equal
    keys get one shared CtoC."""
    data = config.to_dict()
    model = ctoc_model_fields(config)
    train = {k: v for k, v in data["train"].items() if k not in _STEP2_ONLY_TRAIN_FIELDS}
    return json.dumps({"preprocess": data["preprocess"], "model": model, "train": train}, sort_keys=True)


def ctoc_groups(names: list[str] | tuple[str, ...], settings: StudySettings, seed: int) -> list[list[str]]:
    """The networks ``names`` that use CtoC, grouped by :func:`ctoc_key` (one CtoC is trained per
    group, by the group's first network's config; names are taken in sorted order)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        config = network_config(name, settings, seed)
        if config.model.use_ctoc:
            groups.setdefault(ctoc_key(config), []).append(name)
    return list(groups.values())
