"""The cold path's shortcuts change nothing a client sees: slab reads and fan-out give the same
blocks as block-by-block reads and as the independent numpy pyramid; a shard streamed in ranges
is the shard; and memory stays bounded by --cache-size however many clients read one shard."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests
import tifffile
from conftest import Server
from reference import reference_levels

import bil_transform.pyramid
from bil_transform.cache import Cache
from bil_transform.catalog import load_catalog
from bil_transform.dataset import Dataset
from bil_transform.workers import Workers


def _level_hashes(ds: Dataset) -> list[str]:
    """One hash per level over every block of every time point and channel, in grid order."""
    pyramid, (n_t, n_c) = ds.pyramid, ds.pyramid.volume.shape[:2]
    hashes = []
    for level, lvl in enumerate(pyramid.levels):
        h = hashlib.blake2b()
        for t, c, index in itertools.product(range(n_t), range(n_c), np.ndindex(*lvl.grid)):
            h.update(np.ascontiguousarray(pyramid.block(level, t, c, index)).tobytes())
        hashes.append(h.hexdigest())
    return hashes


def test_slab_reads_and_fan_out_give_the_blocks_of_single_block_reads(sources, monkeypatch):
    found, catalog = sources
    workers = Workers(2)
    specs = load_catalog(catalog)
    # odd chunks: windows straddle parent blocks, which then are assembled before reducing
    specs.append(dataclasses.replace(next(s for s in specs if s.id == "slices16"), chunk=(5, 7, 9)))
    for spec in specs:
        slabs = Dataset(spec, Cache(2**30), workers=workers)
        with monkeypatch.context() as m:
            m.setattr(bil_transform.pyramid, "SLAB_BYTES", 0)  # every slab is one block
            alone = Dataset(spec, Cache(2**30))
            assert all(len(r) == 1 for r in alone.pyramid.slab(0, (0, 0, 0)))
            expected = _level_hashes(alone)
        assert _level_hashes(slabs) == expected, spec.id
        # and both are the independent numpy pyramid, level by level
        src = found[spec.id]
        factors = [tuple(round(f) for f in lvl.factors) for lvl in slabs.pyramid.levels]
        for level, want in enumerate(reference_levels(src.data, factors, src.method, src.native)):
            got = slabs.pyramid.dask_array(level).compute()
            if np.issubdtype(want.dtype, np.floating):
                np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{spec.id} level {level}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{spec.id} level {level}")
    workers.shutdown()


def _spec(path: Path, chunk: tuple[int, int, int]):
    catalog = path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "d"\npath = "{path}"\nchunk = {list(chunk)}\n')
    return load_catalog(catalog)[0]


def test_a_slab_covers_whole_source_rows_and_stays_bounded(tmp_path):
    """A stack of uncompressed slices is read in full-width row bands, 64 slices deep."""
    for z in range(4):
        tifffile.imwrite(tmp_path / f"s{z:02d}.tif", np.zeros((300, 1000), np.uint16))
    ds = Dataset(_spec(tmp_path, chunk=(4, 64, 64)), Cache(2**28))
    assert ds.pyramid.volume.block_shape == (1, 1, 1000)  # any row can be read alone, at full width
    assert ds.pyramid.slab(0, (0, 2, 5)) == (range(0, 1), range(2, 3), range(0, 16))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bil_transform.pyramid, "SLAB_BYTES", 4 * 64 * 64 * 2 * 4)  # four blocks at most
        ds = Dataset(_spec(tmp_path, chunk=(4, 64, 64)), Cache(2**28))  # slab sizes are planned at open
        assert ds.pyramid.slab(0, (0, 2, 5)) == (range(0, 1), range(2, 3), range(4, 8))


@pytest.mark.parametrize("url", ["/ds/grid/zarr3-sharded/0/c/0/1/0/0/0", "/ds/grid/c/1/precomputed-sharded/0/0.shard",
                                 "/ds/grid/zarr3-sharded-none/0/c/0/0/0/1/1"])
def test_a_shard_read_in_ranges_is_the_whole_shard(server, url):
    whole = requests.get(server.url(url))
    assert whole.status_code == 200 and whole.headers["Content-Length"] == str(len(whole.content))
    pieces, step = [], 777  # ranges that cut chunks and the index anywhere
    for start in range(0, len(whole.content), step):
        part = requests.get(server.url(url), headers={"Range": f"bytes={start}-{start + step - 1}"})
        assert part.status_code == 206
        pieces.append(part.content)
    assert b"".join(pieces) == whole.content
    suffix = requests.get(server.url(url), headers={"Range": "bytes=-5000"})
    assert suffix.content == whole.content[-5000:]


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


async def _slow_readers(url: str, clients: int) -> set[str]:
    """Many clients reading one body at once, each slowly, so all of them are in flight together."""
    async def one(session: aiohttp.ClientSession) -> str:
        h = hashlib.blake2b()
        async with session.get(url) as response:
            assert response.status == 200
            async for piece in response.content.iter_chunked(1 << 20):
                h.update(piece)
                await asyncio.sleep(0.01)
        return h.hexdigest()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        return set(await asyncio.gather(*(one(session) for _ in range(clients))))


def test_memory_stays_bounded_while_200_clients_read_one_big_shard(tmp_path):
    stack = tmp_path / "big"
    stack.mkdir()
    rng = np.random.default_rng(11)
    for z in range(128):
        tifffile.imwrite(stack / f"z{z:03d}.tif", rng.integers(0, 60000, (512, 512), np.uint16))
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "big"\npath = "{stack}"\n')
    cache = 64 * 2**20
    srv = Server(catalog, ["--cache-size", "64MiB"])
    try:
        url = srv.url("/ds/big/zarr3-sharded-none/0/c/0/0/0/0/0")  # 2 x 4 x 4 chunks of 64^3 uint16: 16 MiB
        body = requests.get(url).content  # warm: its chunks are cached now
        assert len(body) > 16 * 2**20
        time.sleep(0.5)
        before = _status(srv.proc.pid)["VmRSS"]
        digests = asyncio.run(_slow_readers(url, 200))
        peak = _status(srv.proc.pid)["VmHWM"]
        assert digests == {hashlib.blake2b(body).hexdigest()}  # every client got the whole shard
        # 200 copies of the shard would be 3.2 GiB; streamed, the server holds the cache and some buffers
        assert peak - before < cache + 300 * 2**20, f"peak RSS grew by {(peak - before) / 2**20:.0f} MiB"
        assert srv.alive()
    finally:
        srv.stop()
