"""`bil-transform export`: a dataset's pyramid written as files on a dask.distributed cluster.

(Being written: see issue 15, point 4.)"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="ID|PATH")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
