"""A real one-node Slurm (Debian's slurm-wlm and munge) started by a test, as root, touching nothing system-wide.

munged, slurmctld and slurmd run in the foreground as child processes with every file (key, socket, state,
spool, logs, pids) under one directory and the controller and node ports chosen free at run time, bound to
loopback. Slurm's commands find this cluster through SLURM_CONF (slurm.conf names munge's socket in AuthInfo),
so `Slurm.env` is what sbatch, squeue and scancel (dask-jobqueue's) need. When a daemon cannot start, SlurmError
says which and quotes its log: a clean CI machine without the packages or root fails, never skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = "apt-get install slurm-wlm munge"


class SlurmError(RuntimeError):
    """The one-node Slurm could not be started; the message says what to fix."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _node() -> str:
    """This host's node line as slurmd itself detects it (CPUs, sockets, RealMemory), so the node is never INVAL."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    return next(x for x in out.splitlines() if x.startswith("NodeName="))


class Slurm:
    """A one-node Slurm cluster under `root`: `with Slurm(root) as slurm:` starts it and waits until its node is
    idle; leaving cancels every job and stops the daemons."""

    def __init__(self, root: Path, partition: str = "debug"):
        self.root = Path(root)
        self.partition = partition
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def __enter__(self) -> Slurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        missing = [c for c in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo") if not shutil.which(c)]
        if missing:
            raise SlurmError(f"{', '.join(missing)} not found on PATH: {PACKAGES} (CI runs .ci/run as root)")
        if os.geteuid() != 0:
            raise SlurmError("the one-node Slurm runs its daemons as root (SlurmUser=root): run the tests as root")
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged wants its socket's directory reachable by all (root's jobs and commands use it).
        (r / "munge").chmod(0o755)
        sock = r / "munge" / "munge.socket"
        if len(str(sock)) > 100:
            raise SlurmError(f"{sock}: too long for a unix socket; give pytest a shorter --basetemp")
        key = r / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
        # --force: pytest's temporary directories are 0700, which munged's permission walk warns about.
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={r / 'munged.pid'}", f"--seed-file={r / 'munged.seed'}"])
        self._wait(sock.exists, "munged", timeout)

        host = socket.gethostname().split(".")[0]
        node = _node().split()
        node[0] = f"NodeName={host}"
        self.conf.write_text("\n".join([
            "ClusterName=biltest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            " ".join([*node, "NodeAddr=127.0.0.1", f"NodeHostname={host}", "State=UNKNOWN"]),
            f"PartitionName={self.partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self.host = host
        # -i: ignore state a previous run left (there is none: the state directory is new).
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", host, "-f", str(self.conf)])
        self._wait(self._idle, "the node", timeout)

    def _spawn(self, name: str, argv: list[str]) -> None:
        """A daemon in the foreground; its own log file (if it keeps one) and its stderr are under log/."""
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _logs(self, names) -> str:
        log = self.root / "log"
        return "\n".join(f"--- {f}\n{_tail(f)}" for n in names for f in (log / f"{n}.log", log / f"{n}.stdout")
                         if f.exists())

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for n, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{n} exited with code {p.returncode} while starting:\n{self._logs([n])}")
            if time.monotonic() > deadline:
                raise SlurmError(f"{what} not ready after {timeout:.0f} s (sinfo: {self._sinfo()!r}):\n"
                                 f"{self._logs(self.procs)}")
            time.sleep(0.2)

    def _sinfo(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                             timeout=30)
        return (out.stdout + out.stderr).strip()

    def _idle(self) -> bool:
        return self._sinfo() == f"{self.host} idle"

    def run(self, *argv: str) -> str:
        """A Slurm command (squeue, scontrol, ...) against this cluster: its stdout."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=True, timeout=30).stdout

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--partition", self.partition], env=self.env,
                           capture_output=True, timeout=30)
            # Let slurmd see its jobs end (slurmstepd outlives a stopped slurmd by design).
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i").strip():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
