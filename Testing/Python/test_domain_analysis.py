"""benchmarks/domain_analysis.py on a tiny synthetic case set: the numbers are sane and a planted
bright lesion is found by the FLAIR intensity."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def da():
    spec = importlib.util.spec_from_file_location("domain_analysis", REPO / "benchmarks" / "domain_analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_helpers(da):
    has_lesion = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert da.far_from_lesion(has_lesion, 3).tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert da.far_from_lesion(np.zeros(4, dtype=bool)).all()
    # A vertical step edge in one contrast: strong gradient only next to the step.
    slices = np.zeros((1, 4, 8, 8), dtype=np.float32)
    slices[0, 2, :, 4:] = 2.0
    edge = da.edge_strength(slices)[0]
    assert edge[:, 3].min() == pytest.approx(1.0) and edge[:, 0].max() == 0.0
    score = np.arange(200, dtype=np.float32)
    lesion = score >= 199
    boundary = score == 198
    counts = da.top_fraction_breakdown(score, lesion, boundary, np.zeros(200, bool), np.zeros(200, bool), 0.01)
    assert counts == {"n": 2, "lesion": 1, "boundary": 1, "csf": 0, "other": 0, "rim": 0}


def test_domain_analysis_on_synthetic_cases(da, cohort, trained_model, tmp_path):
    from ADMAnomalyLib.cases import find_cases

    cases = find_cases(cohort)
    domains = {"site a": cases[:1], "site b": cases[1:]}
    results = da.analyse([trained_model], domains, device="cpu", log=lambda *a, **k: None)

    (label, model), = results["models"].items()
    for name, domain in model["domains"].items():
        feats = domain["features"]
        assert set(feats) >= {"Zct_flair", "Zct_t1", "Zct_t1c", "Zct_t2", "Zdr_1", "E", "FLAIR_int"}
        # The planted lesion is 1.7x brighter in FLAIR: the intensity alone separates it.
        assert feats["FLAIR_int"]["auroc"] > 0.9, (name, feats["FLAIR_int"])
        assert feats["FLAIR_int"]["auprc"] > 2 * domain["lesion_prevalence"]
        for entry in feats.values():
            assert 0.0 <= entry["auroc"] <= 1.0 and 0.0 <= entry["auprc"] <= 1.0
            assert -1.0 <= entry["spearman_edge_normal"] <= 1.0
        for entry in (feats[n] for n in feats if n.startswith("Zdr")):
            assert entry["auroc"] >= 0.5 and entry["direction"] in "+-"
        for top in domain["top1"].values():
            assert sum(top[k] for k in ("lesion", "boundary", "csf", "other")) == pytest.approx(1.0)
        assert domain["top1"]["FLAIR_int"]["lesion"] > 0.5
        for contrast, err in domain["ctoc_error"].items():
            for group in ("all", "boundary", "interior"):
                assert 0.0 <= err[group]["median"] <= err[group]["p90"], (contrast, group, err[group])
                assert err[group]["n_sampled"] > 0
            assert err["boundary"]["n_sampled"] < err["all"]["n_sampled"]

    for name, intensity in results["intensity"].items():
        for case_id, per in intensity["per_case"].items():
            assert 0.0 < per["lesion_fraction"] < 0.2
            for contrast in ("flair", "t1", "t1c", "t2"):
                c = per[contrast]
                assert c["negative_fraction"] == 0.0 and c["engine_zscore_matches"]
                for norm in ("zscore", "robust"):
                    q = [c[f"{norm}_percentiles"][str(p)] for p in da.PERCENTILES]
                    assert q == sorted(q)
                # Robust normalisation puts normal tissue's median near 0 whatever the lesion does.
                assert abs(c["robust_normal_median"]) < 0.2
            # The bright FLAIR lesion pulls the brain mean up, so normal tissue lands lower under z-score.
            assert per["flair"]["zscore_lesion_shift"] < 0
        for h in intensity["hist"]["flair"].values():
            assert 0.9 < float(np.sum(h)) <= 1.0 + 1e-9

    text = json.dumps(da.to_json(results))
    assert "NaN" not in text and "_examples" not in text
    tables = da.tables_markdown(results)
    assert "site a" in tables and "site b" in tables and "FLAIR_int" in tables
    written = da.write_figures(results, tmp_path / "figures")
    assert {p.name for p in written} == {"domain_feature_auprc.png", "domain_ctoc_error.png",
                                          "domain_histograms.png", "domain_ms_example.png"}
    assert all(p.stat().st_size > 10_000 for p in written)
    assert math.isfinite(model["domains"]["site a"]["features"]["E"]["auroc"])
