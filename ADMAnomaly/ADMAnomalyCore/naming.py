"""Guessing which loaded volume is FLAIR, T1, T1c and T2 from node names."""

from __future__ import annotations

import re
from typing import Iterable, Sequence, TypeVar

from .engine import ensure_engine_importable

ensure_engine_importable()

from ADMAnomalyLib.config import CONTRAST_NAMES  # noqa: E402  (torch-free; the table file discovery uses)

T = TypeVar("T")

CONTRAST_LABELS: dict[str, str] = {"flair": "FLAIR", "t1": "T1", "t1c": "T1c", "t2": "T2"}
"""Display names of the four contrasts, keyed like ``ADMAnomalyLib.config.CONTRASTS``."""

# Rules in priority order: FLAIR first (t2f / t2_flair are FLAIR, not T2), then post-contrast T1
# (t1ce contains t1), then T2, then native T1. Names are split into lower-case tokens; a token is a
# contrast when it is one of the engine's spellings (CONTRAST_NAMES, shared with file discovery) or
# matches the looser hints node names carry (series descriptions such as "AX T1 POST GD", "MPRAGE").
_HINTS: dict[str, str] = {
    "flair": r"flair",
    "t1c": r"^t1-?(c|\+c|contrast|gad)$|post|^gd$|^gad$|^ce$|contrast",
    "t2": r"^t2-?weighted$",
    "t1": r"^t1-?weighted$|^mprage$",
}
_RULES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (role, re.compile(rf"^(?:{'|'.join(map(re.escape, CONTRAST_NAMES[role]))})$|{_HINTS[role]}"))
    for role in ("flair", "t1c", "t2", "t1")
)


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9+\-]+|(?<=\d)-|-(?=\d)", name.lower()) if t]


def contrast_of(name: str) -> str | None:
    """Contrast key (``flair``, ``t1``, ``t1c``, ``t2``) a node name suggests, or None."""
    tokens = _tokens(name)
    for role, pattern in _RULES:
        if any(pattern.search(token) for token in tokens):
            return role
    return None


def guess_contrast_roles(
    items: Iterable[T], name_of=lambda item: item.GetName(), only: Sequence[str] | None = None
) -> dict[str, T]:
    """Map contrast keys to items (e.g. volume nodes) by name; the first match of each role wins.

    ``only`` restricts the result to some roles (e.g. the selectors that are still empty).
    """
    found: dict[str, T] = {}
    for item in items:
        role = contrast_of(name_of(item) or "")
        if role is not None and role not in found and (only is None or role in only):
            found[role] = item
    return found


def case_name(flair_name: str) -> str:
    """Case name from the FLAIR node name: ``BraTS_001_flair`` -> ``BraTS_001``."""
    stripped = re.sub(r"([_\-. ]?)(t2[_\-]?flair|flair|t2f)$", "", flair_name.strip(), flags=re.IGNORECASE)
    stripped = re.sub(r"^(flair|t2f)[_\-. ]+", "", stripped, flags=re.IGNORECASE)
    return stripped.strip("_-. ") or flair_name or "case"
