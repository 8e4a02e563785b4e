"""SWC tracings read by `read_swc`, checked against the arrays the test wrote with its own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bil_transform.readers.base import SourceError
from bil_transform.readers.swc import Tracing, read_swc

HEADER = [
    "# ORIGINAL_SOURCE test_swc_reader",
    "# SOMA_REGION: VISp",
    "# Creature: mouse",
    "# SCALE 1.0 1.0 1.0",
    "# traced by hand, free text without a key",
]


def neuron(rng: np.random.Generator) -> dict:
    """Two trees: a soma with two basal dendrites (one branching twice), an axon and an apical dendrite;
    and a second root, untyped, whose branch changes to a custom type 7. Ids are neither contiguous nor in
    file order, and several parents come after their children."""
    # index: (type, parent index)
    tree = [(1, -1), (3, 0), (3, 1), (3, 2), (3, 2), (3, 4), (3, 4), (3, 0), (2, 0), (2, 8), (2, 9),
            (4, 0), (4, 11), (0, -1), (7, 13), (7, 14), (7, 14)]
    n = len(tree)
    types = np.array([t for t, _ in tree], np.int32)
    parent_index = np.array([p for _, p in tree], np.int64)
    xyz = np.round(rng.uniform(-500, 5000, (n, 3)), 3)
    radii = np.round(rng.uniform(0.1, 4.0, n), 3)
    radii[0] = 7.25
    ids = rng.choice(np.arange(3, 1000), n, replace=False).astype(np.int64)
    order = rng.permutation(n)  # file order
    return {
        "ids": ids[order], "types": types[order], "xyz": xyz[order], "radii": radii[order],
        # parent index in file order: where the parent landed after the permutation
        "parents": np.array([-1 if parent_index[i] < 0 else int(np.flatnonzero(order == parent_index[i])[0])
                             for i in order], np.int64),
    }


def write_swc(path: Path, nrn: dict, sep: str = " ", end: str = "\n", fmt: str = "{:.3f}", trailing: str = "",
              header: list[str] = HEADER, middle_comment: int | None = 5) -> list[int]:
    """Write the neuron; return the file line (1-based) of each node."""
    out, lines = list(header), []
    for k in range(len(nrn["ids"])):
        if k == middle_comment:
            out.append("# a comment between nodes")
        p = nrn["parents"][k]
        fields = [str(nrn["ids"][k]), str(nrn["types"][k]), *(fmt.format(v) for v in nrn["xyz"][k]),
                  fmt.format(nrn["radii"][k]), str(nrn["ids"][p] if p >= 0 else -1)]
        out.append(sep.join(fields) + trailing)
        lines.append(len(out))
    path.write_bytes((end.join(out) + end).encode())
    return lines


@pytest.fixture
def nrn() -> dict:
    return neuron(np.random.default_rng(16))


def check(t: Tracing, nrn: dict, path: Path) -> None:
    assert t.path == str(path)
    assert t.ids.dtype == np.int64 and t.ids.tolist() == nrn["ids"].tolist()
    assert t.types.dtype == np.int32 and t.types.tolist() == nrn["types"].tolist()
    assert t.xyz.dtype == np.float64 and t.xyz.shape == (len(nrn["ids"]), 3)
    np.testing.assert_allclose(t.xyz, nrn["xyz"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(t.radii, nrn["radii"], rtol=0, atol=1e-9)
    assert t.parents.dtype == np.int64 and t.parents.tolist() == nrn["parents"].tolist()


@pytest.mark.parametrize("style", ["spaces", "tabs", "several spaces", "crlf", "scientific", "trailing blanks"])
def test_fields_equal_what_the_test_wrote(tmp_path, nrn, style):
    kw = {"tabs": {"sep": "\t"}, "several spaces": {"sep": "    "}, "crlf": {"end": "\r\n"},
          "scientific": {"fmt": "{:.6e}"}, "trailing blanks": {"trailing": " \t "}}.get(style, {})
    path = tmp_path / "neuron.swc"
    lines = write_swc(path, nrn, **kw)
    t = read_swc(path)
    check(t, nrn, path)
    assert t.lines.tolist() == lines
    assert t.header == {"ORIGINAL_SOURCE": "test_swc_reader", "SOMA_REGION": "VISp", "CREATURE": "mouse",
                        "SCALE": "1.0 1.0 1.0"}
    assert t.comments == ("ORIGINAL_SOURCE test_swc_reader", "SOMA_REGION: VISp", "Creature: mouse",
                          "SCALE 1.0 1.0 1.0", "traced by hand, free text without a key", "a comment between nodes")


def test_roots_and_edges(tmp_path, nrn):
    path = tmp_path / "neuron.swc"
    write_swc(path, nrn)
    t = read_swc(path)
    n = len(nrn["ids"])
    assert t.n_nodes == n
    roots = [k for k in range(n) if nrn["parents"][k] < 0]
    assert t.roots.tolist() == roots and len(roots) == 2
    assert sorted(map(tuple, t.edges.tolist())) == sorted((k, int(nrn["parents"][k])) for k in range(n)
                                                         if nrn["parents"][k] >= 0)
    with pytest.raises(ValueError):  # shared between threads and caches: nobody may change it
        t.xyz[0, 0] = 1.0


def test_a_file_without_comments_has_no_header(tmp_path):
    path = tmp_path / "no_soma.swc"
    path.write_text("10 3 5 6 7 1 -1\n11 3 8 6 7 1 10\n")
    t = read_swc(path)
    assert t.ids.tolist() == [10, 11] and t.parents.tolist() == [-1, 0] and t.xyz[1].tolist() == [8, 6, 7]
    assert t.header == {} and t.comments == ()


def malformed(nrn: dict, kind: str) -> tuple[dict, int | None]:
    """A copy of the neuron broken in one way, and the index (file order) of the node whose line must be named."""
    bad = {k: v.copy() for k, v in nrn.items()}
    if kind == "missing parent":
        k = 9
        bad["missing_parent_id"] = 5000
        return bad, k
    if kind == "cycle":  # make a root the child of one of its own descendants
        root = int(np.flatnonzero(bad["parents"] < 0)[0])
        child = int(np.flatnonzero(bad["parents"] == root)[0])
        bad["parents"][root] = child
        return bad, min(root, child)
    if kind == "duplicate id":
        bad["ids"][12] = bad["ids"][3]
        return bad, 12
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing parent", "cycle", "duplicate id"])
def test_broken_trees_name_file_and_line(tmp_path, nrn, kind):
    bad, k = malformed(nrn, kind)
    path = tmp_path / f"{kind.replace(' ', '_')}.swc"
    lines = write_swc(path, bad)
    if kind == "missing parent":  # the writer only writes parents that exist: break one by hand
        text = path.read_text().split("\n")
        fields = text[lines[k] - 1].split(" ")
        fields[6] = str(bad["missing_parent_id"])
        text[lines[k] - 1] = " ".join(fields)
        path.write_text("\n".join(text))
    with pytest.raises(SourceError) as err:
        read_swc(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and f"line {lines[k]}:" in msg, msg


@pytest.mark.parametrize("kind, body, line, says", [
    ("non-numeric field", "1 1 0 0 0 5 -1\n2 3 1 abc 0 1 1\n", 2, "'abc'"),
    ("non-numeric type", "# x\n1 1 0 0 0 5 -1\n2 dendrite 1 2 0 1 1\n", 3, "'dendrite'"),
    ("non-numeric radius", "1 1 0 0 0 5 -1\n2 3 1 2 0 NA 1\n", 2, "'NA'"),
    ("fractional id", "1 1 0 0 0 5 -1\n2.5 3 1 2 0 1 1\n", 2, "'2.5'"),
    ("six columns", "# h\n\n1 1 0 0 0 5 -1\n2 3 1 2 0 1\n3 3 1 2 3 1 2\n", 4, "has 6"),
    ("eight columns", "1 1 0 0 0 5 -1 0\n2 3 1 2 0 1 1 0\n", 1, "has 8"),
    ("one column short everywhere", "1 1 0 0 0 -1\n2 3 1 2 0 1\n", 1, "has 6"),
    ("self parent", "1 1 0 0 0 5 -1\n2 3 1 2 0 1 2\n", 2, "cycle"),
    ("empty", "", 1, "no SWC node"),
    ("comments only", "# SOMA_REGION: VISp\n#\n", 3, "no SWC node"),
])
def test_malformed_lines_name_file_and_line(tmp_path, kind, body, line, says):
    path = tmp_path / "bad.swc"
    path.write_text(body)
    with pytest.raises(SourceError) as err:
        read_swc(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and f"line {line}:" in msg and says in msg, msg


def test_not_text_and_missing_file(tmp_path):
    path = tmp_path / "binary.swc"
    path.write_bytes(b"1 1 0 0 0 5 -1\n2 3 \xff\xfe 0 0 1 1\n")
    with pytest.raises(SourceError, match=r"binary\.swc, line 2: not UTF-8"):
        read_swc(path)
    with pytest.raises(SourceError, match="nothing.swc: cannot be read"):
        read_swc(tmp_path / "nothing.swc")
