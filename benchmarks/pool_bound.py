"""How a pool of domains' AUPRC relates to its domains' own AUPRCs, from finished study JSONs.

A pool (the BraTS 2018 gliomas: the CBICA and the BraTS-2013 cases) is scored with each case at its own
fold's scale. Its AUPRC is compared with the mean of its domains' pooled AUPRCs weighted by their share
of the pool's lesion voxels (``n_positive`` of the study's per-case rows). When the folds' scales agree,
the pool's AUPRC comes close to that weighted mean (over the 128-pixel study JSONs: 0.091 below to 0.016
above); when they disagree it falls below it. Studies since the thirty-eighth round also record the pool's AUPRC
with each fold's threshold subtracted from its scores (``auprc_threshold_relative``), printed beside it. The strong
baseline is printed beside the ADM rows. The last column is the AUPRC the pool's last domain would need, the
others' as measured, for the pool's weighted mean to reach ``--target``.

    python3 benchmarks/pool_bound.py docs/study_domains_128b.json docs/study_domains_128i.json --target 0.9

Reads nothing but the JSONs (no data, no network).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def lesion_voxels(study: dict, domain: str) -> int:
    """Lesion voxels of ``domain``'s test cases: the same in every run that leaves the domain out."""
    run = next(r for r in study["runs"] if r["domain"] == domain)
    per_case = next(iter(run["methods"].values()))["per_case"]
    return sum(row["n_positive"] for row in per_case)


def pool_rows(study: dict, target: float, rows: list[str] | None = None) -> list[dict]:
    """Per pool of ``study`` and per row (``rows``, default: every post-processed row, '+post' or '+med' in
    its name, so the strong baseline FLAIR z +med5+cc stands beside the ADM rows): its
    domains' AUPRCs and lesion shares, their lesion-weighted mean, the pool's own AUPRC, and the AUPRC
    the pool's last domain would need for the weighted mean to reach ``target``."""
    out = []
    for pool, domains in study.get("pools", {}).items():
        weights = [lesion_voxels(study, d) for d in domains]
        shares = [w / sum(weights) for w in weights]
        for row in rows or [r for r in study["pool_summary"][pool] if "+post" in r or "+med" in r]:
            if row not in study["pool_summary"][pool]:
                continue
            auprcs = [study["domain_summary"][d][row]["auprc"]["mean"] for d in domains]
            out.append({"pool": pool, "row": row, "domains": domains, "auprcs": auprcs, "shares": shares,
                        "weighted": sum(s * a for s, a in zip(shares, auprcs)),
                        "pool_auprc": study["pool_summary"][pool][row]["auprc"]["mean"],
                        # recorded by studies since the thirty-eighth round (None before)
                        "pool_auprc_relative": study["pool_summary"][pool][row].get(
                            "auprc_threshold_relative", {}).get("mean"),
                        "needed": (target - sum(s * a for s, a in zip(shares[:-1], auprcs[:-1]))) / shares[-1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, nargs="+", help="leave-one-domain-out study JSONs")
    parser.add_argument("--rows", default="", help="';'-separated rows (default: every row with '+post' or '+med' in its name)")
    parser.add_argument("--target", type=float, default=0.9, help="the pool AUPRC to reach")
    args = parser.parse_args()
    print("| study | row | pool | domains' AUPRC (lesion share) | lesion-weighted mean | pool's AUPRC | "
          f"pool's AUPRC, each fold's scores minus its threshold | last domain's AUPRC needed for {args.target} |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.studies:
        for r in pool_rows(json.loads(path.read_text()), args.target, args.rows.split(";") if args.rows else None):
            print(f"| {path.stem} | {r['row']} | {r['pool']} | "
                  + ", ".join(f"{d} {a:.3f} ({s:.0%})" for d, a, s in zip(r["domains"], r["auprcs"], r["shares"]))
                  + f" | {r['weighted']:.3f} | {r['pool_auprc']:.3f} | "
                  + ("n/a" if r["pool_auprc_relative"] is None else f"{r['pool_auprc_relative']:.3f}")
                  + f" | {r['needed']:.3f} |")


if __name__ == "__main__":
    main()
