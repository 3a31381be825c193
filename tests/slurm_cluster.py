"""A real single-node Slurm cluster for the tests, driven by slurm/local_cluster.sh.

Installs slurm-wlm, munge, slurmdbd and MariaDB when missing (apt-get, as root), starts munged,
mariadbd, slurmdbd, slurmctld and slurmd with every file under a state folder and free ports, and
stops exactly the processes it started, by the PIDs it recorded.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local_cluster.sh"
BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "squeue", "munged", "mariadbd", "mariadb-install-db")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
UNFINISHED = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def cannot_run_reason() -> str | None:
    """Why a cluster cannot be installed or started here (None when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting Slurm daemons needs root"
    if missing_binaries() and shutil.which("apt-get") is None:
        return f"missing {', '.join(missing_binaries())} and no apt-get to install them"
    return None


def install_if_missing(timeout: float = 900) -> None:
    if missing_binaries():
        subprocess.run([str(SCRIPT), "install"], check=True, timeout=timeout)


def _port_base() -> int:
    """Four consecutive free TCP ports on 127.0.0.1."""
    for _ in range(50):
        base = random.randrange(20000, 60000, 4)
        try:
            sockets = []
            for port in range(base, base + 4):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no four consecutive free ports found")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LocalCluster:
    state: Path
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 60) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self) -> dict[str, tuple[str, str]]:
        """{job id (array tasks as <id>_<index>): (state, exit code)} from accounting (sacct)."""
        out = self.run("sacct", "-X", "-n", "-P", "-S", "2000-01-01", "-o", "JobID,State,ExitCode")
        jobs = {}
        for line in out.splitlines():
            job_id, state, exit_code = line.split("|")
            jobs[job_id] = (state.split()[0], exit_code)
        return jobs

    def wait_until_drained(self, timeout: float) -> None:
        """Until no job is pending or running, in the queue and in accounting (slurmdbd records a job's end
        a moment after it leaves the queue), bounded: raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued after {timeout}s:\n{self.run('squeue')}")
            time.sleep(1)
        while unfinished := {j: s for j, (s, _) in self.jobs().items() if s in UNFINISHED}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"accounting still shows {unfinished} after {timeout}s")
            time.sleep(0.5)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job still queued or running: a test that fails mid-sweep must not leave its jobs'
        processes behind once the daemons are gone."""
        try:
            ids = self.run("squeue", "-h", "-o", "%A").split()
            if ids:
                self.run("scancel", *ids)
                self.wait_until_drained(timeout)
        except (RuntimeError, TimeoutError, subprocess.SubprocessError):
            pass

    def stop(self) -> None:
        self.cancel_all()
        subprocess.run([str(SCRIPT), "stop", str(self.state)], env=self.env, timeout=120, check=False)
        for name, pid in self.pids.items():  # belt and braces: only our recorded PIDs
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, 9)
                raise RuntimeError(f"{name} (pid {pid}) outlived stop; killed")


def start(nice: int = 19, timeout: float = 180) -> LocalCluster:
    """Start a cluster in a new state folder (0755 under /tmp: user munge must reach its socket)."""
    state = Path(tempfile.mkdtemp(prefix="arm-slurm-", dir="/tmp"))
    state.chmod(0o755)
    env = {**os.environ, "ARM_SLURM_PORT_BASE": str(_port_base()), "SLURMD_NICE": str(nice),
           "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    cluster = LocalCluster(state=state, env=env)
    proc = subprocess.run([str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((state / "log").glob("*.log")))
        shutil.rmtree(state, ignore_errors=True)
        raise RuntimeError(f"local Slurm cluster did not start:\n{proc.stderr}\n{logs}")
    for name in DAEMONS:
        cluster.pids[name] = int((state / "run" / f"{name}.pid").read_text().strip())
    return cluster
