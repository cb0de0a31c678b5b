"""A one-node SLURM cluster on this machine, for the tests marked slurm: munged, slurmctld and slurmd of
Debian's slurm-wlm and munge packages, started as root with their configuration, state, sockets and logs in
one folder of their own, and stopped by their own process ids.

Two settings make it quick where a real cluster is patient, and change nothing the tests check:
cred_expire=5 lets a requeued job start again after 5 s (SLURM's default holds it 120 s), and sched_interval=1
lets the scheduler find it within a second (by default it looks every 60 s). slurmctld still checks time
limits, and sends the --signal warning, every 30 s: that interval is built into it."""
import os
import shutil
import socket
import subprocess
from pathlib import Path

from waiting import wait_until

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
SBIN = "/usr/sbin:/sbin"


def which(name: str):
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN}")


def unavailable():
    """Why no cluster can start here, or None."""
    if os.geteuid() != 0:
        return "the tests do not run as root"
    missing = [name for name in DAEMONS + CLIENTS if which(name) is None]
    return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024 - 1024


class Cluster:
    def __init__(self, folder: Path):
        self.folder, self.procs = folder, []
        self.conf = folder / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}

    def config(self) -> str:
        host, f = socket.gethostname().split(".")[0], self.folder
        return "\n".join([
            "ClusterName=tests", f"SlurmctldHost={host}", f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}", "SlurmUser=root", "ReturnToService=2", "MpiDefault=none",
            "AuthType=auth/munge", f"AuthInfo=socket={f / 'munge.socket'},cred_expire=5",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=2048",
            "SchedulerParameters=sched_interval=1,bf_interval=1", "KillWait=10",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}", f"SlurmdLogFile={f / 'slurmd.log'}",
            f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb()} State=UNKNOWN",
            f"PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])

    def start(self) -> None:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        self.conf.write_text(self.config())
        f = self.folder
        self.spawn(which("munged"), "--foreground", "--force", f"--socket={f / 'munge.socket'}",
                   f"--pid-file={f / 'munged.pid'}", f"--seed-file={f / 'munged.seed'}",
                   f"--log-file={f / 'munged.log'}")
        self.wait_for(lambda: (f / "munge.socket").exists(), "munged")
        self.spawn(which("slurmctld"), "-D", "-f", str(self.conf))
        self.spawn(which("slurmd"), "-D", "-f", str(self.conf))
        self.wait_for(lambda: self.run("sinfo", "--noheader", "--format=%t").stdout.strip() == "idle", "the node")

    def spawn(self, *command: str) -> None:
        log = open(self.folder / f"{Path(command[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                                 **self.env}))

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60)

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        try:
            wait_until(condition, lambda: all(p.poll() is None for p in self.procs), timeout, f"{what} coming up")
        except (AssertionError, TimeoutError) as e:
            logs = "\n".join(p.read_text()[-1000:] for p in self.folder.glob("*.out"))
            raise RuntimeError(f"{e}:\n{logs}") from None

    def stop(self) -> None:
        """Cancel what is left of the tests' jobs, then end the daemons, newest first."""
        if self.procs and self.procs[-1].poll() is None:
            self.run("scancel", "--me")
            try:
                wait_until(lambda: not self.run("squeue", "--me", "--noheader").stdout.strip(), timeout=30,
                           what="the cancelled jobs leaving the queue", poll=0.2)
            except TimeoutError:
                pass  # the daemons end below all the same
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
