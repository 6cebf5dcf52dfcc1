"""Per-seed and mean +- sd AUPRC / Dice at threshold of study rows, gathered from several study JSONs.

A leave-one-domain-out study JSON holds the seeds it ran; rows of one seed may sit in different JSONs (a row added
in a later round, on the same networks). For each row asked for, this takes each (seed, left-out domain) from the
first JSON on the command line that ran it, and each pool of domains (``pools`` of the study, e.g. the BraTS 2018
gliomas) from the first JSON that reported it for that seed, and prints one markdown table: per domain and pool,
each seed's AUPRC / Dice at the transferred threshold, then mean +- sd over the seeds found. A pool's cell adds,
where the study recorded it, the AUPRC of each fold's scores minus its own threshold (in brackets). With
``--metrics``, one line per (domain or pool, row) instead: mean +- sd over the seeds found of AUPRC, AUROC, best Dice
and Dice at the transferred threshold, and which seeds (the README's headline table).

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


def _summary(row: str, per_seed: dict[int, dict]) -> dict:
    """The study's own mean +- sd (``runner.summarise``) of one row's records over the seeds found."""
    return summarise([{"methods": {row: value}} for value in per_seed.values()], [row])[row]


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
        summary = _summary(row, per_seed)
        lines.append(f"| {row} | {domain} | " + " | ".join(cells)
                     + f" | {_mean_sd(summary['auprc'])} | {_mean_sd(summary['dice'])} |")
    return lines


METRIC_COLUMNS = (("auprc", "AUPRC"), ("auroc", "AUROC"), ("best_dice", "best Dice"), ("dice", "Dice at threshold"))


def metrics_table(studies: list[dict], rows: list[str], labels: dict[str, str] | None = None) -> list[str]:
    """The markdown lines of ``--metrics``: per domain (as found) and row (in the order given), mean +- sd over the
    seeds found of each of :data:`METRIC_COLUMNS`; ``labels`` renames rows for the table."""
    found = gather(studies, rows)
    labels = labels or {}
    lines = ["| left-out domain | method | " + " | ".join(title for _, title in METRIC_COLUMNS) + " | seeds |",
             "|---|---|" + "---|" * (len(METRIC_COLUMNS) + 1)]
    domains = list(dict.fromkeys(domain for _, domain in found))
    for domain, row in ((d, r) for d in domains for r in rows if (r, d) in found):
        per_seed = found[row, domain]
        summary = _summary(row, per_seed)
        cells = [_mean_sd(summary[metric]) for metric, _ in METRIC_COLUMNS]
        seeds = ", ".join(str(seed) for seed in sorted(per_seed))
        lines.append(f"| {domain} | {labels.get(row, row)} | " + " | ".join(cells) + f" | {seeds} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, nargs="+", help="leave-one-domain-out study JSONs")
    parser.add_argument("--rows", required=True, help="';'-separated rows; 'row=label' shows the row as label (--metrics)")
    parser.add_argument("--metrics", action="store_true",
                        help="mean +- sd of AUPRC, AUROC, best Dice and Dice at threshold, one line per domain and row")
    args = parser.parse_args()
    studies = [json.loads(path.read_text(encoding="utf-8")) for path in args.studies]
    named = [item.split("=", 1) if "=" in item else [item, item] for item in args.rows.split(";")]
    rows, labels = [row for row, _ in named], {row: label for row, label in named}
    print("\n".join(metrics_table(studies, rows, labels) if args.metrics else table(studies, rows)))


if __name__ == "__main__":
    main()
