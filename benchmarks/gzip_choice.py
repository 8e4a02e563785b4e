"""Which deflate the server uses for Content-Encoding: gzip on raw precomputed chunks.

Why: a raw chunk is gzipped on the request path the first time it is asked for, so the
compressor's speed is part of every cold precomputed request. Candidates, all in well-kept
libraries: ISA-L (python-isal), zlib-ng (imagecodecs), zlib (the standard library), at the
levels worth considering, on 64^3 uint16 level-0 chunks of the demo; interleaved rounds,
medians. Also the client's side: inflating what each produced, with the standard zlib.

Run: python benchmarks/gzip_choice.py [--rounds N]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
import zlib

import imagecodecs
import numpy as np
import tifffile
from isal import igzip

from bil_transform.demo import make_demo

CANDIDATES = {
    "isal level 0": lambda b: igzip.compress(b, 0, mtime=0),
    "isal level 1 (chosen)": lambda b: igzip.compress(b, 1, mtime=0),
    "zlib-ng level 1": lambda b: imagecodecs.gzip_encode(b, level=1),
    "zlib level 1": lambda b: gzip.compress(b, 1, mtime=0),
    "zlib level 5 (before)": lambda b: gzip.compress(b, 5, mtime=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    files = sorted(make_demo().glob("slice_*.tif"))
    volume = np.stack([tifffile.imread(f) for f in files[96:160]])
    chunks = [volume[:, y:y + 64, x:x + 64].tobytes() for y in range(0, 1024, 192) for x in range(0, 1024, 256)]
    raw = sum(map(len, chunks))
    print(f"{len(chunks)} chunks of 64^3 uint16; loadavg {os.getloadavg()}")
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    inflate: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    sizes = {}
    order = list(CANDIDATES)
    for r in range(args.rounds):
        for name in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            bodies = [CANDIDATES[name](c) for c in chunks]
            times[name].append((time.perf_counter() - t0) / len(chunks))
            t0 = time.perf_counter()
            assert all(zlib.decompress(b, 31) == c for b, c in zip(bodies, chunks))
            inflate[name].append((time.perf_counter() - t0) / len(chunks))
            sizes[name] = sum(map(len, bodies))
    print(f"{'deflate':24s} {'ms/chunk':>9s} {'ratio':>6s} {'client inflate ms':>18s}")
    for name in CANDIDATES:
        print(f"{name:24s} {statistics.median(times[name]) * 1e3:9.2f} {sizes[name] / raw:6.3f} "
              f"{statistics.median(inflate[name]) * 1e3:18.2f}")
    print(f"loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
