"""Per-seed and mean +- sd AUPRC / Dice at threshold of study rows, gathered from several study JSONs.

A leave-one-domain-out study JSON holds the seeds it ran; rows of one seed may sit in different JSONs (a row added
in a later round, on the same networks). For each row asked for, this takes each (seed, left-out domain) from the
first JSON on the command line that ran it, and each pool of domains (``pools`` of the study, e.g. the BraTS 2018
gliomas) from the first JSON that reported it for that seed, and prints one markdown table: per domain and pool,
each seed's AUPRC / Dice at the transferred threshold, then mean +- sd over the seeds found. A pool's cell adds,
where the study recorded it, the AUPRC of each fold's scores minus its own threshold (in brackets).

    python3 benchmarks/seed_table.py docs/study_domains_128scale.json docs/study_domains_128gate.json \\
        docs/study_domains_128s1.json docs/study_domains_128s2.json \\
        --rows "FLAIR z +med5+cc;ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale"

Reads nothing but the JSONs (no data, no network).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def gather(studies: list[dict], rows: list[str]) -> dict[tuple[str, str], dict[int, dict]]:
    """{(row, domain or 'pool: name'): {seed: {'auprc', 'dice', 'relative'}}}, the first study holding each wins."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for study in studies:
        for run in study["runs"]:
            for row in rows:
                if row in run["methods"]:
                    result = run["methods"][row]
                    found.setdefault((row, run["domain"]), {}).setdefault(run["seed"], {
                        "auprc": result["pooled"]["auprc"], "dice": result["at_threshold"]["dice"], "relative": None})
        for seeded in study.get("seed_pooled", []):
            for pool, methods in seeded.get("pools", {}).items():
                for row in rows:
                    if row in methods:
                        result = methods[row]
                        found.setdefault((row, f"pool: {pool}"), {}).setdefault(seeded["seed"], {
                            "auprc": result["pooled"]["auprc"], "dice": result["at_threshold"]["dice"],
                            "relative": result.get("threshold_relative", {}).get("auprc")})
    return found


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "n/a"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(studies: list[dict], rows: list[str]) -> list[str]:
    """The markdown lines: one line per (row, domain or pool), rows in the order given, then domains as found."""
    found = gather(studies, rows)
    seeds = sorted({seed for per_seed in found.values() for seed in per_seed})
    lines = ["| row | domain | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd AUPRC | mean ± sd Dice |",
             "|---|---|" + "---|" * (len(seeds) + 2)]
    domains = list(dict.fromkeys(domain for _, domain in found))
    for row, domain in ((r, d) for r in rows for d in domains if (r, d) in found):
        per_seed = found[row, domain]
        cells = []
        for seed in seeds:
            value = per_seed.get(seed)
            if value is None:
                cells.append("–")
                continue
            relative = "" if value["relative"] is None else f" ({value['relative']:.3f})"
            cells.append(f"{value['auprc']:.3f}{relative} / {value['dice']:.3f}")
        auprcs = [v["auprc"] for v in per_seed.values()]
        dices = [v["dice"] for v in per_seed.values()]
        lines.append(f"| {row} | {domain} | " + " | ".join(cells) + f" | {_mean_sd(auprcs)} | {_mean_sd(dices)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, nargs="+", help="leave-one-domain-out study JSONs")
    parser.add_argument("--rows", required=True, help="';'-separated rows")
    args = parser.parse_args()
    studies = [json.loads(path.read_text(encoding="utf-8")) for path in args.studies]
    print("\n".join(table(studies, args.rows.split(";"))))


if __name__ == "__main__":
    main()
