"""The files of a skeleton source as the server serves them, each a Resource (resource.py):

    /ds/ID/info                                a segmentation volume's info with no voxels, naming
                                               the skeletons (cloud-volume opens a source from it)
    /ds/ID/skeletons/info                      neuroglancer_skeletons
    /ds/ID/skeletons/segment_properties/info   every served neuron, named
    /ds/ID/skeletons/SEGID                     one neuron, encoded from its SWC file when asked for

Keys carry the file versions, the image frame and the source's revision, so an ETag changes with
anything its bytes derive from.
"""

from __future__ import annotations

from ..cache import Section
from ..tracings import Frame, Traced, Tracings
from . import skeletons
from .resource import BINARY, JSON, Resource, to_json

SKELETONS = "skeletons"  # the skeletons' directory under the source's root
PROPERTIES = f"{skeletons.SEGMENT_PROPERTIES}/info"
NO_VOXELS = "no-voxels"  # the scale key of the volume info: no chunk is ever there
NM_PER_UM = skeletons.NM_PER_UM


class NoNeuron(LookupError):
    """A key names no neuron of the source."""


def volume_info(frame: Frame) -> dict:
    """A segmentation volume over the space image's level-0 grid that holds no voxels, only the
    skeletons and their properties: the layout igneous and cloud-volume give skeleton-only layers,
    so `CloudVolume(".../ds/ID").skeleton.get(segid)` and Neuroglancer both read it."""
    return {
        "@type": "neuroglancer_multiscale_volume",
        "type": "segmentation",
        "data_type": "uint64",
        "num_channels": 1,
        "scales": [{"key": NO_VOXELS, "size": list(frame.shape[::-1]),
                    "resolution": [v * NM_PER_UM for v in frame.voxel_size[::-1]],
                    "voxel_offset": [0, 0, 0], "chunk_sizes": [[64, 64, 64]], "encoding": "raw"}],
        "skeletons": SKELETONS,
        "segment_properties": f"{SKELETONS}/{skeletons.SEGMENT_PROPERTIES}",
    }


def served(tracings: Tracings) -> list[Traced]:
    """The neurons whose files read right."""
    return [t for t in tracings.neurons if t.error is None]


def properties(tracings: Tracings) -> dict:
    """segment_properties of the served neurons, from the measures taken when the source opened."""
    return skeletons.segment_properties([(t.segid, t.name, t.file, t.measures) for t in served(tracings)])


class SkeletonFiles:
    """The skeletons directory of one snapshot of a source (`revision`: the source's)."""

    def __init__(self, ident: str, tracings: Tracings, revision: str, cache: Section):
        self.ident, self.tracings, self.revision, self.cache = ident, tracings, revision, cache

    def volume_info(self) -> Resource:
        frame = self.tracings.frame
        return Resource((self.ident, "volume-info", frame, self.revision), lambda: to_json(volume_info(frame)), JSON,
                        self.cache, compressible=True)

    def resource(self, key: str) -> Resource:
        """The body of `key` (relative to the skeletons' directory). Raises NoNeuron for a key that
        is no file here, ValueError for one that cannot be, and LookupError with the reason for a
        neuron whose file does not read (the server says so, never 404)."""
        tracings = self.tracings
        if key == "info":
            return Resource((SKELETONS, "info", self.revision), lambda: to_json(skeletons.info()), JSON,
                            self.cache, compressible=True)
        if key == PROPERTIES:
            return Resource((self.ident, "segment_properties", tracings.version, tracings.frame, self.revision),
                            lambda: to_json(properties(tracings)), JSON, self.cache, compressible=True)
        if not key.isdigit() or key.startswith("0"):
            raise ValueError(f"A skeleton's key is its segment id, a whole number from 1; got {key!r}")
        traced = tracings.by_segid(int(key))
        if traced is None:
            raise NoNeuron(f"No neuron with segment id {key} in {self.ident!r}")
        if traced.error is not None:
            raise Unreadable(traced)

        def produce() -> bytes:
            nr = tracings.neuron(traced)
            return skeletons.encode(nr.vertices, nr.edges, nr.radius, nr.types)

        return Resource((self.ident, "skeleton", traced.segid, traced.version, tracings.frame, self.revision),
                        produce, BINARY, self.cache, compressible=True)


class Unreadable(Exception):
    """A neuron whose SWC file is malformed: its one sentence names the file and the line."""

    def __init__(self, traced: Traced):
        super().__init__(f"Neuron {traced.name} (segment {traced.segid}) is unavailable: {traced.error}")
        self.traced = traced
