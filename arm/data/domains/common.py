"""Helpers shared by the synthetic domain generators: parameter checks, quotas, splits.

Everything here is deterministic: no ``hash()``, no iteration over sets, only
``random.Random`` instances passed in by the caller.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The split names, in the order items are taken from a shuffled pool."""

SIZE_KEYS: dict[str, str] = {"train": "n_train", "validation": "n_validation", "test": "n_test"}
"""The parameter that sets the size of each split."""

PRINTABLE = frozenset(string.printable)


def merge_params(
    domain: str, defaults: Mapping[str, Any], params: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Return ``defaults`` updated with ``params``; an unknown key raises ``ValueError`` naming it."""
    merged = dict(defaults)
    for key in params or {}:
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ValueError(f"{domain}: unknown parameter {key!r}; known parameters: {known}")
        merged[key] = params[key]
    return merged


def require_int(domain: str, params: Mapping[str, Any], key: str, minimum: int | None = None) -> int:
    """Read ``params[key]`` as an int (bools rejected), checking an optional lower bound."""
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{domain}: parameter {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{domain}: parameter {key!r} must be >= {minimum}, got {value}")
    return value


def require_range(domain: str, params: Mapping[str, Any], low_key: str, high_key: str, minimum: int) -> range:
    """Read an inclusive integer range ``[params[low_key], params[high_key]]`` as a ``range``."""
    low = require_int(domain, params, low_key, minimum)
    high = require_int(domain, params, high_key, minimum)
    if high < low:
        raise ValueError(f"{domain}: parameter {high_key!r} ({high}) must be >= {low_key!r} ({low})")
    return range(low, high + 1)


def require_fraction(domain: str, params: Mapping[str, Any], key: str) -> Fraction:
    """Read ``params[key]`` as an exact number in [0, 1]."""
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{domain}: parameter {key!r} must be a number in [0, 1], got {value!r}")
    share = Fraction(value)
    if not 0 <= share <= 1:
        raise ValueError(f"{domain}: parameter {key!r} must be in [0, 1], got {value}")
    return share


def require_choices(domain: str, params: Mapping[str, Any], key: str, allowed: Sequence[str]) -> list[str]:
    """Read ``params[key]`` as a non-empty list of distinct names, each one of ``allowed``."""
    value = params[key]
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{domain}: parameter {key!r} must be a list of names, got {value!r}")
    names = [str(v) for v in value]
    for name in names:
        if name not in allowed:
            raise ValueError(
                f"{domain}: parameter {key!r} has unknown entry {name!r}; allowed: {', '.join(allowed)}"
            )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{domain}: parameter {key!r} must list distinct names, at least one, got {names}")
    return names


def split_sizes(domain: str, params: Mapping[str, Any]) -> dict[str, int]:
    """Return the requested size of each split from ``n_train``, ``n_validation``, ``n_test``."""
    return {split: require_int(domain, params, key, 0) for split, key in SIZE_KEYS.items()}


def allocate(total: int, weights: Sequence[Fraction], capacities: Sequence[int], what: str) -> list[int]:
    """Split ``total`` items over kinds in proportion to ``weights``, never above a kind's capacity.

    Shares are rounded by largest remainder (ties to the earlier kind); what a full kind cannot
    take goes to the others in proportion to their weights. Raises ``ValueError`` when the kinds
    with a positive weight cannot hold ``total`` items together.
    """
    quotas = [0] * len(weights)
    active = [i for i, w in enumerate(weights) if w > 0 and capacities[i] > 0]
    room = sum(capacities[i] for i in active)
    if total > room:
        raise ValueError(
            f"{what}: {total} distinct items requested but the enabled problem space holds only {room}; "
            "lower n_train/n_validation/n_test or widen the ranges"
        )
    remaining = total
    while remaining > 0:
        weight_sum = sum(weights[i] for i in active)
        shares = {i: remaining * weights[i] / weight_sum for i in active}
        give = {i: int(shares[i]) for i in active}
        leftover = remaining - sum(give.values())
        for i in sorted(active, key=lambda i: (give[i] - shares[i], i))[:leftover]:
            give[i] += 1
        for i in active:
            step = min(give[i], capacities[i] - quotas[i])
            quotas[i] += step
            remaining -= step
        active = [i for i in active if quotas[i] < capacities[i]]
    return quotas


def partition(domain: str, items: Sequence[Any], sizes: Mapping[str, int]) -> dict[str, list[Any]]:
    """Cut an already shuffled pool of distinct items into consecutive, disjoint splits."""
    if len(items) != sum(sizes.values()):
        raise ValueError(f"{domain}: pool has {len(items)} items, splits need {sum(sizes.values())}")
    out: dict[str, list[Any]] = {}
    start = 0
    for split in SPLITS:
        out[split] = list(items[start : start + sizes[split]])
        start += sizes[split]
    return out


def check_printable(domain: str, record_id: str, *texts: str) -> None:
    """Raise ``ValueError`` when a text holds a character outside ``string.printable``."""
    for text in texts:
        bad = sorted({c for c in text if c not in PRINTABLE})
        if bad:
            raise ValueError(f"{domain}: record {record_id} has characters outside string.printable: {bad!r}")
