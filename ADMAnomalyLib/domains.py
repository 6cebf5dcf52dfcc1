"""A cohort made of several domains (sites, collections, pathologies), read from a JSON file: the
leave-one-domain-out study splits by it, and ``admanomaly train DOMAINS.json`` trains on all of it.

A domains file maps each domain's name to where its labelled cases are::

    {"site A": {"folder": "../data/brats18", "cases": "Brats18_CBICA_*"},
     "MS":     {"folder": "../data/ms", "pattern": "open_ms"}}

``folder`` is relative to the JSON file's folder; ``cases`` (optional) is an fnmatch glob on the
case ids found there; ``pattern`` (optional) names a known file layout (:data:`KNOWN_PATTERNS`);
``pool`` (optional) names a group of domains that the leave-one-domain-out study also reports with
their left-out cases pooled (e.g. one pathology from several sites, as a target is stated for it).
Nothing about particular data sets lives here: the file says which cases form which domain.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from .cases import OPEN_MS_PATTERN, CaseFiles, find_cases
from .errors import InputError

KNOWN_PATTERNS: dict[str, dict[str, str]] = {"open_ms": OPEN_MS_PATTERN}
"""File layouts a domain may name (``"pattern": NAME``); without one, files are found by name."""
_DOMAIN_KEYS = {"folder", "cases", "pattern", "pool"}


def load_domains(path: str | Path) -> dict[str, list[CaseFiles]]:
    """The cases of every domain of the domains file ``path``, in the file's order (cases sorted by
    id). Raises :class:`InputError` for a malformed file, a missing folder, a glob matching no
    case, an unknown pattern name or a case that belongs to two domains."""
    path = Path(path)
    entries = _read_entries(path)
    domains: dict[str, list[CaseFiles]] = {}
    owner: dict[str, str] = {}
    for name, entry in entries.items():
        files = _domain_cases(path, name, entry)
        for case in files:
            if case.case_id in owner:
                raise InputError(f"{path}: case {case.case_id} is in two domains ({owner[case.case_id]!r} and {name!r})")
            owner[case.case_id] = name
        domains[name] = files
    if not domains:
        raise InputError(f"{path}: the domains file names no domain")
    return domains


def domain_pools(path: str | Path) -> dict[str, list[str]]:
    """``{pool name: its domains}`` of the domains file ``path``, in the file's order (empty when no
    domain names a pool)."""
    pools: dict[str, list[str]] = {}
    for name, entry in _read_entries(Path(path)).items():
        if entry.get("pool") is not None:
            pools.setdefault(str(entry["pool"]), []).append(name)
    return pools


def is_domains_file(path: str | Path) -> bool:
    """Whether ``path`` names a domains file (a ``.json`` file) rather than a folder of cases."""
    return Path(path).suffix.lower() == ".json" and not Path(path).is_dir()


def cohort_groups(path: str | Path, pattern: dict[str, str] | None = None) -> dict[str, list[CaseFiles]]:
    """The cases of a domains file by domain, or of a folder (found with ``pattern``) as one group
    named after it: what calibration averages its threshold rule over."""
    if is_domains_file(path):
        if pattern:
            raise InputError(f"{path}: a domains file names each domain's layout itself; drop --pattern")
        return load_domains(path)
    return {Path(path).name: find_cases(path, pattern)}


def cohort_cases(path: str | Path, pattern: dict[str, str] | None = None) -> list[CaseFiles]:
    """The cases of a folder (found with ``pattern``) or of a domains file: what ``train``,
    ``evaluate`` and ``cache`` accept as their data."""
    return [case for files in cohort_groups(path, pattern).values() for case in files]


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: domains file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON domains file ({exc})") from None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise InputError(f"{path}: expected {{domain name: {{\"folder\": ..., \"cases\": ..., \"pattern\": ...}}}}")
    for name, entry in entries.items():
        unknown = set(entry) - _DOMAIN_KEYS
        if unknown or "folder" not in entry:
            raise InputError(f"{path}: domain {name!r} needs a 'folder' and may have 'cases', 'pattern' and 'pool'"
                             + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    return entries


def _domain_cases(path: Path, name: str, entry: dict[str, Any]) -> list[CaseFiles]:
    folder = (path.parent / str(entry["folder"])).resolve()
    if not folder.is_dir():
        raise InputError(f"{path}: domain {name!r}: folder {folder} not found")
    pattern = None
    if entry.get("pattern") is not None:
        pattern = KNOWN_PATTERNS.get(str(entry["pattern"]))
        if pattern is None:
            raise InputError(f"{path}: domain {name!r}: unknown pattern {entry['pattern']!r}; "
                             f"known: {', '.join(KNOWN_PATTERNS)}")
    files = find_cases(folder, pattern)
    glob = entry.get("cases")
    if glob is not None:
        files = [f for f in files if fnmatch.fnmatchcase(f.case_id, str(glob))]
        if not files:
            raise InputError(f"{path}: domain {name!r}: no case id in {folder} matches {glob!r}")
    return files
