"""The HPC path of issue 23: the command line computes on dask-jobqueue's SLURMCluster, whose workers are jobs of
a real one-node Slurm (Debian's slurm-wlm and munge, started by tests/slurm.py as root, as in CI) on loopback.

No cluster code of ours: the test starts the cluster as an archive operator would (README, "On a Slurm cluster")
and hands the command its scheduler's address. What the command wrote is checked against the test's own numpy
of the TIFF slices it wrote with tifffile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from dask_jobqueue import SLURMCluster
from distributed import Client, get_task_stream
from reference import reference_levels
from slurm import Slurm

JOBS = 2


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node Slurm; SLURM_CONF points this process's sbatch, squeue and scancel at it."""
    with Slurm(tmp_path_factory.mktemp("slurm")) as s, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", s.env["SLURM_CONF"])
        yield s


@pytest.fixture(scope="module")
def cluster(slurm, tmp_path_factory):
    """A SLURMCluster of JOBS one-core jobs, its scheduler and workers on loopback; yields (cluster, client)."""
    logs = tmp_path_factory.mktemp("slurm-jobs")
    prologue = [f"export PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    with SLURMCluster(cores=1, processes=1, memory="2GiB", walltime="00:10:00", queue=slurm.partition,
                      scheduler_options={"host": "127.0.0.1", "dashboard_address": None}, interface="lo",
                      python=sys.executable, job_script_prologue=prologue, log_directory=str(logs),
                      local_directory=str(logs), job_extra_directives=[f"--chdir={logs}"]) as c:
        c.scale(jobs=JOBS)
        with Client(c) as client:
            client.wait_for_workers(JOBS, timeout=120)
            yield c, client


def on_cluster(scheduler: str, source: Path, out: Path) -> zarr.Group:
    """`prepare`, run as an operator would, on the cluster at `scheduler`: the OME-Zarr group of the
    prepared levels it wrote (DERIVED/ID/KEY/)."""
    done = subprocess.run([sys.executable, "-m", "bil_transform", "prepare", str(source), "--derived", str(out),
                           "--levels", "1:", "--scheduler", scheduler, "--task-size", "32KiB"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prepared levels 1, 2" in done.stderr, done.stderr
    (store,) = (out / source.name).iterdir()
    return zarr.open_group(str(store), mode="r")


def test_the_command_line_computes_on_slurm_jobs(slurm, cluster, tmp_path):
    c, client = cluster
    # The workers are Slurm jobs of this cluster, running now, one worker each, every one on loopback.
    jobs = client.run(os.getenv, "SLURM_JOB_ID")  # os.getenv: os.environ.get would pickle our environ
    assert sorted(jobs.values()) == sorted(job.job_id for job in c.workers.values()), jobs
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in jobs), jobs
    running = slurm.run("squeue", "-h", "-t", "RUNNING", "-o", "%i %j %N").split("\n")
    assert sorted(line.split()[0] for line in running if line) == sorted(jobs.values()), running
    assert all(line.split()[2] == slurm.host for line in running if line), running

    # uint16 slices of odd sizes (edge windows at every level) and no resolution tags: 1 um voxels.
    rng = np.random.default_rng(23)
    data = rng.integers(0, 60000, (33, 150, 131), dtype=np.uint16)
    stack = tmp_path / "stack"
    stack.mkdir()
    for z, plane in enumerate(data):
        tifffile.imwrite(stack / f"z{z:03d}.tif", plane)

    with get_task_stream(client) as stream:
        group = on_cluster(c.scheduler_address, stack, tmp_path / "out")
    # Both jobs computed (dask.distributed's record of where each task ran).
    assert {t["worker"] for t in stream.data} == set(jobs), {t["worker"] for t in stream.data}

    # Every level written equals the test's own reduction of the slices (2x mean per level, round half up).
    datasets = group.attrs.get("ome", group.attrs)["multiscales"][0]["datasets"]  # OME-Zarr 0.4 or 0.5 (v3)
    factors = [round(next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")[-1])
               for d in datasets]
    expected = reference_levels(data, [(2**n,) * 3 for n in range(max(factors).bit_length())], "mean")
    assert len(datasets) >= 2 and factors[0] == 2, json.dumps(datasets)  # levels 1 and up, prepared
    for d, f in zip(datasets, factors):
        want = expected[f.bit_length() - 1]
        got = group[d["path"]][...]
        assert got.dtype == want.dtype and np.array_equal(got.reshape(want.shape), want), (d["path"], f)
