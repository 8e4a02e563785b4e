"""Which library should parse SWC neuron tracings (issue 16, point 2): measured, not assumed.

Contenders, each called as its documentation shows, with the options a careful user would set:
- numpy.loadtxt (baseline): the seven columns as a table, nothing checked.
- osteoid (cloud-volume's skeletons): `Skeleton.from_swc(text)`.
- MorphIO: `Morphology(path, Option.allow_unifurcated_section_change)`; a neuron model of soma and sections.
- navis default: `navis.read_swc(path)` (single-space delimiter, 32-bit precision).
- navis tuned: `navis.read_swc(path, delimiter=r"\\s+", precision=64)`.

For each: import time (fresh interpreter, best of 3), the installed distributions it pulls in, parse time
of a large tracing written here (--nodes, several roots, many branches; best of --repeat), and robustness
on a table of small inputs. Outcomes:
  ok        parses right: every node's position, radius, type and parent (and the ids, where kept) equal
            what the file says;
  WRONG     returns something else without a word;
  accepts   a malformed file returns a neuron without a word (silently wrong);
  err+line  raises, and the message names the file and the line;
  err       raises, with a message that names neither the file nor the line (or only one of them);
  rejects   raises on a well-formed file.
Where a library drops the ids or the direction of edges, the comparison is on what it keeps (positions,
radii, types, edges as coordinate pairs) and the notes say what is lost.

The choice (bil_transform/readers/swc.py): numpy parses the node table, and the module's own checks
refuse, naming the file and the line, what every library here lets through (its row "read_swc (ours)").
MorphIO and navis are not dependencies of the project: `pip install morphio navis` to run this.

Run: python benchmarks/swc_readers.py [--nodes N] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- the inputs

# (id, type, x, y, z, radius, parent id): a soma, a bifurcating dendrite, an axon, and a second tree whose
# custom types change along one branch (an untyped root then type 7, as tracing tools write).
BASE = [
    (1, 1, 100.0, 200.0, 300.0, 6.5, -1),
    (2, 3, 110.0, 200.0, 300.0, 1.25, 1),
    (3, 3, 120.0, 201.0, 300.0, 1.0, 2),
    (4, 3, 130.0, 210.0, 301.0, 0.75, 3),
    (5, 3, 130.0, 190.0, 299.0, 0.5, 3),
    (6, 2, 90.0, 200.0, 300.0, 0.5, 1),
    (7, 2, 80.0, 195.5, 302.0, 0.25, 6),
    (8, 4, 100.0, 215.0, 300.0, 2.0, 1),
]
SECOND_TREE = [
    (20, 0, 500.0, 500.0, 50.0, 1.0, -1),
    (21, 7, 510.0, 505.0, 50.0, 1.0, 20),
    (22, 7, 520.0, 510.0, 55.0, 1.0, 21),
]


def line(row, sep=" ", fmt="{:g}") -> str:
    i, t, x, y, z, r, p = row
    return sep.join([str(i), str(t), *(fmt.format(v) for v in (x, y, z, r)), str(p)])


def text(rows, sep=" ", fmt="{:g}", end="\n", head=("# ORIGINAL_SOURCE benchmark",), mid=None) -> str:
    out = list(head)
    for k, row in enumerate(rows):
        if mid is not None and k == mid:
            out.append("# a comment between nodes")
        out.append(line(row, sep, fmt))
    return end.join(out) + end


def shuffled(rows):
    order = [4, 0, 7, 2, 5, 1, 6, 3]
    return [rows[k] for k in order]


def renumbered(rows, mapping):
    return [(mapping[i], t, x, y, z, r, mapping.get(p, p)) for i, t, x, y, z, r, p in rows]


@dataclass
class Case:
    name: str
    body: str
    rows: list | None  # the nodes it must give; None: malformed, must raise


def cases() -> list[Case]:
    ok = BASE
    two = BASE + SECOND_TREE
    scrambled_ids = renumbered(BASE, {1: 40, 2: 7, 3: 19, 4: 2, 5: 33, 6: 11, 7: 5, 8: 28})
    bad_last = BASE[:-1]
    return [
        Case("single spaces (plain)", text(ok), ok),
        Case("tabs between fields", text(ok, sep="\t"), ok),
        Case("several spaces / indent", "\n".join("  " + line(r, sep="   ") for r in ok) + "\n", ok),
        Case("comment between nodes", text(ok, mid=4), ok),
        Case("header key: value lines", text(ok, head=("# SOMA_REGION: VISp", "# CREATURE: mouse", "#")), ok),
        Case("several roots", text(two), two),
        Case("two somata (two neurons)", text(two).replace("20 0 500", "20 1 500"),
             [r if r[0] != 20 else (20, 1, *r[2:]) for r in two]),
        Case("ids not in order", text(scrambled_ids), scrambled_ids),
        Case("parent after its child", text(shuffled(ok)), shuffled(ok)),
        Case("CRLF line endings", text(ok, end="\r\n"), ok),
        Case("trailing whitespace", "\n".join(line(r) + " \t " for r in ok) + "\n", ok),
        Case("scientific notation", text(ok, fmt="{:.6e}"), ok),
        Case("blank lines", text(ok).replace("\n", "\n\n", 3), ok),
        Case("missing parent", text(bad_last + [(8, 4, 100.0, 215.0, 300.0, 2.0, 99)]), None),
        Case("cycle", text([(1, 3, 0, 0, 0, 1, 3), (2, 3, 1, 0, 0, 1, 1), (3, 3, 2, 0, 0, 1, 2)] + SECOND_TREE), None),
        Case("duplicate id", text(bad_last + [(3, 4, 100.0, 215.0, 300.0, 2.0, 1)]), None),
        Case("non-numeric field", text(ok).replace("130 190 299", "130 abc 299"), None),
        Case("fractional id", text(ok).replace("\n5 3 ", "\n5.5 3 ", 1), None),
        Case("wrong column count (6)", text(ok).replace(" 0.5 3\n", " 3\n", 1), None),
        Case("wrong column count (8)", text(ok).replace(" 0.5 3\n", " 0.5 3 9\n", 1), None),
        Case("empty file", "", None),
        Case("comments only", "# ORIGINAL_SOURCE nothing\n# no nodes\n", None),
    ]


# ---------------------------------------------------------------- what each library gives, normalized

@dataclass
class Norm:
    nodes: list  # sorted (x, y, z, r, type), rounded
    edges: set  # (child xyz, parent xyz), or frozenset({a, b}) when the direction is lost
    ids: dict | None  # xyz -> (id, parent id), where the library keeps ids
    directed: bool = True
    soma_edges: bool = True  # False: edges to soma nodes are not represented (MorphIO)


def key(x, y, z):
    return (round(float(x), 4), round(float(y), 4), round(float(z), 4))


def norm_rows(rows, directed=True, ids=True, soma_edges=True) -> Norm:
    """From (id, type, x, y, z, r, parent id) rows: the expected answer, and the id-keeping libraries'."""
    pos = {i: key(x, y, z) for i, t, x, y, z, r, p in rows}
    soma = {i for i, t, *_ in rows if t == 1}
    nodes = sorted(key(x, y, z) + (round(float(r), 4), int(t)) for i, t, x, y, z, r, p in rows)
    edges = set()
    for i, _t, _x, _y, _z, _r, p in rows:
        if p in pos and (soma_edges or p not in soma):
            edges.add((pos[i], pos[p]) if directed else frozenset((pos[i], pos[p])))
    idmap = {pos[i]: (int(i), int(p)) for i, *_, p in rows} if ids else None
    return Norm(nodes, edges, idmap, directed, soma_edges)


def same(expected_rows, got: Norm) -> bool:
    want = norm_rows(expected_rows, got.directed, got.ids is not None, got.soma_edges)
    return want.nodes == got.nodes and want.edges == got.edges and want.ids == got.ids


def numpy_parse(path):
    return np.loadtxt(path, comments="#", ndmin=2)


def numpy_norm(a) -> Norm:
    ids, types, x, y, z, r, parents = a.T
    return norm_rows(list(zip(ids.astype(int), types.astype(int), x, y, z, r, parents.astype(int))))


def osteoid_parse(path):
    import osteoid
    return osteoid.Skeleton.from_swc(Path(path).read_text())


def osteoid_norm(s) -> Norm:
    v = [key(*p) for p in s.vertices]
    nodes = sorted(p + (round(float(r), 4), int(t)) for p, r, t in zip(v, s.radii, s.vertex_types))
    return Norm(nodes, {frozenset((v[a], v[b])) for a, b in s.edges}, None, directed=False)


def morphio_parse(path):
    import morphio
    return morphio.Morphology(str(path), morphio.Option.allow_unifurcated_section_change)


def morphio_norm(m) -> Norm:
    nodes = {}
    for p, d in zip(m.soma.points, m.soma.diameters):
        nodes[key(*p)] = (round(float(d) / 2, 4), 1)
    edges = set()
    for s in m.iter():
        pts = [key(*p) for p in s.points]
        for p, d in zip(pts, s.diameters):
            nodes.setdefault(p, (round(float(d) / 2, 4), int(s.type)))
        edges.update(zip(pts[1:], pts[:-1]))
    return Norm(sorted(p + v for p, v in nodes.items()), edges, None, soma_edges=False)


def navis_parse(path, **kw):
    import navis
    return navis.read_swc(str(path), **kw)


def ours_parse(path):
    from bil_transform.readers.swc import read_swc
    return read_swc(path)


def ours_norm(t) -> Norm:
    return norm_rows(list(zip(t.ids, t.types, *t.xyz.T, t.radii, np.where(t.parents >= 0, t.ids[t.parents], -1))))


def navis_norm(n) -> Norm:
    t = n.nodes
    return norm_rows(list(zip(t.node_id, t.label.astype(int), t.x, t.y, t.z, t.radius, t.parent_id)))


@dataclass
class Lib:
    name: str
    module: str  # what to import for the import time
    dist: str | None  # the distribution whose dependencies to count
    parse: object
    norm: object
    notes: str


LIBS = [
    Lib("numpy.loadtxt", "numpy", "numpy", numpy_parse, numpy_norm, "a table only: no ids checked, no header"),
    Lib("osteoid", "osteoid", "osteoid", osteoid_parse, osteoid_norm,
        "drops ids and edge direction; splits on one space"),
    Lib("MorphIO", "morphio", "morphio", morphio_parse, morphio_norm,
        "re-models as soma + sections: drops ids, node order, comments"),
    Lib("navis (default)", "navis", "navis", navis_parse, navis_norm, "float32 coordinates by default"),
    Lib("navis (\\s+, 64-bit)", "navis", "navis",
        lambda p: navis_parse(p, delimiter=r"\s+", precision=64), navis_norm, "keeps ids, parents, header rows"),
    Lib("read_swc (ours)", "bil_transform.readers.swc", "numpy", ours_parse, ours_norm,
        "the choice: numpy parses, our checks"),
]


@contextlib.contextmanager
def quiet():
    """Libraries print warnings (MorphIO to stderr from C++, navis through logging): keep the table readable."""
    import logging
    logging.disable(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2), os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        os.dup2(null.fileno(), 1)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            os.dup2(saved[0], 2)
            os.dup2(saved[1], 1)
            os.close(saved[0])
            os.close(saved[1])
            logging.disable(logging.NOTSET)


def outcome(lib: Lib, case: Case, path: Path) -> tuple[str, str]:
    try:
        with quiet():
            got = lib.parse(path)
    except Exception as exc:
        msg = re.sub(r"\x1b\[[0-9;]*m|\s+", " ", f"{type(exc).__name__}: {exc}")[:200]
        if case.rows is not None:
            return "rejects", msg
        names_file = path.name in msg
        names_line = re.search(r"(line|:)\s*\d+", msg.replace(str(path), "")) is not None
        return ("err+line" if names_file and names_line else "err"), msg
    if case.rows is None:
        return "accepts", ""
    try:
        return ("ok" if same(case.rows, lib.norm(got)) else "WRONG"), ""
    except Exception as exc:  # the library returned, but not what the file says
        return "WRONG", f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- the large tracing, and costs


def write_large(path: Path, n: int, roots: int, rng: np.random.Generator) -> None:
    """n nodes in `roots` trees: each node continues the branch before it, or (5%) starts a new branch from a
    random earlier node of its tree; ids are written as 1..n, shuffled in blocks so parents come after children."""
    parent = np.arange(-1, n - 1)
    jump = rng.random(n) < 0.05
    parent[jump] = (rng.random(jump.sum()) * np.nonzero(jump)[0]).astype(np.int64)
    starts = np.linspace(0, n, roots, endpoint=False).astype(np.int64)
    parent[starts] = -1
    tree = np.searchsorted(starts, np.arange(n), side="right") - 1
    bad = parent >= 0
    bad[bad] = parent[bad] < starts[tree[bad]]
    parent[bad] = np.maximum(starts[tree[bad]], np.arange(n)[bad] - 1)
    step = rng.normal(0, 2.0, (n, 3))
    xyz = np.zeros((n, 3))
    for i in range(n):  # positions follow the tree
        xyz[i] = (xyz[parent[i]] if parent[i] >= 0 else rng.uniform(0, 10000, 3)) + step[i]
    types = np.where(parent < 0, 1, rng.choice([2, 3, 4], n))
    radii = rng.uniform(0.1, 3.0, n)
    ids = rng.permutation(n) + 1
    with open(path, "w") as f:
        f.write("# ORIGINAL_SOURCE benchmarks/swc_readers.py\n# SOMA_REGION: VISp\n")
        order = rng.permutation(n)
        pid = np.where(parent >= 0, ids[np.maximum(parent, 0)], -1)
        for i in order:
            f.write(f"{ids[i]} {types[i]} {xyz[i, 0]:.3f} {xyz[i, 1]:.3f} {xyz[i, 2]:.3f} {radii[i]:.3f} {pid[i]}\n")


def import_time(module: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", f"import time; t = time.perf_counter(); import {module}; "
                              "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
        best = min(best, float(out.stdout.strip().splitlines()[-1]))
    return best


def dependencies(dist: str) -> int:
    """Installed distributions `dist` pulls in (its requirements, recursively, without extras)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r for r in reqs if "extra ==" not in r]
    return len(seen) - 1


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        with quiet():
            fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=200_000)
    ap.add_argument("--roots", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import morphio
    morphio.set_maximum_warnings(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "large.swc"
        write_large(big, args.nodes, args.roots, np.random.default_rng(16))
        print(f"large tracing: {args.nodes} nodes, {args.roots} roots, ids shuffled, "
              f"{big.stat().st_size / 1e6:.1f} MB; best of {args.repeat}\n")
        for lib in LIBS:  # imports, first-call set-up
            warm = tmp / "warm.swc"
            warm.write_text(text(BASE))
            with quiet():
                lib.parse(warm)
        print(f"{'library':22} {'import s':>9} {'deps':>5} {'parse s':>9}  notes")
        for lib in LIBS:
            try:
                t = f"{best_of(lambda lib=lib: lib.parse(big), args.repeat):9.3f}"
            except Exception as exc:
                why = re.sub(r"\x1b\[[0-9;]*m|\s+", " ", f"{type(exc).__name__}: {exc}")[:90]
                t = f"{'fails':>9}  ({why})"
            print(f"{lib.name:22} {import_time(lib.module):9.2f} {dependencies(lib.dist):5d} {t}  {lib.notes}")

        table = cases()
        results = {}
        for case in table:
            path = tmp / (re.sub(r"\W+", "_", case.name).strip("_") + ".swc")
            path.write_bytes(case.body.encode())
            results[case.name] = [outcome(lib, case, path) for lib in LIBS]
        width = max(len(c.name) for c in table) + 2
        print("\n" + "input".ljust(width) + "".join(f"{lib.name[:19]:>21}" for lib in LIBS))
        for case in table:
            tag = "" if case.rows is not None else " *"
            print((case.name + tag).ljust(width) + "".join(f"{o:>21}" for o, _ in results[case.name]))
        print("  * malformed: the right outcome is err+line")
        score = ["" for _ in LIBS]
        for k, _lib in enumerate(LIBS):
            good = sum((o == "ok") if c.rows is not None else (o.startswith("err"))
                       for c in table for o in [results[c.name][k][0]])
            score[k] = f"{good}/{len(table)}"
        print("right".ljust(width) + "".join(f"{s:>21}" for s in score))
        print("\nmessages on malformed input:")
        for case in table:
            if case.rows is None:
                for lib, (_o, msg) in zip(LIBS, results[case.name]):
                    if msg:
                        print(f"  {case.name:24} {lib.name:22} {msg[:150]}")


if __name__ == "__main__":
    main()
