"""A one-node SLURM cluster in a temporary folder: munged, slurmctld and slurmd started by the tests, as root,
with every state, spool, log and socket file inside the folder. Debian's packages (munge slurmctld slurmd
slurm-client) bring the programs; `.ci/run` installs them. Processes are tracked by proctrack/linuxproc (the
process tree), so no cgroup hierarchy is needed."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from .harness import free_port, wait_for

PACKAGES = "munge slurmctld slurmd slurm-client"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
SBIN = "/usr/sbin:/sbin"


def which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN}")


def unavailable() -> str | None:
    """Why a cluster cannot start here (one line), or None."""
    missing = [p for p in PROGRAMS if which(p) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} missing): apt-get install {PACKAGES} (as .ci/run does)"
    if os.geteuid() != 0:
        return "the test cluster runs slurmd and munged as root"
    return None


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{os.environ.get('PATH', '')}:{SBIN}"}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.jobs: set[str] = set()
        # job ids (and the ports the jobs derive from them) differ between clusters running side by side
        self.first_job_id = random.randrange(1000, 19000, 100)

    # -- life ----------------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o700, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = self.root / "munge" / "socket"
        self._daemon("munged", [which("munged"), "--foreground", "--force", f"--key-file={key}",
                                f"--socket={munge_socket}", f"--pid-file={self.root / 'munge' / 'pid'}",
                                f"--seed-file={self.root / 'munge' / 'seed'}",
                                f"--log-file={self.root / 'log' / 'munged.log'}"])
        wait_for(munge_socket.exists, 30, "munged's socket")
        self.conf.write_text(self._config(munge_socket))
        self._daemon("slurmctld", [which("slurmctld"), "-D", "-i"])
        self._daemon("slurmd", [which("slurmd"), "-D"])
        wait_for(lambda: self.node_state() == "idle", timeout, f"sinfo to show {self.host} idle ({self.logs()})")

    def _config(self, munge_socket: Path) -> str:
        hw = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, env=self.env).stdout
        node = next(line for line in hw.splitlines() if line.startswith("NodeName="))
        node = " ".join(w for w in node.split() if not w.startswith(("NodeName=", "RealMemory=")))
        r = self.root
        return f"""ClusterName=faceclrtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=900
FirstJobId={self.first_job_id}
MailProg=/bin/true
NodeName={self.host} NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def _daemon(self, name: str, cmd: list) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the daemon keeps it)
        self.daemons[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """Cancel the jobs, wait for their processes to go, then stop the daemons this cluster started."""
        if self.jobs and "slurmctld" in self.daemons:
            self.run("scancel", *sorted(self.jobs))
            try:
                wait_for(lambda: not self.job_processes(), 90, "the jobs' processes to end")
            except AssertionError:
                for pid in self.job_processes():
                    _kill(pid, signal.SIGKILL)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def job_processes(self) -> list[int]:
        """pids of the slurmstepd processes of this cluster's jobs, and of everything below them."""
        table = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
        roots = {pid for pid, (_, cmd) in table.items()
                 if cmd.startswith("slurmstepd: [") and cmd[len("slurmstepd: ["):].split(".")[0] in self.jobs}
        found, frontier = set(roots), set(roots)
        while frontier:
            frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
            found |= frontier
        return sorted(found)

    # -- use -----------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()

    def submit(self, script: Path) -> str:
        job = self.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
        self.jobs.add(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, Reason, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        fields = {}
        for word in out.split():
            key, eq, value = word.partition("=")
            if eq:
                fields[key] = value
        return fields

    def logs(self) -> str:
        return "logs in " + str(self.root / "log")


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
