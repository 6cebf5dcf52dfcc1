"""Small synthetic lesions painted into a scan, and the study's selection group made of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ADMAnomalyLib import study
from ADMAnomalyLib.cases import find_cases, load_case
from ADMAnomalyLib.config import CONTRASTS
from ADMAnomalyLib.errors import InputError
from ADMAnomalyLib.preprocess import prepare_case
from ADMAnomalyLib.study.methods import baseline_preprocess
from ADMAnomalyLib.study.runner import SYNTHETIC_SUFFIX, synthetic_case_data, synthetic_sources
from ADMAnomalyLib.synthetic import SyntheticLesionConfig, lesion_sites, mirror_healed, paint_lesions

from conftest import make_synthetic_case
from test_study import _domain_settings, _make_domains, _mirror_labels

SMALL = SyntheticLesionConfig(count=4, diameter_mm=(3.0, 6.0), depth_mm=3.0, clearance_mm=4.0)


@pytest.fixture
def painted(tmp_path):
    """A synthetic head, its brain and T1 z-scores, and a copy with small lesions painted in."""
    case = load_case(find_cases(make_synthetic_case(tmp_path, shape=(64, 56, 48)).parent)[0])
    prepared = prepare_case(case, baseline_preprocess(study.quick_settings()), keep_native=("t1",))
    brain, own = prepared.native_brain, prepared.native_lesion
    spacing = case.images["flair"].GetSpacing()
    sites = lesion_sites(brain, prepared.native_zscored["t1"], spacing, SMALL, own)
    return case, brain, own, sites, paint_lesions(case, brain, sites, SMALL)


def test_sites_lie_deep_in_bright_t1_tissue_and_clear_of_the_scans_own_lesion(painted):
    case, brain, own, sites, _ = painted
    sampling = tuple(reversed(case.images["flair"].GetSpacing()))
    assert sites.any() and not (sites & ~brain).any()
    assert ndimage.distance_transform_edt(brain, sampling=sampling)[sites].min() >= SMALL.depth_mm
    assert ndimage.distance_transform_edt(~own, sampling=sampling)[sites].min() >= SMALL.clearance_mm
    t1 = sitk.GetArrayFromImage(case.images["t1"])
    assert np.median(t1[sites]) > np.median(t1[brain])


def test_painted_lesions_are_bright_on_flair_and_t2_inside_the_brain_on_the_same_grid(painted):
    case, brain, own, _, copy = painted
    label = sitk.GetArrayFromImage(copy.label) > 0
    assert label.any() and not (label & ~brain).any() and not (label & own).any(), "the label is the painted lesions"
    assert ndimage.label(label)[1] >= 2
    for c in CONTRASTS:
        before, after = (sitk.GetArrayFromImage(image.images[c]) for image in (case, copy))
        for attribute in ("GetOrigin", "GetSpacing", "GetDirection", "GetSize"):
            assert getattr(copy.images[c], attribute)() == getattr(case.images[c], attribute)()
        assert np.array_equal(before[~brain], after[~brain]), "nothing outside the brain moves"
        far = ndimage.distance_transform_edt(~label) > 4
        assert np.array_equal(before[far], after[far]), "nothing far from a lesion moves"
        change = float(np.mean(after[label] - before[label]))
        assert (change > 0) if c in ("flair", "t2") else (change <= 0), c
    assert copy.label.GetOrigin() == case.images["flair"].GetOrigin()
    # The case's id fixes its lesions; another id draws others.
    again = paint_lesions(case, brain, painted[3], SMALL)
    assert np.array_equal(sitk.GetArrayFromImage(again.label), sitk.GetArrayFromImage(copy.label))
    other = paint_lesions(dataclasses.replace(case, case_id="other"), brain, painted[3], SMALL)
    assert not np.array_equal(sitk.GetArrayFromImage(other.label), sitk.GetArrayFromImage(copy.label))


def test_the_scans_own_lesion_is_healed_with_the_other_hemispheres_tissue(painted):
    case, brain, own, _, _ = painted
    healed = mirror_healed(case, brain, own, 1.0)
    near = ndimage.distance_transform_edt(~own, sampling=tuple(reversed(case.images["flair"].GetSpacing()))) <= 1.0
    mirrored_own = own[:, :, ::-1]  # the synthetic head is symmetric about the grid's centre plane
    for c in CONTRASTS:
        before, after = (sitk.GetArrayFromImage(image.images[c]) for image in (case, healed))
        assert healed.images[c].GetOrigin() == case.images[c].GetOrigin()
        assert np.array_equal(before[~near], after[~near]), "only the lesion and its margin change"
        assert np.allclose(after[own & ~mirrored_own], before[:, :, ::-1][own & ~mirrored_own], atol=1e-4)
    flair_after = sitk.GetArrayFromImage(healed.images["flair"])
    flair_before = sitk.GetArrayFromImage(case.images["flair"])
    assert flair_after[own].mean() < 0.8 * flair_before[own].mean(), "the bright lesion is gone"


def test_no_room_for_lesions_and_bad_settings_are_clear_errors(painted):
    case, brain, _, sites, _ = painted
    with pytest.raises(InputError, match="no white matter deep enough"):
        paint_lesions(case, brain, np.zeros_like(sites), SMALL)
    with pytest.raises(ValueError, match="count >= 1"):
        SyntheticLesionConfig(count=0)
    with pytest.raises(ValueError, match="change_sd must name each"):
        SyntheticLesionConfig(change_sd=(("flair", 1.0, 2.0),))


def test_a_selection_case_scores_only_the_painted_lesions_away_from_the_scans_own(tmp_path):
    files = find_cases(make_synthetic_case(tmp_path, shape=(64, 56, 48)).parent)[0]
    settings = dataclasses.replace(study.quick_settings(), synthetic_exclusion_mm=3.0)
    made = synthetic_case_data(files, settings, (), "site A", SMALL)
    assert made.synthetic and made.case_id == files.case_id + SYNTHETIC_SUFFIX and made.domain == "site A"
    own = prepare_case(load_case(files), baseline_preprocess(settings)).native_lesion[made.brain]
    assert made.labels.any() and not (made.labels & own).any()
    assert not (made.validation & own).any(), "the scan's own lesion is neither lesion nor normal tissue"
    own_volume = np.zeros(made.brain.shape, bool)
    own_volume[made.brain] = own
    near_own = (ndimage.distance_transform_edt(~own_volume, sampling=(1.2, 1.0, 1.0)) <= 3.0)[made.brain]
    assert made.labels[~near_own].any() and not (made.labels & ~made.validation & ~near_own).any(), \
        "every painted lesion voxel clear of the scan's own lesion is scored"
    assert not (made.validation & near_own).any()
    # Painted only on the slices of the scan's own lesion, which no network trains on.
    lesion_slices_of_own = np.zeros(made.brain.shape, bool)
    lesion_slices_of_own[np.unique(np.nonzero(prepare_case(load_case(files), baseline_preprocess(settings))
                                              .native_lesion)[0])] = True
    assert not (made.labels & ~lesion_slices_of_own[made.brain]).any()
    with pytest.raises(ValueError, match="leave out the whole healed region"):
        synthetic_case_data(files, dataclasses.replace(settings, synthetic_exclusion_mm=1.0), (), "site A", SMALL)
    assert synthetic_sources([files], 3) == [files]


def test_the_study_selects_on_the_training_domains_copies_only(tmp_path):
    path = _make_domains(tmp_path)
    methods = ("FLAIR z", "FLAIR z +med5+cc", "ADM +post")
    plain = study.run_study(None, tmp_path / "plain", dataclasses.replace(_domain_settings(), methods=methods),
                            domains_file=path)
    settings = dataclasses.replace(_domain_settings(), methods=methods, synthetic_cases_per_domain=1)
    first = study.run_study(None, tmp_path / "out", settings, domains_file=path)
    copies = {case_id: info["domain"] for case_id, info in first["synthetic_cases"].items()}
    assert sorted(copies.values()) == ["site A", "site B", "site C"]
    assert all(case_id.endswith(SYNTHETIC_SUFFIX) and info["lesion_ml"] > 0
               for case_id, info in first["synthetic_cases"].items())
    for run in first["runs"]:
        # Only the training domains' copies, none trained on, none tested.
        assert sorted(copies[c] for c in run["synthetic"]) == sorted(run["train_domains"])
        assert not set(run["synthetic"]) & set(run["train"]) and not set(run["synthetic"]) & set(run["test"])
    # The group moves the search's choices, and through them the ADM row's threshold; the rows without a search
    # and every threshold rule keep to the real domains.
    assert any(run["methods"]["ADM +post"]["chosen"] != other["methods"]["ADM +post"]["chosen"]
               for run, other in zip(first["runs"], plain["runs"]))
    for run, other in zip(first["runs"], plain["runs"]):
        for m in ("FLAIR z", "FLAIR z +med5+cc"):
            assert run["methods"][m]["threshold"] == other["methods"][m]["threshold"]
    # The test domain's labels steer nothing of its run, its copy's included.
    _mirror_labels(tmp_path / "c" / "c_0")
    second = study.run_study(None, tmp_path / "out2", settings, domains_file=path)
    for method in methods:
        assert first["runs"][2]["methods"][method]["threshold"] == second["runs"][2]["methods"][method]["threshold"]
        assert first["runs"][2]["methods"][method].get("chosen") == second["runs"][2]["methods"][method].get("chosen")
    with pytest.raises(InputError, match="go with the domain split"):
        study.run_study(tmp_path / "a", tmp_path / "bad", study.quick_settings(synthetic_cases_per_domain=1))
