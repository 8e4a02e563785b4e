"""A served dataset: a catalog entry and the pyramid over its source, reopened when its files change."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .cache import Cache
from .catalog import DatasetSpec
from .pyramid import Pyramid
from .pyramid.prepared import NOT_CONFIGURED, Derived, Preparation, PreparedLevels, default_levels, fingerprint
from .readers import SourceError, open_source
from .readers.base import version_token
from .tracings import Tracings, frame_of, open_tracings
from .workers import Workers
from .writers import precomputed_encodings

log = logging.getLogger("bil_transform")


def _code_revision() -> str:
    """A digest of this package's source: derived bytes may change with the code, and the disk
    tier and HTTP caches keep them across restarts under keys that must change with it."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


CODE_REVISION = _code_revision()


@dataclass(frozen=True)
class Snapshot:
    """One opened state of a dataset: the pyramid, or a skeleton source's tracings, or why there is
    neither; and the stamp of the directories it was listed from. Requests read one snapshot; a
    reopen builds the next one aside and swaps it in with one assignment, so a dataset never
    vanishes while it reopens."""

    pyramid: Pyramid | None
    error: str | None
    directories: tuple[str, ...] = ()  # their listings are part of the version: a new slice is seen
    listing: str | None = None  # version_token(directories), taken before the source was opened
    tracings: Tracings | None = None
    preparation: Preparation = NOT_CONFIGURED  # what the derived store holds for this source

    def unchanged(self) -> bool:
        """Whether the files and listings are still what this snapshot was opened from (both stamps
        were taken before the files were read, so a change while opening is never missed)."""
        if self.error is not None or self.listing is None:
            return False
        source = self.pyramid.volume if self.pyramid is not None else self.tracings
        try:
            return version_token(self.directories) == self.listing and version_token(source.files) == source.version
        except OSError:
            return False  # a file or directory is gone


class Dataset:
    """A catalog entry and its current snapshot. A source that fails to open is kept with its
    error so the server can say why, and every other dataset still works.

    The source's version (its files' names, sizes and mtimes) is in every cache key and ETag, and
    `check` reopens the source when its files or listings change, so a changed file is never served
    stale. Checks run on their own thread, never queued behind chunk work.
    """

    def __init__(self, spec: DatasetSpec, cache: Cache, recheck: float = 2.0, workers: Workers | None = None,
                 space: Dataset | None = None, derived: Derived | None = None):
        self.spec, self.cache, self.workers = spec, cache, workers
        self.derived = derived  # the store of prepared coarse levels, if any
        self.space = space  # a skeleton source's image, whose frame its tracings are placed in
        self.images: tuple[Dataset, ...] = ()  # a label dataset's images: those whose catalog `labels` list it
        # derived bytes are keyed by it too, so an edited catalog entry or an upgrade makes new ones
        self.revision = hashlib.blake2b(f"{spec!r}{CODE_REVISION}".encode(), digest_size=8).hexdigest()
        self.recheck = recheck  # seconds between checks of the source files
        self._checks = workers.checks if workers is not None else ThreadPoolExecutor(1)
        self._lock = threading.Lock()
        self._check: Future | None = None  # the check in flight
        self._reopening = False
        self._looked = time.monotonic()  # when the derived store was last looked at
        self.viewed = 0.0  # when a request last read its data (monotonic): `serve --prepare` takes it first
        self.snapshot = self._open()
        self._checked = time.monotonic()

    @property
    def pyramid(self) -> Pyramid | None:
        return self.snapshot.pyramid

    @property
    def error(self) -> str | None:
        return self.snapshot.error

    @property
    def tracings(self) -> Tracings | None:
        return self.snapshot.tracings

    def _open(self, before: Snapshot | None = None) -> Snapshot:
        """The next snapshot; `before`, the current one, whose unchanged tracings need no reading."""
        spec = self.spec
        directories = self._directories()
        try:
            listing = version_token(directories)
        except OSError:
            listing = None
        if spec.kind == "skeletons":
            return self._open_tracings(directories, listing, before.tracings if before is not None else None)
        try:
            reader = open_source(spec.path, self.cache.section("segments"), spec.selection, root=spec.confinement)
            overrides = {"kind": spec.kind}
            if spec.voxel_size:
                overrides.update(voxel_size=spec.voxel_size, voxel_size_known=True)
            if spec.origin == "zero":
                overrides.update(origin=(0.0, 0.0, 0.0), native_levels=tuple(
                    dataclasses.replace(lvl, translation=None) for lvl in reader.volume.native_levels))
            reader.volume = dataclasses.replace(reader.volume, **overrides)
            pyramid = self._pyramid(reader)
            encodings = precomputed_encodings(pyramid)
            if spec.encoding and spec.encoding not in encodings:
                raise ValueError(f"the precomputed encoding {spec.encoding!r} cannot hold this {reader.volume.dtype} "
                                 f"data with {reader.volume.shape[1]} channel(s); use one of {', '.join(encodings)}")
        except (SourceError, ValueError, OSError) as exc:
            return Snapshot(None, str(exc))
        except Exception as exc:  # never let one dataset stop the server from starting
            return Snapshot(None, f"{spec.path}: cannot be opened ({type(exc).__name__}: {exc})")
        return self._with_prepared(Snapshot(pyramid, None, directories, listing))

    def _pyramid(self, reader, prepared: PreparedLevels | None = None) -> Pyramid:
        spec = self.spec
        method = spec.downsample or ("mode" if spec.kind == "labels" else "mean")
        return Pyramid(reader, self.cache.section("blocks"), spec.id, method=method, chunk=spec.chunk,
                       workers=self.workers, revision=self.revision, reduced=self.cache.section("reduced"),
                       prepared=prepared)

    def _with_prepared(self, snap: Snapshot) -> Snapshot:
        """`snap` with what the derived store holds for it: its complete prepared levels read from
        there. A store that cannot be reached is logged, and the levels are computed as without one."""
        if self.derived is None or snap.pyramid is None:
            return snap
        self._looked = time.monotonic()
        pyramid = snap.pyramid
        try:
            found = self.derived.preparation(self.spec.id, fingerprint(pyramid, self.spec.selection))
        except SourceError as exc:
            log.warning("%s: prepared levels not used: %s", self.spec.id, exc)
            return snap
        if found.state == "stale" and snap.preparation.state != "stale":
            log.warning("%s: the prepared levels in %s were made from files that have changed since; computing "
                        "its coarse levels on the fly until it is prepared again", self.spec.id, self.derived.url)
        if found.state != "complete" and not default_levels(pyramid):
            found = Preparation("complete")  # small enough: no level needs preparing
        if found.url is not None:
            pyramid = self._pyramid(pyramid.reader, PreparedLevels(found, pyramid.volume.dtype))
        return dataclasses.replace(snap, pyramid=pyramid, preparation=found)

    LOOK_EVERY = 10.0  # seconds between looks at the derived store for a dataset in use that is not prepared

    def look_for_prepared(self) -> None:
        """Look again at the derived store, at most every LOOK_EVERY seconds and off the caller's
        thread: levels prepared since (by `prepare` or `serve --prepare`) are read from then on."""
        with self._lock:
            if (self.derived is None or self.snapshot.preparation.state == "complete"
                    or time.monotonic() - self._looked < self.LOOK_EVERY):
                return
            self._looked = time.monotonic()
        self._checks.submit(self.reattach)

    def reattach(self) -> None:
        """Swap in the current snapshot with the derived store's current state (a reopen in flight
        wins: it looks itself)."""
        with self._lock:
            if self._reopening:
                return
            old = self.snapshot
        new = self._with_prepared(old)
        with self._lock:
            if self.snapshot is old:
                self.snapshot = new

    def _open_tracings(self, directories: tuple[str, ...], listing: str | None, before: Tracings | None) -> Snapshot:
        """A skeleton source's snapshot: placed in the frame of its space image's current snapshot."""
        image = self.space.snapshot if self.space is not None else None
        if image is None or image.pyramid is None:
            why = f": {self.space.public(image.error or '')}" if image is not None else ""
            return Snapshot(None, f"its space image {self.spec.space!r} is unavailable{why}")
        try:
            tracings = open_tracings(self.spec, frame_of(image.pyramid.volume), before)
        except (SourceError, OSError) as exc:
            return Snapshot(None, str(exc))
        except Exception as exc:  # never let one source stop the server from starting
            return Snapshot(None, f"{self.spec.path}: cannot be opened ({type(exc).__name__}: {exc})")
        return Snapshot(None, None, directories, listing, tracings)

    def _current(self, snap: Snapshot) -> bool:
        """Whether a snapshot still describes the files (and a skeleton source's, its image's frame)."""
        if not snap.unchanged():
            return False
        if snap.tracings is None:
            return True
        image = self.space.pyramid if self.space is not None else None
        return image is not None and frame_of(image.volume) == snap.tracings.frame

    def _directories(self) -> tuple[str, ...]:
        """The directories whose listings the source depends on: a directory source's root and its
        subdirectories (channel directories of a stack, levels of a Zarr group), a glob's directory;
        none for one file, whose own stat says everything."""
        path = Path(self.spec.path)
        if path.is_file():
            return ()
        root = self.root
        try:
            with os.scandir(root) as entries:
                return (str(root), *sorted(e.path for e in entries if path.is_dir() and e.is_dir()))
        except OSError:
            return (str(root),)

    def check(self) -> Future | None:
        """Start a check of the files when one is due. Returns what the caller waits for: the check
        it started, a reopen already in flight (its old snapshot may not match the files), or
        None, when the current snapshot may be served as it is."""
        with self._lock:
            if self._check is not None:
                return self._check if self._reopening else None
            if time.monotonic() - self._checked < self.recheck:
                return None
            self._checked = time.monotonic()
            self._check = self._checks.submit(self._refresh)
            return self._check

    def _refresh(self) -> None:
        """Reopen the source if its files or listings changed, or it failed to open before. A failed
        reopen keeps the old snapshot only while its files are unchanged (the failure passed);
        otherwise the dataset answers that it is unavailable until a reopen succeeds."""
        try:
            old = self.snapshot
            if self._current(old):
                return
            with self._lock:
                self._reopening = True
            new = self._open(old)
            if new.error is not None and self._current(old):
                log.warning("%s: reopening failed, serving the unchanged files as before: %s", self.spec.id,
                            new.error)
                return
            if new.error is not None and new.error != old.error:
                log.warning("%s: unavailable: %s", self.spec.id, new.error)
            self.snapshot = new
        finally:
            with self._lock:
                self._reopening, self._check = False, None

    @property
    def root(self) -> Path:
        return self.spec.root

    def public(self, text: str) -> str:
        """`text` (a message) with this dataset's files named relative to its own root, as anonymous
        clients see them; only the operator's log and `bil-transform info` show full paths."""
        root = self.root
        return text.replace(f"{root}{os.sep}", "").replace(str(root), root.name)
