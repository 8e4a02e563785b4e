"""What virtual shards cost: reading one chunk out of a cold shard, and reading a whole level sharded.

Why: shards are assembled on request from the same cached chunks as the unsharded views. A
client reading one chunk should not pay for the whole shard where the layout lets the server
know every chunk's length in advance (uncompressed zarr, raw precomputed); where it cannot
(compressed zarr), the index needs every chunk encoded.

(a) Cold, fresh server each time (best of --repeat): a client's read of the first chunk of
    level-0 shard 0, done the way zarr-python and Neuroglancer do it (zarr: the index by a
    suffix range, then the chunk's range; precomputed: shard index, minishard index, then
    the chunk's range), against fetching that whole shard. Also prints how many values the
    server computed for each (cache misses in /metrics: encoded chunks, pyramid blocks, and a
    compressed shard's chunk lengths), and checks the chunk's voxels.
(b) Warm: zarr-python reads all of level 0 through /zarr (baseline), /zarr3 and
    /zarr3-sharded, after one untimed pass fills the cache (best of --repeat).

Run: python benchmarks/sharded_reads.py [--shape Z Y X] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import requests
import zarr
from serve_throughput import DATASET, make_slices, start_server

SHARD_VIEWS = ("zarr3-sharded-none", "precomputed-sharded", "zarr3-sharded")


def misses(base: str) -> int:
    text = requests.get(f"{base}/metrics").text
    return int(sum(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("bil_transform_cache_misses_total{")))


def get(url: str, first: int | None = None, last: int | None = None, suffix: int | None = None) -> bytes:
    headers = {}
    if suffix is not None:
        headers["Range"] = f"bytes=-{suffix}"
    elif first is not None:
        headers["Range"] = f"bytes={first}-{last}"
    r = requests.get(url, headers=headers)
    r.raise_for_status()
    return r.content


def first_chunk(base: str, view: str) -> np.ndarray:
    """Read chunk (0, 0, 0) of level 0 out of its shard, as a client does, and decode it."""
    root = f"{base}/ds/{DATASET}/{view}"
    if view.startswith("zarr3"):
        meta = requests.get(f"{root}/0/zarr.json").json()
        conf = meta["codecs"][0]["configuration"]
        inner = conf["chunk_shape"][2:]
        n = np.prod(np.array(meta["chunk_grid"]["configuration"]["chunk_shape"]) // conf["chunk_shape"])
        index = np.frombuffer(get(f"{root}/0/c/0/0/0/0/0", suffix=16 * n + 4)[:-4], "<u8").reshape(-1, 2)
        offset, length = (int(v) for v in index[0])
        data = get(f"{root}/0/c/0/0/0/0/0", offset, offset + length - 1)
        if len(conf["codecs"]) > 1:
            data = numcodecs.Blosc().decode(data)
        return np.frombuffer(data, "<u2").reshape(inner)
    scale = requests.get(f"{root}/info").json()["scales"][0]
    shard = f"{root}/0/{'0' * max(1, -(-scale['sharding']['shard_bits'] // 4))}.shard"
    index_end = 16 * 2 ** scale["sharding"]["minishard_bits"]
    start, end = np.frombuffer(get(shard, 0, 15), "<u8")
    table = np.frombuffer(get(shard, index_end + int(start), index_end + int(end) - 1), "<u8").reshape(3, -1)
    assert table[0, 0] == 0, "chunk id 0 comes first in minishard 0"
    offset, length = index_end + int(table[1, 0]), int(table[2, 0])
    x, y, z = scale["chunk_sizes"][0]
    return np.frombuffer(get(shard, offset, offset + length - 1), "<u2").reshape(z, y, x)


def cold(stack: contextlib.ExitStack, data: Path, log: Path, view: str, whole: bool, volume: np.ndarray,
         repeat: int) -> tuple[float, int]:
    best, computed = float("inf"), 0
    for _ in range(repeat):
        with contextlib.ExitStack() as run:
            _, base = start_server(run, data, None, log)
            root = f"{base}/ds/{DATASET}/{view}"
            shard = f"{root}/0/c/0/0/0/0/0" if view.startswith("zarr3") else f"{root}/0/0.shard"
            requests.get(f"{root}/{'0/zarr.json' if view.startswith('zarr3') else 'info'}").raise_for_status()
            before = misses(base)
            t0 = time.perf_counter()
            if whole:
                get(shard)
            else:
                chunk = first_chunk(base, view)
            best = min(best, time.perf_counter() - t0)
            computed = misses(base) - before
            if not whole:
                assert np.array_equal(chunk, volume[tuple(slice(0, n) for n in chunk.shape)]), view
    return best, computed


def read_level(base: str, view: str) -> np.ndarray:
    return zarr.open_group(f"{base}/ds/{DATASET}/{view}", mode="r")["0"][:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        data = Path(tmp) / DATASET
        data.mkdir()
        volume = make_slices(data, tuple(args.shape))
        log = Path(tmp) / "server.log"
        print(f"{DATASET}: {args.shape[0]} x {args.shape[1]} x {args.shape[2]} uint16 TIFF slices, 64^3 chunks, "
              f"shards of 4 x 4 x 4 chunks\n")

        print("(a) cold, first chunk of level-0 shard 0 vs the whole shard")
        print(f"{'view':<22}{'one chunk':>11}{'computed':>10}{'whole shard':>13}{'computed':>10}{'ratio':>8}")
        for view in SHARD_VIEWS:
            one, one_n = cold(stack, data, log, view, False, volume, args.repeat)
            full, full_n = cold(stack, data, log, view, True, volume, args.repeat)
            print(f"{view:<22}{one:>10.3f}s{one_n:>10}{full:>12.3f}s{full_n:>10}{one / full:>8.3f}")

        print("\n(b) warm, zarr-python reads all of level 0")
        _, base = start_server(stack, data, None, log)
        times = {}
        for view in ("zarr", "zarr3", "zarr3-sharded"):
            assert np.array_equal(read_level(base, view)[0, 0], volume), view  # also fills the cache
            runs = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                read_level(base, view)
                runs.append(time.perf_counter() - t0)
            times[view] = min(runs)
            print(f"{view:<22}{times[view]:>10.3f}s  ratio to /zarr {times[view] / times['zarr']:.3f}")


if __name__ == "__main__":
    main()
