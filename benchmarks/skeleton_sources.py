"""What a skeleton source costs to open and to reopen, against reading every file (the first open).

A source is N SWC files of M nodes (random walks with branches, written here). Each round, in
turn: a first open (every file read, checked and measured), a reopen with no file changed, and a
reopen after one file was rewritten (a reopen reads only the files whose size or mtime changed).
Rounds interleave the three; medians are printed with their ratio to the first open.

    python benchmarks/skeleton_sources.py --files 500 --nodes 3000 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bil_transform.catalog import DatasetSpec
from bil_transform.tracings import Frame, open_tracings

FRAME = Frame((2.0, 0.5, 0.5), (0.0, 0.0, 0.0), (1000, 20000, 20000))


def write_neuron(path: Path, nodes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    xyz = np.cumsum(rng.normal(0, 2, (nodes, 3)), axis=0) + 5000
    parents = np.arange(nodes)  # each node's parent is the one before it, or a random earlier one
    branch = rng.random(nodes) < 0.05
    parents[branch] = (rng.random(branch.sum()) * np.arange(nodes)[branch]).astype(int)
    rows = [f"{i + 1} {3 if i else 1} {x:.3f} {y:.3f} {z:.3f} 1.000 {parents[i] if i else -1}"
            for i, (x, y, z) in enumerate(xyz)]
    path.write_text("# SOMA_REGION: VISp\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.files):
            write_neuron(root / f"n{i:05}.swc", args.nodes, i)
        spec = DatasetSpec(id="bench", path=str(root), kind="skeletons", space="image")
        times: dict[str, list[float]] = {name: [] for name in (
            "first open", "reopen, nothing changed", "reopen, one file changed")}
        for r in range(args.repeat):
            t = time.perf_counter()
            opened = open_tracings(spec, FRAME)
            times["first open"].append(time.perf_counter() - t)
            t = time.perf_counter()
            same = open_tracings(spec, FRAME, opened)
            times["reopen, nothing changed"].append(time.perf_counter() - t)
            assert same.neurons == opened.neurons
            write_neuron(root / "n00000.swc", args.nodes, 10_000 + r)
            t = time.perf_counter()
            open_tracings(spec, FRAME, same)
            times["reopen, one file changed"].append(time.perf_counter() - t)
        first = statistics.median(times["first open"])
        print(f"{args.files} files of {args.nodes} nodes; medians of {args.repeat} interleaved rounds")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:26s} {median:8.3f} s  {median / first:6.3f}x  ({median / args.files * 1e3:.2f} ms a file)")


if __name__ == "__main__":
    main()
