"""Skeleton sources served end to end: SWC files written here by the test's own writer, placed on an image
by the catalog's units and offset, read back over HTTP by cloud-volume and by this file's own parser of
the precomputed skeleton layout, and compared with the test's own numpy placement of its own parse of
the files. Also: segment properties, malformed files (503 naming file and line), embargo, HTTP
semantics, the API and its neuron search, the manifest, and a file rewritten on disk.

Nothing here computes an expected value with bil_transform code; only the server is run."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
from cloudvolume import CloudVolume
from conftest import Server
from reference import parse_skeleton

TOKEN = "secret-token-1"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
IDENTITY = {"Accept-Encoding": "identity"}
GZIP = {"Accept-Encoding": "gzip"}

BRAIN_VOXEL = (2.0, 0.5, 0.5)  # z, y, x micrometres
BRAIN_SHAPE = (6, 40, 36)  # z, y, x
CLOSED_VOXEL = (1.0, 0.25, 0.75)

# Skeleton sources of the catalog: (id, space, units, offset z y x, directory or file, metadata lines)
VOX_OFFSET = (1.5, -2.0, 3.0)
UM_OFFSET = (-4.25, 10.0, 2.5)
LIVE_OFFSET = (0.5, 0.25, -1.0)
CLOSED_OFFSET = (0.0, 1.0, -0.5)

# --- the test's own SWC writer and reader --------------------------------------------------------------

# One neuron's topology, by index: (SWC type, parent index). A three-point soma (type 1), an axon that
# branches twice, a branching basal dendrite, a branching apical dendrite; then a second root (a basal
# fragment traced apart from the cell) whose last branch changes to a custom type 7.
TOPOLOGY = [
    (1, -1), (1, 0), (1, 0),
    (2, 0), (2, 3), (2, 4), (2, 5), (2, 5), (2, 7), (2, 7),
    (3, 0), (3, 10), (3, 11), (3, 11),
    (4, 0), (4, 14), (4, 15), (4, 15), (4, 16),
    (3, -1), (3, 19), (3, 20), (3, 20), (7, 22),
]


@dataclass
class Swc:
    """A neuron as the test writes it, in file order."""

    ids: np.ndarray  # int64
    types: np.ndarray  # int64
    xyz: np.ndarray  # float64 (n, 3), three decimals
    radii: np.ndarray  # float64, three decimals
    parents: np.ndarray  # int64 index into these arrays, -1 for a root
    header: list[str]


def make_neuron(seed: int, root_box: tuple[float, float], step: float, soma: bool = True,
                header: list[str] = ()) -> Swc:
    """A neuron of TOPOLOGY: a random walk from each root, ids random and not in order, file order shuffled
    so that parents often follow their children, and (without soma) the first line not a root."""
    rng = np.random.default_rng(seed)
    n = len(TOPOLOGY)
    types = np.array([t for t, _ in TOPOLOGY], np.int64)
    if not soma:
        types[types == 1] = 3
    parent = np.array([p for _, p in TOPOLOGY], np.int64)
    xyz = np.zeros((n, 3))
    for i, p in enumerate(parent):
        xyz[i] = rng.uniform(*root_box, 3) if p < 0 else xyz[p] + rng.uniform(-step, step, 3)
    xyz = np.round(xyz, 3)
    radii = np.round(rng.uniform(0.2, 3.0, n), 3)
    radii[types == 1] = 5.5
    ids = rng.choice(np.arange(2, 900), n, replace=False).astype(np.int64)
    order = rng.permutation(n)
    if not soma:  # a child first, so the soma-less neuron's first root is not its first line
        while parent[order[0]] < 0:
            order = rng.permutation(n)
    position = np.argsort(order)  # where each topology index lands in file order
    return Swc(ids[order], types[order], xyz[order], radii[order],
               np.array([-1 if parent[i] < 0 else position[parent[i]] for i in order], np.int64), list(header))


def write_swc(path: Path, nrn: Swc) -> list[int]:
    """Write the neuron as SWC (header comments first); return each node's 1-based line number."""
    out, lines = list(nrn.header), []
    for k in range(len(nrn.ids)):
        p = nrn.parents[k]
        out.append(" ".join([str(nrn.ids[k]), str(nrn.types[k]), *(f"{v:.3f}" for v in nrn.xyz[k]),
                             f"{nrn.radii[k]:.3f}", str(nrn.ids[p]) if p >= 0 else "-1"]))
        lines.append(len(out))
    path.write_text("\n".join(out) + "\n")
    return lines


def parse_swc(path: Path) -> Swc:
    """The test's own reader: seven whitespace-separated numbers a node line, '#' lines are comments."""
    rows, header = [], []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            header.append(line)
        elif line.strip():
            rows.append(line.split())
    assert all(len(r) == 7 for r in rows)
    ids = np.array([int(r[0]) for r in rows], np.int64)
    index = {int(i): k for k, i in enumerate(ids)}
    return Swc(ids, np.array([int(r[1]) for r in rows], np.int64),
               np.array([[float(v) for v in r[2:5]] for r in rows]), np.array([float(r[5]) for r in rows]),
               np.array([-1 if int(r[6]) < 0 else index[int(r[6])] for r in rows], np.int64), header)


# --- the placement rule, implemented here with numpy ---------------------------------------------------

@dataclass
class Placed:
    vertices_nm: np.ndarray  # served, Neuroglancer frame
    radius_nm: np.ndarray
    types: np.ndarray
    edges: np.ndarray  # (child, parent) indices
    ome_um: np.ndarray  # node positions in micrometres of the OME-Zarr frame
    soma_um: np.ndarray
    cable_um: float


def place(nrn: Swc, units: str, offset_zyx, voxel_zyx) -> Placed:
    vs = np.array(voxel_zyx[::-1], np.float64)  # x, y, z
    p = nrn.xyz + np.array(offset_zyx[::-1], np.float64)
    if units == "voxel":
        served, radius, ome = (p + 0.5) * vs * 1000, nrn.radii * vs[0] * 1000, p * vs
    else:
        served, radius, ome = (p + vs / 2) * 1000, nrn.radii * 1000, p
    child = np.flatnonzero(nrn.parents >= 0)
    edges = np.stack([child, nrn.parents[child]], axis=1)
    soma = ome[nrn.types == 1].mean(axis=0) if (nrn.types == 1).any() else ome[np.flatnonzero(nrn.parents < 0)[0]]
    cable = float(np.linalg.norm(ome[edges[:, 0]] - ome[edges[:, 1]], axis=1).sum())
    return Placed(served, radius, nrn.types.astype(np.float64), edges, ome, soma, cable)


# --- the test's own reader of the precomputed skeleton body ---------------------------------------------

def sorted_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.int64).reshape(-1, 2)
    return a[np.lexsort((a[:, 1], a[:, 0]))]


def check_skeleton(vertices, edges, radius, types, want: Placed) -> None:
    assert vertices.shape == want.vertices_nm.shape
    np.testing.assert_allclose(vertices, want.vertices_nm.astype(np.float32), rtol=1e-6, atol=0)
    assert len(edges) == len(want.edges)
    np.testing.assert_array_equal(sorted_rows(edges), sorted_rows(want.edges))
    np.testing.assert_allclose(radius, want.radius_nm.astype(np.float32), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(types), want.types)


# --- the catalog ----------------------------------------------------------------------------------------

@dataclass
class Source:
    id: str
    units: str
    offset: tuple[float, float, float]
    voxel: tuple[float, float, float]
    root: Path  # directory of its files
    files: dict[str, Swc]  # file name -> neuron as written (good files only)


@dataclass
class Bad:
    file: str
    lines: set[int]  # the line(s) the error may name


@dataclass
class World:
    server: Server
    root: Path
    sources: dict[str, Source]
    bad: dict[str, Bad]


def _slices(root: Path, name: str, shape, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / name).mkdir()
    for z in range(shape[0]):
        tifffile.imwrite(root / name / f"z{z:03d}.tif", rng.integers(0, 60000, shape[1:], dtype=np.uint16))


def _write_bad(root: Path) -> dict[str, Bad]:
    """One malformed file for each refusal, each with the line the test knows is wrong."""
    head = ["# a malformed tracing, on purpose", "# SOMA_REGION: VISp"]
    good = ["1 1 20.000 20.000 5.000 4.000 -1", "2 3 21.000 20.500 5.000 1.000 1", "3 3 22.000 21.000 5.000 1.000 2"]
    cases = {
        "missing_parent.swc": (good + ["4 3 23.000 21.000 5.000 1.000 3", "5 3 24.000 22.000 5.000 1.000 77",
                                       "6 3 25.000 22.000 5.000 1.000 5"], {len(head) + 5}),
        # 4 -> 6 -> 5 -> 4: the cycle's three lines are the wrong ones; nodes 1-3 are a good tree
        "cycle.swc": (good + ["4 3 23.000 21.000 5.000 1.000 6", "5 3 24.000 22.000 5.000 1.000 4",
                              "6 3 25.000 22.000 5.000 1.000 5"], {len(head) + 4, len(head) + 5, len(head) + 6}),
        "not_a_number.swc": (good + ["4 3 23.000 twenty 5.000 1.000 3", "5 3 24.000 22.000 5.000 1.000 4"],
                             {len(head) + 4}),
        "six_columns.swc": (good + ["4 3 23.000 21.000 5.000 3", "5 3 24.000 22.000 5.000 1.000 3"],
                            {len(head) + 4}),
    }
    out = {}
    for name, (body, lines) in cases.items():
        (root / name).write_text("\n".join(head + body) + "\n")
        out[name] = Bad(name, lines)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("skeletons_served")
    _slices(root, "slices", BRAIN_SHAPE, 1)
    _slices(root, "closed_slices", (4, 16, 20), 2)

    sources: dict[str, Source] = {}

    def add(ident, units, offset, voxel, directory, neurons: dict[str, Swc]):
        (root / directory).mkdir(parents=True)
        for name, nrn in neurons.items():
            write_swc(root / directory / name, nrn)
        sources[ident] = Source(ident, units, offset, voxel, root / directory, neurons)

    # voxel units: root positions in voxels, steps of up to 1.5 voxels
    add("tracings", "voxel", VOX_OFFSET, BRAIN_VOXEL, "swc_vox", {
        "cell_a.swc": make_neuron(11, (12, 24), 1.5, header=[
            "# ORIGINAL_SOURCE test_skeletons_served", "# SOMA_REGION: MOs", "# Tracer: Jane Doe",
            "# traced by hand, a free comment without a key"]),
        "cell_b.swc": make_neuron(12, (12, 24), 1.5, header=["# Tracer: Ken Ito", "# written by the test"]),
        "cell_c.swc": make_neuron(13, (12, 24), 1.5, soma=False, header=["# no soma node in this one"]),
    })
    # micrometre units: positions in micrometres
    add("tracings_um", "micrometer", UM_OFFSET, BRAIN_VOXEL, "swc_um", {
        "n1.swc": make_neuron(21, (8, 16), 1.0, header=["# SOMA_REGION: SSp-bfd", "# Tracer: Jane Doe"]),
        "n2.swc": make_neuron(22, (8, 16), 1.0, soma=False, header=["# a fragment without a soma"]),
    })
    add("broken", "micrometer", (0.0, 0.0, 0.0), BRAIN_VOXEL, "swc_bad", {
        "ok.swc": make_neuron(31, (8, 16), 1.0, header=["# the one good file here"]),
    })
    bad = _write_bad(root / "swc_bad")
    add("live", "micrometer", LIVE_OFFSET, BRAIN_VOXEL, "live", {
        "neuron.swc": make_neuron(41, (8, 16), 1.0, header=["# rewritten by a test"]),
    })
    add("closed_tracings", "voxel", CLOSED_OFFSET, CLOSED_VOXEL, "swc_closed", {
        "secret.swc": make_neuron(51, (6, 12), 1.0, header=["# on an embargoed brain"]),
    })

    catalog = root / "catalog.toml"
    catalog.write_text(f"""
[[datasets]]
id = "brain"
path = "slices"
voxel_size = {list(BRAIN_VOXEL)}
compression = "none"
title = "A brain of slices"

[[datasets]]
id = "closed"
path = "closed_slices"
voxel_size = {list(CLOSED_VOXEL)}
embargo = true

[[datasets]]
id = "tracings"
kind = "skeletons"
path = "swc_vox"
space = "brain"
units = "voxel"
offset = {list(VOX_OFFSET)}
soma_region = "VISp"
lab = "Svoboda"

[[datasets]]
id = "tracings_um"
kind = "skeletons"
path = "swc_um"
space = "brain"
offset = {list(UM_OFFSET)}
soma_region = "SSp"

[[datasets]]
id = "broken"
kind = "skeletons"
path = "swc_bad"
space = "brain"
units = "micrometer"

[[datasets]]
id = "live"
kind = "skeletons"
path = "live/neuron.swc"
space = "brain"
units = "micrometer"
offset = {list(LIVE_OFFSET)}

[[datasets]]
id = "closed_tracings"
kind = "skeletons"
path = "swc_closed"
space = "closed"
units = "voxel"
offset = {list(CLOSED_OFFSET)}
""")
    tokens = tmp_path_factory.mktemp("skeleton_secrets") / "tokens.toml"
    tokens.write_text(f'[[tokens]]\ntoken = "{TOKEN}"\ndatasets = ["closed"]\n')
    srv = Server(catalog, ["--recheck", "0.2", "--tokens", str(tokens)])
    yield World(srv, root, sources, bad)
    srv.stop()


def _api(world: World, ident: str, headers=None, **params) -> dict:
    r = requests.get(world.server.url(f"/api/datasets/{ident}"), params=params, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def _by_file(world: World, ident: str, headers=None) -> dict[str, dict]:
    return {n["file"]: n for n in _api(world, ident, headers)["neurons"]}


def _skeleton_info(world: World, ident: str, headers=None) -> dict:
    r = requests.get(world.server.url(f"/ds/{ident}/skeletons/info"), headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def _expected(source: Source, name: str) -> Placed:
    # the test's own parse of the file on disk (not the in-memory neuron), then the placement
    parsed = parse_swc(source.root / name)
    written = source.files[name]
    np.testing.assert_array_equal(parsed.ids, written.ids)
    np.testing.assert_array_equal(parsed.parents, written.parents)
    return place(parsed, source.units, source.offset, source.voxel)


# --- 1. every served skeleton, by cloud-volume and by the test's parser --------------------------------

@pytest.mark.parametrize("ident", ["tracings", "tracings_um"])
def test_served_skeletons_equal_the_placed_swc(world, ident):
    source = world.sources[ident]
    neurons = _by_file(world, ident)
    assert set(neurons) == set(source.files)
    info = _skeleton_info(world, ident)
    assert info["@type"] == "neuroglancer_skeletons"
    assert np.array_equal(np.array(info["transform"], np.float64).reshape(3, 4), np.eye(3, 4))
    attributes = info["vertex_attributes"]
    assert {a["id"] for a in attributes} == {"radius", "vertex_types"}
    assert all(a["data_type"] == "float32" and a["num_components"] == 1 for a in attributes)

    volume = CloudVolume(f"precomputed://{world.server.base}/ds/{ident}", use_https=False, progress=False,
                         cache=False)
    for name in sorted(source.files):
        want = _expected(source, name)
        listed = neurons[name]
        assert listed["status"] == "ok" and re.fullmatch(r"swc-[a-z]{3}-[a-z]{3}", listed["id"])
        segid = listed["segid"]
        assert isinstance(segid, int) and 0 < segid < 2**64

        # the test's own parser of the bytes
        r = requests.get(world.server.url(f"/ds/{ident}/skeletons/{segid}"), headers=IDENTITY)
        assert r.status_code == 200, r.text
        n, m = len(want.vertices_nm), len(want.edges)
        assert len(r.content) == 8 + 12 * n + 8 * m + 4 * n * len(attributes)
        vertices, edges, attrs = parse_skeleton(r.content, attributes)
        check_skeleton(vertices, edges, attrs["radius"], attrs["vertex_types"], want)  # vertices in file order

        # cloud-volume, reading /ds/ID/info and skeletons/info itself
        skel = volume.skeleton.get(segid)
        assert int(skel.id) == segid
        check_skeleton(skel.vertices, skel.edges, skel.radius, skel.vertex_types, want)
        np.testing.assert_allclose(skel.vertices, vertices, rtol=0, atol=0)


def test_voxel_and_micrometer_units_differ_by_the_rule(world):
    """A sanity check of the test's own rule on the served bytes: for units voxel, vertex / (voxel size
    in nm) - 0.5 - offset is the SWC coordinate; for micrometres, vertex / 1000 - voxel/2 - offset."""
    attrs = _skeleton_info(world, "tracings")["vertex_attributes"]
    vs = np.array(BRAIN_VOXEL[::-1])
    for ident, name in (("tracings", "cell_b.swc"), ("tracings_um", "n1.swc")):
        source = world.sources[ident]
        segid = _by_file(world, ident)[name]["segid"]
        body = requests.get(world.server.url(f"/ds/{ident}/skeletons/{segid}")).content
        vertices, _, values = parse_skeleton(body, attrs)
        nrn = parse_swc(source.root / name)
        off = np.array(source.offset[::-1])
        if source.units == "voxel":
            back, radius = vertices / (vs * 1000) - 0.5 - off, values["radius"] / (vs[0] * 1000)
        else:
            back, radius = vertices / 1000 - vs / 2 - off, values["radius"] / 1000
        np.testing.assert_allclose(back, nrn.xyz, atol=1e-3)
        np.testing.assert_allclose(radius, nrn.radii, atol=1e-4)


# --- 2. segment properties ------------------------------------------------------------------------------

NG_NUMBER_TYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32"}


def check_segment_properties(doc: dict) -> dict[str, dict]:
    """As Neuroglancer's parseInlinePropertyMap reads it; returns the properties by id."""
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["@type"] == "neuroglancer_segment_properties"
    ids = doc["inline"]["ids"]
    assert isinstance(ids, list)
    for i in ids:
        assert isinstance(i, str) and re.fullmatch(r"0|[1-9][0-9]*", i) and int(i) < 2**64
    assert len(set(ids)) == len(ids)
    props = doc["inline"]["properties"]
    pids = [p["id"] for p in props]
    assert all(isinstance(p, str) and p for p in pids) and len(set(pids)) == len(pids)
    kinds = [p["type"] for p in props]
    assert set(kinds) <= {"label", "description", "string", "tags", "number"}
    assert all(kinds.count(k) <= 1 for k in ("label", "description", "tags"))
    for p in props:
        assert isinstance(p["values"], list) and len(p["values"]) == len(ids), p["id"]
        assert ("data_type" in p) == (p["type"] == "number"), p["id"]
        if p["type"] == "number":
            assert p["data_type"] in NG_NUMBER_TYPES
            assert all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                       for v in p["values"])
            if p["data_type"] != "float32":
                assert all(isinstance(v, int) for v in p["values"])
        elif p["type"] in ("label", "description", "string"):
            assert all(isinstance(v, str) for v in p["values"])
    return {p["id"]: p for p in props}


@pytest.mark.parametrize("ident", ["tracings", "tracings_um", "broken"])
def test_segment_properties_list_every_served_neuron_with_its_measures(world, ident):
    source = world.sources[ident]
    vol_info = requests.get(world.server.url(f"/ds/{ident}/info")).json()
    assert vol_info["type"] == "segmentation" and vol_info["skeletons"] == "skeletons"
    assert _skeleton_info(world, ident)["segment_properties"] == "segment_properties"
    r = requests.get(world.server.url(f"/ds/{ident}/skeletons/segment_properties/info"))
    assert r.status_code == 200, r.text
    props = check_segment_properties(r.json())
    ids = r.json()["inline"]["ids"]
    neurons = _by_file(world, ident)
    served = {n["segid"]: n for n in neurons.values() if n["status"] == "ok"}
    assert sorted(int(i) for i in ids) == sorted(served)  # every served neuron, and no unavailable one
    assert set(n["file"] for n in served.values()) == set(source.files)
    kinds = {p["type"]: p for p in props.values()}
    for k, i in enumerate(ids):
        listed = served[int(i)]
        want = _expected(source, listed["file"])
        assert kinds["label"]["values"][k] == listed["id"]
        assert kinds["description"]["values"][k] == listed["file"]
        assert props["nodes"]["values"][k] == len(want.vertices_nm)
        assert props["cable_um"]["values"][k] == pytest.approx(want.cable_um, abs=1e-3)
        for a, axis in enumerate("xyz"):
            assert props[f"soma_{axis}_um"]["values"][k] == pytest.approx(want.soma_um[a], abs=1e-3)
        # and the API gives the same measures
        assert listed["nodes"] == len(want.vertices_nm)
        assert listed["cable_um"] == pytest.approx(want.cable_um, abs=1e-3)
        assert listed["soma_um"] == pytest.approx(list(want.soma_um), abs=1e-3)


# --- 3. malformed files ---------------------------------------------------------------------------------

def test_malformed_files_answer_503_with_file_and_line_and_the_rest_is_served(world):
    doc = _api(world, "broken")
    assert doc["neuron_count"] == 1 and doc["unavailable_neurons"] == len(world.bad)
    neurons = {n["file"]: n for n in doc["neurons"]}
    assert set(neurons) == set(world.bad) | {"ok.swc"}
    root = str(world.root)
    for name, bad in world.bad.items():
        listed = neurons[name]
        assert listed["status"] == "error", listed
        assert re.fullmatch(r"swc-[a-z]{3}-[a-z]{3}", listed["id"]) and isinstance(listed["segid"], int)
        message = listed["error"]
        assert root not in message  # named relative to the source, never by the server's paths
        found = re.search(re.escape(listed["file"]) + r", line (\d+)", message)
        assert found, message
        assert int(found[1]) in bad.lines, (name, message, bad.lines)
        r = requests.get(world.server.url(f"/ds/broken/skeletons/{listed['segid']}"))
        assert r.status_code == 503, (name, r.status_code, r.text)
        assert int(r.headers["Retry-After"]) >= 1
        assert f"{listed['file']}, line {found[1]}" in r.text and root not in r.text, r.text
        assert message in r.text, (message, r.text)  # the API's sentence is the one the 503 gives
        assert len(r.text.strip().splitlines()) == 1
    # the good file of the same source is served, equal to the test's own placement
    ok = neurons["ok.swc"]
    assert ok["status"] == "ok"
    attrs = _skeleton_info(world, "broken")["vertex_attributes"]
    r = requests.get(world.server.url(f"/ds/broken/skeletons/{ok['segid']}"))
    assert r.status_code == 200
    vertices, edges, values = parse_skeleton(r.content, attrs)
    check_skeleton(vertices, edges, values["radius"], values["vertex_types"], _expected(world.sources["broken"],
                                                                                       "ok.swc"))


def test_unknown_and_malformed_keys(world):
    segids = {n["segid"] for n in _api(world, "broken")["neurons"]}
    unknown = next(s for s in range(1, 100) if s not in segids)
    r = requests.get(world.server.url(f"/ds/broken/skeletons/{unknown}"))
    assert r.status_code == 404, r.text
    for key in ("abc", "12x", "-3"):
        r = requests.get(world.server.url(f"/ds/broken/skeletons/{key}"))
        assert r.status_code == 400, (key, r.status_code, r.text)


# --- 4. embargo -----------------------------------------------------------------------------------------

def test_a_skeleton_source_of_an_embargoed_image_needs_a_token(world):
    with_token = _api(world, "closed_tracings", BEARER)
    neurons = with_token["neurons"]
    assert [n["file"] for n in neurons] == ["secret.swc"]
    segid = neurons[0]["segid"]
    paths = ["/ds/closed_tracings/skeletons/info", "/ds/closed_tracings/skeletons/segment_properties/info",
             f"/ds/closed_tracings/skeletons/{segid}", "/ds/closed_tracings/info",
             "/ds/closed_tracings/manifest.json", "/ds/closed_tracings/manifest.json?checksums=sha256"]
    for path in paths:
        r = requests.get(world.server.url(path))
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert secret_free(r.content), path
        wrong = requests.get(world.server.url(path), headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code in (401, 403), (path, wrong.status_code)
        ok = requests.get(world.server.url(path), headers=BEARER)
        assert ok.status_code == 200, (path, ok.status_code, ok.text)
        assert "private" in ok.headers["Cache-Control"], (path, ok.headers.get("Cache-Control"))
    # a conditional request reveals nothing either
    tagged = requests.get(world.server.url(f"/ds/closed_tracings/skeletons/{segid}"), headers=BEARER)
    again = requests.get(world.server.url(f"/ds/closed_tracings/skeletons/{segid}"),
                         headers={"If-None-Match": tagged.headers["ETag"]})
    assert again.status_code == 401
    # with the token: the right skeleton
    source = world.sources["closed_tracings"]
    attrs = _skeleton_info(world, "closed_tracings", BEARER)["vertex_attributes"]
    vertices, edges, values = parse_skeleton(tagged.content, attrs)
    check_skeleton(vertices, edges, values["radius"], values["vertex_types"], _expected(source, "secret.swc"))
    # the API without a token: the source's catalog entry, never its neurons
    public = _api(world, "closed_tracings")
    assert public["id"] == "closed_tracings" and public["kind"] == "skeletons"
    assert "neurons" not in public
    assert secret_free(json.dumps(public).encode())


def secret_free(body: bytes) -> bool:
    return b"swc-" not in body and b"secret.swc" not in body


# --- 5. HTTP semantics on a skeleton body ---------------------------------------------------------------

def test_http_semantics_of_a_skeleton_body(world):
    segid = _by_file(world, "tracings")["cell_a.swc"]["segid"]
    url = world.server.url(f"/ds/tracings/skeletons/{segid}")
    origin = {"Origin": "http://viewer.example.org"}
    whole = requests.get(url, headers={**IDENTITY, **origin})
    assert whole.status_code == 200 and "Content-Encoding" not in whole.headers
    assert whole.headers["Access-Control-Allow-Origin"] == "*"
    body, tag = whole.content, whole.headers["ETag"]
    assert re.fullmatch(r'"[^"]+"', tag), tag  # strong
    assert len(body) > 100

    same = requests.get(url, headers={"If-None-Match": tag, **IDENTITY, **origin})
    assert same.status_code == 304 and same.content == b"" and same.headers["ETag"] == tag
    assert same.headers["Access-Control-Allow-Origin"] == "*"

    part = requests.get(url, headers={"Range": "bytes=8-27", **IDENTITY, **origin})
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 8-27/{len(body)}"
    assert part.content == body[8:28]
    tail = requests.get(url, headers={"Range": "bytes=-16", **IDENTITY})
    assert tail.status_code == 206 and tail.content == body[-16:]

    zipped = requests.get(url, headers={**GZIP, **origin}, stream=True)
    raw = zipped.raw.read(decode_content=False)
    assert zipped.status_code == 200 and zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == body
    ztag = zipped.headers["ETag"]
    assert ztag != tag and ztag.endswith('-gzip"') and not ztag.startswith("W/")
    assert zipped.headers["Access-Control-Allow-Origin"] == "*"
    assert requests.get(url, headers={"If-None-Match": ztag, **GZIP}).status_code == 304


# --- 6. the API -----------------------------------------------------------------------------------------

def test_the_api_document_of_a_skeleton_source(world):
    for ident, source in world.sources.items():
        doc = _api(world, ident, BEARER if ident == "closed_tracings" else None)
        assert doc["id"] == ident and doc["kind"] == "skeletons" and doc["format"] == "swc"
        assert doc["units"] == source.units and doc["offset"] == list(source.offset)
        assert doc["space"] == ("closed" if ident == "closed_tracings" else "brain")
        assert doc["status"] == "ok"
        assert doc["neuron_count"] == len(source.files)
        assert doc["unavailable_neurons"] == (len(world.bad) if ident == "broken" else 0)
        assert isinstance(doc["links"], dict)
    cell_a = _by_file(world, "tracings")["cell_a.swc"]
    assert cell_a["header"] == {"original_source": "test_skeletons_served", "soma_region": "MOs",
                                "tracer": "Jane Doe"}
    assert _by_file(world, "tracings")["cell_c.swc"]["header"] == {}


def _files(doc: dict) -> set[str]:
    return {n["file"] for n in doc["neurons"]}


def test_neuron_search_by_file_header_and_catalog_metadata(world):
    every = {"cell_a.swc", "cell_b.swc", "cell_c.swc"}
    assert _files(_api(world, "tracings")) == every
    # the catalog's soma_region (VISp), except where a file's own header says otherwise (cell_a: MOs)
    assert _files(_api(world, "tracings", q="soma_region:visp")) == {"cell_b.swc", "cell_c.swc"}
    assert _files(_api(world, "tracings", q="soma_region:mos")) == {"cell_a.swc"}
    # a header key of the files only
    assert _files(_api(world, "tracings", q="tracer:jane")) == {"cell_a.swc"}
    assert _files(_api(world, "tracings", q="tracer:ito")) == {"cell_b.swc"}
    # catalog metadata only
    assert _files(_api(world, "tracings", q="lab:svoboda")) == every
    assert _files(_api(world, "tracings", q="lab:svoboda tracer:ken")) == {"cell_b.swc"}
    assert _files(_api(world, "tracings", q="lab:nobody")) == set()
    # identifiers and files
    a = _by_file(world, "tracings")["cell_a.swc"]
    assert _files(_api(world, "tracings", q=f"id:{a['id']}")) == {"cell_a.swc"}
    assert _files(_api(world, "tracings", q=f"segid:{a['segid']}")) == {"cell_a.swc"}
    assert _files(_api(world, "tracings", q="file:cell_c")) == {"cell_c.swc"}
    # the micrometre source: its file says SSp-bfd, its catalog SSp
    assert _files(_api(world, "tracings_um", q="soma_region:ssp-bfd")) == {"n1.swc"}
    assert _files(_api(world, "tracings_um", q="soma_region:ssp")) == {"n1.swc", "n2.swc"}


def test_the_image_lists_its_skeleton_sources(world):
    doc = _api(world, "brain")
    on_brain = {"tracings", "tracings_um", "broken", "live"}
    assert {s["id"] for s in doc["skeletons"]} == on_brain
    for s in doc["skeletons"]:
        assert s["kind"] == "skeletons" and s["space"] == "brain"
        assert s["neuron_count"] == len(world.sources[s["id"]].files)
    links = doc["links"]["skeletons"]
    assert set(links) == on_brain
    for ident, link in links.items():
        assert link == f"precomputed://{world.server.base}/ds/{ident}/skeletons"
        info = requests.get(link.removeprefix("precomputed://") + "/info")
        assert info.status_code == 200 and info.json()["@type"] == "neuroglancer_skeletons"
    # the embargoed image's source is not the brain's, and the brain's are not the closed image's
    closed = _api(world, "closed", BEARER)
    assert [s["id"] for s in closed["skeletons"]] == ["closed_tracings"]


def test_the_catalog_search_finds_skeleton_sources_by_their_metadata(world):
    def ids(q):
        r = requests.get(world.server.url("/api/datasets"), params={"q": q})
        assert r.status_code == 200, r.text
        return {d["id"] for d in r.json()["datasets"]}

    assert ids("lab:svoboda") == {"tracings"}
    assert ids("soma_region:ssp") == {"tracings_um"}
    assert ids("kind:skeletons") == set(world.sources)
    assert ids("svoboda") == {"tracings"}


# --- 7. the manifest ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ident", ["tracings", "broken"])
def test_the_manifest_lists_the_original_swc_files(world, ident):
    source = world.sources[ident]
    r = requests.get(world.server.url(f"/ds/{ident}/manifest.json?checksums=sha256"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == ident
    on_disk = sorted(p.name for p in source.root.iterdir() if p.suffix == ".swc")
    files = {f["name"]: f for f in doc["files"]}
    assert sorted(files) == on_disk
    assert set(files) == set(_by_file(world, ident))  # the names the API gives the neurons
    for name, entry in files.items():
        data = (source.root / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


# --- 8. a file rewritten on disk ------------------------------------------------------------------------

def test_a_rewritten_swc_file_is_served_fresh(world):
    source = world.sources["live"]
    path = source.root / "neuron.swc"
    listed = _by_file(world, "live")["neuron.swc"]
    segid = listed["segid"]
    url = world.server.url(f"/ds/live/skeletons/{segid}")
    attrs = _skeleton_info(world, "live")["vertex_attributes"]
    old = requests.get(url, headers=IDENTITY)
    assert old.status_code == 200
    vertices, edges, values = parse_skeleton(old.content, attrs)
    check_skeleton(vertices, edges, values["radius"], values["vertex_types"], _expected(source, "neuron.swc"))
    old_props = requests.get(world.server.url("/ds/live/skeletons/segment_properties/info")).json()

    nrn = source.files["neuron.swc"]
    moved = Swc(nrn.ids, nrn.types, np.round(nrn.xyz + [7.25, -3.5, 1.125], 3), nrn.radii, nrn.parents,
                nrn.header)
    write_swc(path, moved)
    source.files["neuron.swc"] = moved
    want = _expected(source, "neuron.swc")

    deadline = time.monotonic() + 20
    while True:
        r = requests.get(url, headers=IDENTITY)
        assert r.status_code == 200, (r.status_code, r.text)
        if r.content != old.content:
            break
        assert time.monotonic() < deadline, "the rewritten file was not served within 20 s"
        time.sleep(0.1)
    new_tag = r.headers["ETag"]
    assert new_tag != old.headers["ETag"]
    vertices, edges, values = parse_skeleton(r.content, attrs)
    check_skeleton(vertices, edges, values["radius"], values["vertex_types"], want)
    # never stale again: the old ETag gets the new body, the new one a 304, cloud-volume the new vertices
    stale = requests.get(url, headers={"If-None-Match": old.headers["ETag"], **IDENTITY})
    assert stale.status_code == 200 and stale.content == r.content
    assert requests.get(url, headers={"If-None-Match": new_tag, **IDENTITY}).status_code == 304
    for _ in range(5):
        assert requests.get(url, headers=IDENTITY).content == r.content
    skel = CloudVolume(f"precomputed://{world.server.base}/ds/live", use_https=False, progress=False,
                       cache=False).skeleton.get(segid)
    check_skeleton(skel.vertices, skel.edges, skel.radius, skel.vertex_types, want)
    # the listings follow: same identifiers, new measures
    now = _by_file(world, "live")["neuron.swc"]
    assert (now["id"], now["segid"]) == (listed["id"], listed["segid"])
    assert now["soma_um"] == pytest.approx(list(want.soma_um), abs=1e-3)
    assert now["soma_um"] != pytest.approx(listed["soma_um"], abs=1)
    props = requests.get(world.server.url("/ds/live/skeletons/segment_properties/info")).json()
    assert props != old_props
    by_id = {p["id"]: p for p in props["inline"]["properties"]}
    for a, axis in enumerate("xyz"):
        assert by_id[f"soma_{axis}_um"]["values"][0] == pytest.approx(want.soma_um[a], abs=1e-3)
    manifest = requests.get(world.server.url("/ds/live/manifest.json?checksums=sha256")).json()
    assert manifest["files"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_reopen_reads_again_only_the_files_that_changed(tmp_path, monkeypatch):
    """Thousands of tracings: one rewritten file must not cost reading all the others again."""
    from bil_transform import tracings
    from bil_transform.catalog import DatasetSpec

    directory = tmp_path / "swc"
    directory.mkdir()
    for i in range(5):
        write_swc(directory / f"n{i}.swc", make_neuron(i, (10.0, 50.0), 2.0))
    spec = DatasetSpec(id="many", path=str(directory), kind="skeletons", space="brain")
    frame = tracings.Frame((2.0, 0.5, 0.5), (0.0, 0.0, 0.0), (8, 64, 64))
    first = tracings.open_tracings(spec, frame)
    read = []
    monkeypatch.setattr(tracings, "read_swc", lambda path: read.append(Path(path).name) or _real_read(path))
    again = tracings.open_tracings(spec, frame, first)
    assert read == [] and again.neurons == first.neurons
    time.sleep(0.01)
    write_swc(directory / "n3.swc", make_neuron(33, (10.0, 50.0), 2.0))
    changed = tracings.open_tracings(spec, frame, again)
    assert read == ["n3.swc"]
    assert [t.name for t in changed.neurons] == [t.name for t in first.neurons]
    assert changed.neurons[3].measures != first.neurons[3].measures
    assert changed.neurons[:3] == first.neurons[:3] and changed.neurons[4] == first.neurons[4]
    tracings.open_tracings(spec, tracings.Frame((1.0, 0.5, 0.5), (0.0, 0.0, 0.0), (8, 64, 64)), changed)
    assert len(read) == 6  # another frame: every file placed again


def _real_read(path):
    from bil_transform.readers.swc import read_swc

    return read_swc(path)


def test_the_demo_tracings_are_well_formed_neurons_inside_the_demo_brain(tmp_path):
    """`bil-transform demo` serves them on its volume: read back by the test's own parser, each is
    one tree from a soma, every node inside the volume (voxel units)."""
    from bil_transform.demo import make_demo_tracings

    shape = (256, 1024, 1024)
    files = sorted(make_demo_tracings(tmp_path, shape).glob("*.swc"))
    assert len(files) == 5
    for path in files:
        nrn = parse_swc(path)
        assert (nrn.parents < 0).sum() == 1 and nrn.types[nrn.parents < 0][0] == 1
        assert len(nrn.ids) > 50 and (nrn.radii > 0).all()
        assert ((nrn.xyz >= 0) & (nrn.xyz < np.array(shape[::-1]))).all(), path.name
        assert any(line.startswith("# SOMA_REGION: ") for line in nrn.header)


def test_info_says_what_an_swc_file_holds_or_which_line_is_wrong(tmp_path):
    import subprocess
    import sys

    write_swc(tmp_path / "cell.swc", make_neuron(5, (10.0, 50.0), 2.0, header=["# SOMA_REGION: VISp"]))
    run = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(tmp_path / "cell.swc")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"nodes:         {len(TOPOLOGY)} in 2 tree(s)" in run.stdout and "SOMA_REGION: VISp" in run.stdout
    (tmp_path / "bad.swc").write_text("1 1 0 0 0 1 -1\n2 3 1 1 1 1 9\n")
    bad = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(tmp_path / "bad.swc")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "bad.swc, line 2: " in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
