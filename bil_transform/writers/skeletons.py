"""Neuroglancer precomputed skeletons: the `info`, the per-neuron body, and the segment properties.

Pure functions from neurons (arrays in the image's physical frame, micrometres, x y z) to JSON
documents and bytes; no I/O. Formats: google/neuroglancer src/datasource/precomputed/skeletons.md
and segment_properties.md, as parsed by frontend.ts (`parseSkeletonMetadata`,
`parseInlinePropertyMap`) and read by cloud-volume (osteoid `formats/precomputed.py`).

Units. Vertices and radii are stored in nanometres and the transform is the identity:
- Neuroglancer takes `radius` "in stored model units" (skeletons.md), and cloud-volume applies
  `transform` to the vertices only, never to the radius (`Skeleton.physical_space`). With
  micrometres and a 1000x transform a cloud-volume user would get vertices in nm and radii in um;
  stored in nm, every client sees one unit, as with igneous/kimimaro skeletons (cloud-volume's
  default skeleton info has the identity transform).
- float32 precision is relative, so nothing is lost; and an SWC coordinate with three decimals of
  micrometres becomes an exact integer of nanometres (below 2**24 nm = 16.7 mm), scaled in float64
  before the one rounding to float32. cloud-volume multiplies by the transform in float32, which
  the identity leaves exact.

Attributes. `radius` and `vertex_types` (cloud-volume's names: osteoid's `Skeleton.vertex_types`
feeds its SWC export, and an id `type` would leave that zero), both float32: Neuroglancer's
skeleton layer throws "Data type not supported by WebGL" for any vertex attribute that is not
float32 (src/skeleton/frontend.ts `getWebglDataType`; google/neuroglancer#572), which would stop the
whole layer drawing. SWC types are small integers, exact in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NM_PER_UM = 1000.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SEGMENT_PROPERTIES = "segment_properties"  # the properties directory, relative to the skeletons'
SOMA = 1  # the SWC node type of the soma
MAX_TYPE = 2**24  # integers beyond this are not exact in float32
VERTEX_ATTRIBUTES = (
    {"id": "radius", "data_type": "float32", "num_components": 1},
    {"id": "vertex_types", "data_type": "float32", "num_components": 1},
)


@dataclass(frozen=True, eq=False)
class Neuron:
    """One traced neuron, placed in the image's physical frame.

    `vertices` (n, 3) x y z and `radius` (n,) in micrometres; `edges` (m, 2) vertex indices, each
    (child, parent) as an SWC line gives them, so a vertex that is never a child is a root;
    `types` (n,) SWC node types (1 soma, 2 axon, 3 basal dendrite, 4 apical dendrite, ...)."""

    segid: int  # the Neuroglancer segment id: 1 <= segid < 2**64 (0 is "no segment")
    name: str  # its identifier, like "swc-bec-tov"
    file: str  # the SWC file it was read from
    vertices: np.ndarray
    edges: np.ndarray
    radius: np.ndarray
    types: np.ndarray


@dataclass(frozen=True)
class Measures:
    """What segment_properties and the API list for a neuron, in micrometres."""

    nodes: int
    cable_length: float  # summed edge lengths
    soma: tuple[float, float, float]  # mean of the soma nodes, else the first root


def info(transform: Sequence[float] = IDENTITY, segment_properties: str | None = SEGMENT_PROPERTIES) -> dict:
    """The skeleton source's `info`. `transform` (row-major 3x4) maps the stored nanometres into
    Neuroglancer's nanometres: the identity, unless a further affine is wanted on top (keep its
    scaling uniform, or `radius` stops meaning a length). No `sharding` key: Neuroglancer rejects
    `"sharding": null`, and without one both clients read one body per segment id."""
    matrix = [float(v) for v in transform]
    if len(matrix) != 12 or not all(math.isfinite(v) for v in matrix):
        raise ValueError(f"transform must be 12 finite numbers (3x4, row-major); got {list(transform)!r}")
    doc: dict = {
        "@type": "neuroglancer_skeletons",
        "transform": matrix,
        "vertex_attributes": [dict(a) for a in VERTEX_ATTRIBUTES],
    }
    if segment_properties is not None:
        doc["segment_properties"] = segment_properties
    return doc


def encode(vertices: np.ndarray, edges: np.ndarray, radius: np.ndarray, types: np.ndarray) -> bytes:
    """The body of one skeleton: uint32 vertex and edge counts, float32 x y z per vertex (nm),
    uint32 vertex index pairs, then `radius` (nm) and `vertex_types`, as `info` lists them; all
    little-endian. Inputs in micrometres, as `Neuron` holds them."""
    v = np.asarray(vertices, dtype=np.float64)
    n = len(v)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be (n, 3) x y z; got shape {v.shape}")
    if n >= 2**32:
        raise ValueError(f"{n} vertices: a precomputed skeleton holds fewer than 2**32")
    if not np.isfinite(v).all():
        raise ValueError("vertices must be finite")
    e = np.asarray(edges)
    if e.size == 0:
        e = e.reshape(0, 2)
    if e.ndim != 2 or e.shape[1] != 2:
        raise ValueError(f"edges must be (m, 2) vertex index pairs; got shape {e.shape}")
    if e.size and (e.dtype.kind not in "iu" or e.min() < 0 or e.max() >= n):
        raise ValueError(f"edges must be integer indices of the {n} vertices")
    r = _per_vertex(radius, n, "radius")
    t = _per_vertex(types, n, "types")
    if not np.isfinite(r).all():
        raise ValueError("radius must be finite")
    if not (np.isfinite(t).all() and (t == np.round(t)).all() and (np.abs(t) <= MAX_TYPE).all()):
        raise ValueError(f"types must be integers (SWC node types) of magnitude at most {MAX_TYPE}")
    return b"".join((
        np.array([n, len(e)], dtype="<u4").tobytes(),
        (v * NM_PER_UM).astype("<f4").tobytes(),
        e.astype("<u4").tobytes(),
        (r * NM_PER_UM).astype("<f4").tobytes(),
        t.astype("<f4").tobytes(),
    ))


def _per_vertex(values: np.ndarray, n: int, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"{what} must have one value per vertex, shape ({n},); got {a.shape}")
    return a


def measure(neuron: Neuron) -> Measures:
    """Node count, cable length and soma position. The soma is the mean of the soma-type nodes
    (one point, the three-point NeuroMorpho soma and a contour all give its centre); a tracing
    without soma nodes gets its first root, where SWC tracings start."""
    v = np.asarray(neuron.vertices, dtype=np.float64).reshape(-1, 3)
    e = np.asarray(neuron.edges, dtype=np.int64).reshape(-1, 2)
    types = np.asarray(neuron.types)
    cable = float(np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1).sum()) if len(e) else 0.0
    if (types == SOMA).any():
        soma = v[types == SOMA].mean(axis=0)
    elif len(v):
        roots = np.setdiff1d(np.arange(len(v)), e[:, 0])
        soma = v[roots[0] if len(roots) else 0]
    else:
        raise ValueError(f"{neuron.file}: a neuron without nodes has no soma")
    return Measures(len(v), cable, (float(soma[0]), float(soma[1]), float(soma[2])))


def segment_properties(listed: Sequence[tuple[int, str, str, Measures]]) -> dict:
    """The `neuroglancer_segment_properties` info listing every neuron, given as (segment id,
    identifier, file, measures), in increasing segment id (Neuroglancer sorts them so anyway): its
    identifier as the label, its file as the description, and numbers a neuroanatomist filters by.
    Number ids fit Neuroglancer's query syntax (`[a-zA-Z][a-zA-Z0-9_]*`, property_map.ts), so
    `cable_um>2000` works in the segment list."""
    ordered = sorted(listed, key=lambda row: row[0])
    ids = [row[0] for row in ordered]
    for segid in ids:
        if not isinstance(segid, int | np.integer) or not 1 <= segid < 2**64:
            raise ValueError(f"segment id {segid!r} must be an integer in [1, 2**64)")
    if len(set(ids)) != len(ids):
        raise ValueError("segment ids must be distinct")
    measures = [row[3] for row in ordered]

    def number(pid: str, data_type: str, description: str, values: list) -> dict:
        return {"id": pid, "type": "number", "data_type": data_type, "description": description, "values": values}

    return {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(int(i)) for i in ids],
            "properties": [
                {"id": "label", "type": "label", "values": [row[1] for row in ordered]},
                {"id": "description", "type": "description", "values": [row[2] for row in ordered]},
                number("nodes", "uint32", "number of SWC nodes", [m.nodes for m in measures]),
                number("cable_um", "float32", "cable length (um)", [round(m.cable_length, 3) for m in measures]),
                *(number(f"soma_{axis}_um", "float32", f"soma {axis} (um)", [round(m.soma[i], 3) for m in measures])
                  for i, axis in enumerate("xyz")),
            ],
        },
    }
