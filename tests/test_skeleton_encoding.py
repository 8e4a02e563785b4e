"""Skeleton encoding (writers/skeletons.py) read back by cloud-volume, by Neuroglancer's Python encoder,
and by this file's own parser of the byte layout; the info documents checked against the rules
Neuroglancer's parser enforces (src/datasource/precomputed/frontend.ts, src/skeleton/frontend.ts)."""

from __future__ import annotations

import json
import math
import re

import neuroglancer
import numpy as np
import pytest
from cloudvolume import CloudVolume, Skeleton
from reference import parse_skeleton

from bil_transform.writers import skeletons

# SWC lines (id, type, x, y, z, radius, parent), micrometres with three decimals, ids not in order
# of position and not from 1: a soma, an axon that branches twice, two dendrites, a custom type (10),
# and a second root (a dendrite fragment traced apart from the cell).
SWC_A = [
    (5, 1, 5012.125, 3998.500, 2101.250, 6.5, -1),
    (6, 2, 5020.000, 3998.500, 2101.250, 1.25, 5),
    (7, 2, 5030.500, 3990.000, 2099.000, 1.0, 6),
    (8, 2, 5041.750, 3980.125, 2097.500, 0.875, 7),
    (9, 2, 5035.000, 3975.000, 2110.000, 0.75, 7),
    (10, 2, 5050.000, 3970.000, 2095.000, 0.5, 8),
    (11, 2, 5052.000, 3985.000, 2096.000, 0.5, 8),
    (12, 3, 5000.000, 4010.000, 2101.000, 2.0, 5),
    (13, 3, 4990.250, 4020.750, 2102.000, 1.5, 12),
    (14, 3, 4985.000, 4025.000, 2090.000, 1.0, 13),
    (15, 3, 4980.000, 4030.000, 2110.000, 1.0, 13),
    (16, 4, 5012.000, 3980.000, 2120.000, 2.5, 5),
    (17, 10, 5013.000, 3970.000, 2130.500, 0.25, 16),
    (40, 3, 5200.000, 4200.000, 2000.000, 0.5, -1),
    (41, 3, 5210.000, 4205.000, 2001.000, 0.5, 40),
    (42, 3, 5220.000, 4200.000, 2002.000, 0.5, 41),
]
# Two pieces traced without their cell body: the axon from its first branch point, and the fragment.
FRAGMENTS = [(7, 2, 5030.500, 3990.000, 2099.000, 1.0, -1)] + [line for line in SWC_A if line[0] in (8, 9, 10, 11)
                                                                 or line[0] >= 40]


def _arrays(lines):
    """The test's own SWC-to-arrays: vertices x y z, (child, parent) edges, radius, types."""
    index = {line[0]: i for i, line in enumerate(lines)}
    vertices = np.array([line[2:5] for line in lines], dtype=np.float64)
    edges = np.array([(index[line[0]], index[line[6]]) for line in lines if line[6] != -1], dtype=np.int64)
    return vertices, edges.reshape(-1, 2), np.array([line[5] for line in lines]), np.array([line[1] for line in lines])


def _random_tree(rng: np.random.Generator, n: int, roots: int):
    """A larger neuron (n not a multiple of 4, so attribute offsets are not all aligned) spread over
    a mouse brain's extent: coordinates to 12 mm with three decimals of micrometres."""
    vertices = np.round(rng.uniform(0, 12000, (n, 3)), 3)
    parents = np.array([-1 if i < roots else rng.integers(0, i) for i in range(n)])
    edges = np.array([(i, p) for i, p in enumerate(parents) if p >= 0])
    radius = np.round(rng.uniform(0.1, 8, n), 3)
    types = rng.choice([1, 2, 3, 4, 5, 6, 7, 19], n)
    return vertices, edges, radius, types


def _neurons() -> list[skeletons.Neuron]:
    rng = np.random.default_rng(16)
    a = _arrays(SWC_A)
    big = _random_tree(rng, 1003, roots=3)
    no_soma = _arrays(FRAGMENTS)
    return [
        skeletons.Neuron(907, "swc-zuk-pof", "big.swc", *big),
        skeletons.Neuron(12, "swc-bec-tov", "cell_01.swc", *a),
        skeletons.Neuron(2**63 + 5, "swc-hir-juj", "fragments.swc", *no_soma),
    ]


def _expected_nm(a: np.ndarray) -> np.ndarray:
    """Three-decimal micrometres are whole nanometres, exact in float32 below 2**24 nm."""
    return np.round(np.asarray(a, dtype=np.float64) * 1000).astype(np.float32)


@pytest.mark.parametrize("which", range(3))
def test_body_read_by_own_parser_cloudvolume_and_neuroglancer(which):
    neuron = _neurons()[which]
    info = skeletons.info()
    data = skeletons.encode(neuron.vertices, neuron.edges, neuron.radius, neuron.types)
    n, m = len(neuron.vertices), len(neuron.edges)
    assert len(data) == 8 + 12 * n + 8 * m + 4 * n + 4 * n

    # (b) this file's parser
    vertices, edges, attrs = parse_skeleton(data, info["vertex_attributes"])
    np.testing.assert_array_equal(vertices, _expected_nm(neuron.vertices))
    np.testing.assert_array_equal(edges, neuron.edges)
    np.testing.assert_array_equal(attrs["radius"], _expected_nm(neuron.radius))
    np.testing.assert_array_equal(attrs["vertex_types"], neuron.types)

    # (a) cloud-volume, as its unsharded skeleton source decodes a body: the info's attributes, then
    # the info's transform applied to the vertices (osteoid Skeleton.physical_space)
    skel = Skeleton.from_precomputed(data, segid=neuron.segid, vertex_attributes=info["vertex_attributes"])
    skel.transform = np.array(info["transform"], dtype=np.float32).reshape(3, 4)
    skel = skel.physical_space()
    assert skel.id == neuron.segid
    np.testing.assert_array_equal(skel.vertices, _expected_nm(neuron.vertices))
    np.testing.assert_array_equal(skel.edges, neuron.edges)
    np.testing.assert_array_equal(skel.radius, _expected_nm(neuron.radius))
    np.testing.assert_array_equal(skel.vertex_types, neuron.types)  # osteoid's own name: its SWC export uses it
    # and the same graph: osteoid's own SWC export lists one line per vertex and one root per tree
    swc = [line for line in skel.to_swc().splitlines() if line and not line.startswith("#")]
    assert len(swc) == n
    assert sum(line.endswith(" -1") for line in swc) == n - m

    # (c) Neuroglancer's own Python encoder, given the attributes our info declares, writes our bytes
    source = neuroglancer.skeleton.SkeletonSource(neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm",
                                                                               scales=[1, 1, 1]))
    source.vertex_attributes = {a["id"]: neuroglancer.skeleton.VertexAttributeInfo(a["data_type"], a["num_components"])
                                for a in info["vertex_attributes"]}
    theirs = neuroglancer.skeleton.Skeleton(_expected_nm(neuron.vertices), neuron.edges, {
        "radius": _expected_nm(neuron.radius), "vertex_types": neuron.types})
    assert theirs.encode(source) == data


def test_cloudvolume_reads_the_skeleton_source_from_its_info(tmp_path):
    """The real client path, `CloudVolume(...).skeleton.get(segid)`: it reads the skeleton `info`
    (attributes, transform) itself and returns physical-space skeletons."""
    neurons = _neurons()
    volume = CloudVolume.create_new_info(num_channels=1, layer_type="segmentation", data_type="uint64",
                                         encoding="raw", resolution=[1000, 1000, 1000], voxel_offset=[0, 0, 0],
                                         volume_size=[16, 16, 16], chunk_size=[16, 16, 16], skeletons="skeletons")
    (tmp_path / "skeletons").mkdir()
    (tmp_path / "info").write_text(json.dumps(volume))
    (tmp_path / "skeletons" / "info").write_text(json.dumps(skeletons.info()))
    for nr in neurons:
        (tmp_path / "skeletons" / str(nr.segid)).write_bytes(
            skeletons.encode(nr.vertices, nr.edges, nr.radius, nr.types))
    vol = CloudVolume(f"file://{tmp_path}", progress=False, cache=False)
    assert vol.skeleton.meta.info["vertex_attributes"] == skeletons.info()["vertex_attributes"]
    for nr in neurons:
        skel = vol.skeleton.get(nr.segid)
        np.testing.assert_array_equal(skel.vertices, _expected_nm(nr.vertices))
        np.testing.assert_array_equal(skel.edges, nr.edges)
        np.testing.assert_array_equal(skel.radius, _expected_nm(nr.radius))
        np.testing.assert_array_equal(skel.vertex_types, nr.types)


def test_skeleton_info_as_neuroglancer_parses_it():
    """parseSkeletonMetadata (precomputed/frontend.ts) and the skeleton layer (skeleton/frontend.ts)."""
    info = skeletons.info()
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    assert info["@type"] == "neuroglancer_skeletons"
    # transform: 12 finite numbers, row-major 3x4; identity, as the stored units are nanometres
    assert len(info["transform"]) == 12 and all(isinstance(v, float) and math.isfinite(v) for v in info["transform"])
    assert np.array_equal(np.array(info["transform"]).reshape(3, 4), np.eye(3, 4))
    ids = [a["id"] for a in info["vertex_attributes"]]
    assert ids == ["radius", "vertex_types"]  # the body order _parse and cloud-volume follow
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i for i in ids)
    for attr in info["vertex_attributes"]:
        # verifyEnumString(DataType) accepts the seven; the WebGL layer only float32
        assert attr["data_type"] == "float32"
        assert isinstance(attr["num_components"], int) and attr["num_components"] >= 1
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", attr["id"])  # usable as prop_<id>() in a shader
    # verifyObjectProperty rejects null for optional members (e.g. "sharding": null)
    assert all(value is not None for value in info.values())
    assert isinstance(info["segment_properties"], str) and info["segment_properties"] == "segment_properties"
    assert "segment_properties" not in skeletons.info(segment_properties=None)
    shifted = skeletons.info([1, 0, 0, 5, 0, 1, 0, 6, 0, 0, 1, 7])
    assert shifted["transform"][3::4] == [5.0, 6.0, 7.0]
    for bad in ([1, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, float("nan")]):
        with pytest.raises(ValueError, match="12 finite numbers"):
            skeletons.info(bad)


NG_DATA_TYPES = {"uint8": (0, 2**8 - 1), "int8": (-(2**7), 2**7 - 1), "uint16": (0, 2**16 - 1),
                 "int16": (-(2**15), 2**15 - 1), "uint32": (0, 2**32 - 1), "int32": (-(2**31), 2**31 - 1),
                 "float32": None}  # DataType less uint64, which parseInlinePropertyMap refuses


def _check_segment_properties(doc: dict) -> None:
    """getSegmentPropertyMap / parseInlinePropertyMap (precomputed/frontend.ts), the rules of
    segment_properties.md, and the query syntax of property_map.ts."""
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["@type"] == "neuroglancer_segment_properties"
    inline = doc["inline"]
    ids = inline["ids"]
    for i in ids:  # parseUint64: a base-10 string of a uint64
        assert isinstance(i, str) and re.fullmatch(r"0|[1-9][0-9]*", i) and int(i) < 2**64
    assert len(set(ids)) == len(ids)
    props = inline["properties"]
    pids = [p["id"] for p in props]
    assert all(isinstance(p, str) for p in pids) and len(set(pids)) == len(pids)
    kinds = [p["type"] for p in props]
    assert set(kinds) <= {"label", "description", "string", "tags", "number"}
    assert all(kinds.count(k) <= 1 for k in ("label", "description", "tags"))
    for p in props:
        assert isinstance(p.get("description", ""), str)
        assert isinstance(p["values"], list) and len(p["values"]) == len(ids)
        assert ("data_type" in p) == (p["type"] == "number")
        if p["type"] == "number":
            bounds = NG_DATA_TYPES[p["data_type"]]
            assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", p["id"])  # usable in "id>value" queries
            for v in p["values"]:
                assert isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                if bounds is not None:
                    assert isinstance(v, int) and bounds[0] <= v <= bounds[1]
        elif p["type"] in ("label", "description", "string"):
            assert all(isinstance(v, str) for v in p["values"])
        else:
            assert "tags" in p and all(" " not in t and not t.startswith("#") for t in p["tags"])


def _cable(lines) -> float:
    by_id = {line[0]: line for line in lines}
    return sum(math.dist(line[2:5], by_id[line[6]][2:5]) for line in lines if line[6] != -1)


def _listed(neurons) -> list:
    return [(nr.segid, nr.name, nr.file, skeletons.measure(nr)) for nr in neurons]


def test_segment_properties_list_every_neuron_with_its_measures():
    neurons = _neurons()
    doc = skeletons.segment_properties(_listed(neurons))
    _check_segment_properties(doc)
    inline = doc["inline"]
    assert inline["ids"] == ["12", "907", str(2**63 + 5)]  # increasing, uint64 beyond 2**53 kept exact
    props = {p["id"]: p for p in inline["properties"]}
    assert props["label"]["type"] == "label" and props["label"]["values"] == ["swc-bec-tov", "swc-zuk-pof",
                                                                              "swc-hir-juj"]
    assert props["description"]["type"] == "description"
    assert props["description"]["values"] == ["cell_01.swc", "big.swc", "fragments.swc"]
    assert props["nodes"]["data_type"] == "uint32" and props["nodes"]["values"] == [16, 1003, 8]
    assert {props[k]["data_type"] for k in ("cable_um", "soma_x_um", "soma_y_um", "soma_z_um")} == {"float32"}

    # cell_01: cable length and soma from the SWC lines directly
    assert props["cable_um"]["values"][0] == pytest.approx(_cable(SWC_A), abs=1e-3)
    assert props["cable_um"]["values"][2] == pytest.approx(_cable(FRAGMENTS), abs=1e-3)
    soma = [props[f"soma_{a}_um"]["values"][0] for a in "xyz"]
    assert soma == [5012.125, 3998.5, 2101.25]
    # the big tree: the mean of its soma-type nodes
    big = neurons[0]
    want = big.vertices[big.types == 1].mean(axis=0)
    assert [props[f"soma_{a}_um"]["values"][1] for a in "xyz"] == pytest.approx(want, abs=1e-3)
    # fragments without a soma node: the first root, as the SWC lists it
    assert [props[f"soma_{a}_um"]["values"][2] for a in "xyz"] == list(FRAGMENTS[0][2:5])


def test_measures_of_one_neuron():
    cell = _neurons()[1]
    m = skeletons.measure(cell)
    assert m.nodes == 16 and m.cable_length == pytest.approx(_cable(SWC_A))
    assert m.soma == (5012.125, 3998.5, 2101.25)
    three_point = skeletons.Neuron(1, "swc-aaa-bbb", "s.swc", np.array([[10.0, 20, 30], [10, 25, 30], [10, 15, 30]]),
                                   np.array([[1, 0], [2, 0]]), np.ones(3), np.array([1, 1, 1]))
    assert skeletons.measure(three_point).soma == (10.0, 20.0, 30.0)  # NeuroMorpho's three-point soma: its centre


def test_an_empty_skeleton_is_two_zero_counts():
    data = skeletons.encode(np.zeros((0, 3)), np.zeros((0, 2), dtype=np.int64), np.zeros(0), np.zeros(0))
    assert data == b"\0" * 8
    skel = Skeleton.from_precomputed(data, segid=3, vertex_attributes=skeletons.info()["vertex_attributes"])
    assert skel.vertices.shape == (0, 3) and skel.edges.shape == (0, 2)


@pytest.mark.parametrize(("args", "message"), [
    ((np.zeros((3, 2)), [[1, 0]], [1, 1, 1], [1, 1, 1]), "vertices must be"),
    ((np.zeros((3, 3)), [[1, 3]], [1, 1, 1], [1, 1, 1]), "edges must be integer indices"),
    ((np.zeros((3, 3)), [[1, -1]], [1, 1, 1], [1, 1, 1]), "edges must be integer indices"),
    ((np.zeros((3, 3)), [[1.0, 0.0]], [1, 1, 1], [1, 1, 1]), "edges must be integer indices"),
    ((np.zeros((3, 3)), [[1, 0, 2]], [1, 1, 1], [1, 1, 1]), "edges must be"),
    ((np.zeros((3, 3)), [[1, 0]], [1, 1], [1, 1, 1]), "radius must have one value per vertex"),
    ((np.zeros((3, 3)), [[1, 0]], [1, 1, 1], [1, 2.5, 1]), "types must be integers"),
    ((np.full((3, 3), np.nan), [[1, 0]], [1, 1, 1], [1, 1, 1]), "vertices must be finite"),
    ((np.zeros((3, 3)), [[1, 0]], [1, np.inf, 1], [1, 1, 1]), "radius must be finite"),
])
def test_encode_refuses_what_no_client_could_read(args, message):
    with pytest.raises(ValueError, match=message):
        skeletons.encode(*(np.asarray(a) for a in args))


@pytest.mark.parametrize("segids", [(0, 5), (2**64, 5), (5, 5), (-1, 5)])
def test_segment_properties_refuse_ids_neuroglancer_cannot_show(segids):
    cell = _neurons()[1]
    neurons = [skeletons.Neuron(s, cell.name, cell.file, cell.vertices, cell.edges, cell.radius, cell.types)
               for s in segids]
    with pytest.raises(ValueError, match="segment id"):
        skeletons.segment_properties(_listed(neurons))
