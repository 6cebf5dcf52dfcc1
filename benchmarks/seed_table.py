"""Per-seed and mean +- sd AUPRC / Dice at threshold of study rows, gathered from several study JSONs.

A leave-one-domain-out study JSON holds the seeds it ran; rows of one seed may sit in different JSONs (a row added
in a later round, on the same networks). For each row asked for, this takes each (seed, left-out domain) from the
first JSON on the command line that ran it, and each pool of domains (``pools`` of the study, e.g. the BraTS 2018
gliomas) from the first JSON that reported it for that seed, and prints one markdown table: per domain and pool,
each seed's AUPRC / Dice at the transferred threshold, then mean +- sd over the seeds found. A pool's cell adds,
where the study recorded it, the AUPRC of each fold's scores minus its own threshold (in brackets).

    .venv/bin/python benchmarks/seed_table.py docs/study_domains_128scale.json docs/study_domains_128gate.json \\
        docs/study_domains_128s1.json docs/study_domains_128s2.json \\
        --rows "FLAIR z +med5+cc;ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale"

Reads nothing but the JSONs (no data, no network); the mean +- sd is the study's own (``runner.summarise``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ADMAnomalyLib.study.runner import summarise


def gather(studies: list[dict], rows: list[str]) -> dict[tuple[str, str], dict[int, dict]]:
    """{(row, domain or 'pool: name'): {seed: the row's result record}}, the first study holding each wins."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for study in studies:
        for run in study["runs"]:
            for row in rows:
                if row in run["methods"]:
                    found.setdefault((row, run["domain"]), {}).setdefault(run["seed"], run["methods"][row])
        for seeded in study.get("seed_pooled", []):
            for pool, methods in seeded.get("pools", {}).items():
                for row in rows:
                    if row in methods:
                        found.setdefault((row, f"pool: {pool}"), {}).setdefault(seeded["seed"], methods[row])
    return found


def _mean_sd(summary: dict) -> str:
    if summary["mean"] is None:
        return "n/a"
    return f"{summary['mean']:.3f}" if summary["sd"] is None else f"{summary['mean']:.3f} ± {summary['sd']:.3f}"


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
            relative = value.get("threshold_relative", {}).get("auprc")
            relative = "" if relative is None else f" ({relative:.3f})"
            cells.append(f"{value['pooled']['auprc']:.3f}{relative} / {value['at_threshold']['dice']:.3f}")
        summary = summarise([{"methods": {row: value}} for value in per_seed.values()], [row])[row]
        lines.append(f"| {row} | {domain} | " + " | ".join(cells)
                     + f" | {_mean_sd(summary['auprc'])} | {_mean_sd(summary['dice'])} |")
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
