"""SWC neuron tracings: one file, one `Tracing`, its node table parsed by numpy and checked here.

By measurement (`benchmarks/swc_readers.py`, 22 inputs), no SWC library reads SWC robustly on its
own: osteoid splits on single spaces (tabs, trailing blanks and mid-file comments break it) and
loses ids; MorphIO remodels a file as soma + sections (ids and order gone) and refuses two somata;
navis drops a row with a non-number and truncates a fractional id without a word, needs a private
setting to keep them, and brings 41 packages (matplotlib among them) and 3 s of import to a
server. Each accepts missing parents or cycles silently. An SWC file is a seven-column numeric
table: numpy parses it (tabs, several spaces, CRLF, scientific notation), and this module refuses,
naming the file and the line, what would otherwise be served wrong: a wrong column count, a field
that is not a number (or not finite), a fractional id, an id beyond int64 (ids are kept exactly,
not as float64, which collapses those beyond 2^53), a repeated id, a missing parent, a cycle, a
file without nodes. One pass over the text gives the line numbers and collects the comments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import confine
from .base import SourceError

COLUMNS = ("id", "type", "x", "y", "z", "radius", "parent")
# "# SOMA_REGION: VISp", "# Soma region = VISp", or NeuroMorpho's "# ORIGINAL_SOURCE NeuronStudio" (upper case)
_KEY_COLON = re.compile(r"([A-Za-z][A-Za-z0-9_\- ]{0,63}?)\s*[:=](?:\s+(.*))?$")
_KEY_UPPER = re.compile(r"([A-Z][A-Z0-9_]*)\s+(.*)$")
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Tracing:
    """One neuron as its SWC file gives it. Arrays are read-only, in the order of the file's node lines."""

    path: str
    ids: np.ndarray  # int64 node ids as written
    types: np.ndarray  # int32 SWC structure identifiers (0 undefined, 1 soma, 2 axon, 3 basal, 4 apical, ...)
    xyz: np.ndarray  # float64 (n, 3): x, y, z as written, in the file's own units
    radii: np.ndarray  # float64 (n,)
    parents: np.ndarray  # int64 index (into these arrays) of each node's parent; -1 for a root
    header: dict[str, str] = field(default_factory=dict)  # "# KEY: value" comment lines, KEY upper-cased
    comments: tuple[str, ...] = ()  # every comment line (and trailing comment), without '#', stripped
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # file line (1-based) of each node

    @property
    def n_nodes(self) -> int:
        return len(self.ids)

    @property
    def roots(self) -> np.ndarray:
        """Indices of the nodes without a parent (one per tree)."""
        return np.flatnonzero(self.parents < 0)

    @property
    def edges(self) -> np.ndarray:
        """(n_edges, 2) int64 index pairs (child, parent): the segments of the tracing."""
        child = np.flatnonzero(self.parents >= 0)
        return np.stack([child, self.parents[child]], axis=1)



def read_swc(path: str | Path, root: Path | None = None) -> Tracing:
    """Read one SWC file. Raises SourceError with one sentence naming the file and the line if it is malformed,
    or if it is no regular file inside `root` (confine.py: its error would quote another file's lines)."""
    p = Path(path)
    try:
        with confine.open_file(p, root=root) as f:
            raw = f.read()
    except OSError as exc:
        raise SourceError(f"{p}: cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SourceError(f"{p}, line {line}: not UTF-8 text (byte "
                          f"{raw[exc.start:exc.start + 1]!r}); an SWC file is plain text") from None
    lines = _LINE_END.split(text)
    data, comments = _scan(lines)
    if not data:
        what = "is empty" if not text.strip() else "holds only comments and blank lines"
        raise SourceError(f"{p}, line {len(lines) if text.strip() else 1}: no SWC node in the file (it {what})")

    rows = [lines[n - 1].split("#", 1)[0] for n in data]
    try:  # numpy's C parser: any whitespace between fields, scientific notation
        table = np.loadtxt(rows, dtype=np.float64, ndmin=2, comments=None)
        if table.shape[1] != len(COLUMNS):
            raise ValueError("another column count")
    except ValueError:  # a row of another length, or a field that is not a number: say which line
        bad = _first_bad_line(lines, data)
        raise SourceError(f"{p}, line {bad[0]}: {bad[1]}" if bad else f"{p}: not an SWC node table") from None
    line_of = np.asarray(data, np.int64)

    def numbers(column: int, integral: bool) -> np.ndarray:
        values = table[:, column]
        wrong = ~np.isfinite(values)
        if integral:
            wrong |= values != np.round(values)
        if wrong.any():
            k = int(np.argmax(wrong))
            what = "a whole number" if integral else "a finite number"
            raise SourceError(f"{p}, line {data[k]}: the {COLUMNS[column]} field must be {what}; "
                              f"got {rows[k].split()[column]!r}")
        return values

    def integers(column: int, bits: int) -> np.ndarray:
        """A whole-number column exactly: float64 holds every integer below 2^53; a larger one is
        read again from its text, so two ids never collapse into one, and refused beyond `bits`."""
        values = numbers(column, True)
        exact = np.abs(values) < 2.0**53
        out = np.where(exact, values, 0).astype(np.int64)
        for k in np.flatnonzero(~exact | (values < -(2.0 ** (bits - 1))) | (values >= 2.0 ** (bits - 1))):
            text = rows[k].split()[column]
            try:
                value = int(text) if not exact[k] else int(values[k])
            except ValueError:
                raise SourceError(f"{p}, line {data[k]}: the {COLUMNS[column]} field {text!r} is beyond 2^53, "
                                  "where only digits say it exactly; write it as a whole number") from None
            if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
                raise SourceError(f"{p}, line {data[k]}: the {COLUMNS[column]} field {text!r} is beyond the "
                                  f"{bits}-bit integers an SWC reader keeps")
            out[k] = value
        return out

    ids = integers(0, 64)
    types = integers(1, 32).astype(np.int32)
    xyz = np.stack([numbers(c, False) for c in (2, 3, 4)], axis=1)
    radii = numbers(5, False)
    parent_ids = integers(6, 64)
    parents = _parent_indices(p, ids, parent_ids, line_of)
    header: dict[str, str] = {}
    for c in comments:
        m = _KEY_COLON.match(c) or _KEY_UPPER.match(c)
        if m:
            header.setdefault(re.sub(r"[\s\-]+", "_", m.group(1).strip()).upper(), (m.group(2) or "").strip())
    arrays = [ids, types, xyz, radii, parents, line_of]
    for a in arrays:
        a.setflags(write=False)
    return Tracing(str(p), ids, types, xyz, radii, parents, header, tuple(comments), line_of)


def _scan(lines: list[str]) -> tuple[list[int], list[str]]:
    """The 1-based numbers of the node lines, in order, and every comment without its '#'."""
    data, comments = [], []
    for n, line in enumerate(lines, 1):
        body, hash_, comment = line.partition("#")
        if body.strip():
            data.append(n)
        if hash_:
            comments.append(comment.strip())
    return data, comments


def _first_bad_line(lines: list[str], data: list[int]) -> tuple[int, str] | None:
    """Where a node line is not seven numbers, and what it is instead."""
    for n in data:
        fields = lines[n - 1].split("#", 1)[0].split()
        if len(fields) != len(COLUMNS):
            return n, (f"a node line needs {len(COLUMNS)} fields (id type x y z radius parent), "
                       f"this one has {len(fields)}")
        for name, value in zip(COLUMNS, fields):
            try:
                float(value)
            except ValueError:
                return n, f"the {name} field must be a number; got {value!r}"
    return None


def _parent_indices(p: Path, ids: np.ndarray, parent_ids: np.ndarray, line_of: np.ndarray) -> np.ndarray:
    """Each node's parent as an index into the arrays (-1: a root, written as a negative parent id), refusing
    repeated ids, parents that are not in the file, and cycles."""
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeat = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(repeat):
        later = order[repeat + 1]
        k = int(later[np.argmin(line_of[later])])
        first = int(line_of[order[np.searchsorted(sorted_ids, ids[k])]])
        raise SourceError(f"{p}, line {line_of[k]}: node id {ids[k]} is used again (first on line {first})")
    has_parent = parent_ids >= 0
    at = np.minimum(np.searchsorted(sorted_ids, parent_ids), n - 1)
    found = sorted_ids[at] == parent_ids
    missing = has_parent & ~found
    if missing.any():
        k = int(np.argmax(missing))
        raise SourceError(f"{p}, line {line_of[k]}: node {ids[k]} names parent {parent_ids[k]}, "
                          "which is not a node of the file")
    parents = np.where(has_parent, order[at], -1).astype(np.int64)
    # Pointer doubling: after ceil(log2(n)) + 1 rounds every node of a tree points at the sentinel n;
    # a node still pointing elsewhere is on a cycle or hangs from one.
    up = np.append(np.where(parents >= 0, parents, n), n)
    for _ in range(int(np.ceil(np.log2(n + 1))) + 1):
        up = up[up]
    if (up[:n] != n).any():
        k = int(np.argmax(up[:n] != n))
        seen: dict[int, None] = {}
        while k not in seen:  # walk up to the cycle itself
            seen[k] = None
            k = int(parents[k])
        cycle = [k]
        while int(parents[cycle[-1]]) != k:
            cycle.append(int(parents[cycle[-1]]))
        first = min(cycle, key=lambda i: line_of[i])
        shown = " -> ".join(str(ids[i]) for i in cycle[:6]) + (" -> ..." if len(cycle) > 6 else f" -> {ids[k]}")
        raise SourceError(f"{p}, line {line_of[first]}: node {ids[first]} is its own ancestor "
                          f"(the parents run in a cycle: {shown})")
    return parents
