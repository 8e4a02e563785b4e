"""Searching the catalog: `field:value` terms, bare words and "quoted phrases", all ANDed, over
the catalog's fields and what the readers found (format, dtype, channels, shape, voxel size);
facets count the matches per value of a few fields."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

FACETS = ("species", "technique", "format", "kind")
TERM = re.compile(r'(?:(?P<field>[A-Za-z_][\w.-]*):)?(?P<value>"[^"]*"|\S+)')


class QueryError(ValueError):
    """A query that cannot be parsed; the message says how to write it."""


def fields(summary: dict, channels: Iterable[str] = ()) -> dict[str, str]:
    """What a dataset can be searched by: every catalog and reader field as text."""
    out = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in summary.items()
           if not isinstance(v, dict)}
    out["channels"] = " ".join(channels)
    return out


def parse(query: str) -> list[tuple[str | None, str]]:
    """(field or None for any field, lower-case text) for every term of the query."""
    if query.count('"') % 2:
        raise QueryError('the query has an unmatched " (quote a phrase like "whole brain")')
    terms = []
    for m in TERM.finditer(query):
        value = m["value"]
        if value.startswith('"'):
            value = value[1:-1]
        if value:
            terms.append((m["field"].lower() if m["field"] else None, value.lower()))
    return terms


def matches(terms: list[tuple[str | None, str]], searchable: dict[str, str]) -> bool:
    """Every term's text appears (any case) in its field, or in any field for a bare term."""
    lower = {k: v.lower() for k, v in searchable.items()}
    return all(text in lower.get(field, "") if field else any(text in v for v in lower.values())
               for field, text in terms)


def facets(matched: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    """For each facet field, how many matches (their `fields`) have each value, as the catalog writes it."""
    return {name: dict(Counter(m[name] for m in matched if m.get(name)).most_common()) for name in FACETS}
