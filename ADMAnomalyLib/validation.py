"""Checks of user-given numbers, shared by the API, the CLI and the Slicer module.

A bad value is an :class:`~ADMAnomalyLib.errors.InputError` naming the option, before any work
starts: a negative batch size must not silently slice the input differently, and a NaN threshold
must not write an empty map (nor NaN into a JSON report).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InputError


def check_threshold(value: Any, name: str = "threshold") -> float:
    """A finite energy threshold."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, not {value!r}")
    return number


def check_positive_int(value: Any, name: str) -> int:
    """An integer >= 1 (batch size, workers ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{name} must be a whole number >= 1, not {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number >= 1, not {value!r}") from None
    if number != float(value) or number < 1:
        raise InputError(f"{name} must be a whole number >= 1, not {value!r}")
    return number


def check_percentile(value: Any, name: str = "percentile") -> float:
    """A number in [0, 100]."""
    number = check_threshold(value, name)
    if not 0.0 <= number <= 100.0:
        raise InputError(f"{name} must lie in [0, 100], not {value!r}")
    return number


def parse_shard(value: Any) -> tuple[int, int] | None:
    """``"K/N"`` (or a ``(K, N)`` pair) with 1 <= K <= N: this job takes the K-th of N parts of a
    folder (nnU-Net's ``-part_id/-num_parts`` convention, counted from 1). None means all cases."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if not match:
            raise InputError(f"shard must be K/N, e.g. 2/8, not {value!r}")
        part, parts = int(match[1]), int(match[2])
    else:
        try:
            part, parts = (int(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"shard must be K/N, e.g. 2/8, not {value!r}") from None
    if not 1 <= part <= parts:
        raise InputError(f"shard {part}/{parts}: K must lie in 1..N")
    return part, parts
