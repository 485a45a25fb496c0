"""A one-node Slurm cluster on this machine for the tests: munged, slurmctld and slurmd from Debian's munge
and slurm-wlm packages, each started in the foreground as a child of the test process, with every file
(key, slurm.conf, state, spool, logs) in a temporary folder and the clients pointed at it through
SLURM_CONF. No accounting (sacct fails, as on clusters without slurmdbd). The node is this machine's CPUs
plus 4 GPUs declared by count alone (a gres without device files), so that requests for GPUs are checked
against a node's size.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

from fasttrain.sweep.runner import _die_with_parent  # the daemons stop even if the test process is killed

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODE_GPUS = 4


@dataclass
class Cluster:
    conf: str
    host: str
    partition: str
    logs: str

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
        return out

    def queue(self) -> dict:
        """Job id -> state of every job in the queue (array tasks one by one)."""
        out = self.run("squeue", "-h", "-r", "-o", "%i|%T").stdout
        return dict(line.split("|") for line in out.splitlines())

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no job is left in the queue."""
        deadline = time.time() + timeout
        while self.queue():
            if time.time() > deadline:
                raise AssertionError(f"jobs still in the queue: {self.queue()}")
            time.sleep(0.2)


def missing_commands() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: str, host: str, munge_socket: str) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=fasttrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=5
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 Gres=gpu:{NODE_GPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextmanager
def one_node_cluster(root: str):
    """Start the cluster in `root` (an empty folder only root can enter); on exit cancel every job, stop the
    daemons it started and delete the folder, whatever happened in between. If the test process is killed
    outright, the daemons still stop (the kernel sends them SIGTERM), but a job step running at that moment
    is left behind."""
    host = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "log"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    os.chmod(os.path.join(root, "munge"), 0o711)
    key = os.path.join(root, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = os.path.join(root, "munge", "munge.socket")
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_config(root, host, munge_socket))
    os.makedirs(os.path.join(root, "dev"), exist_ok=True)
    for i in range(NODE_GPUS):  # stand-ins for /dev/nvidiaN: task/none never opens them
        open(os.path.join(root, "dev", f"nvidia{i}"), "w").close()
    with open(os.path.join(root, "gres.conf"), "w") as f:
        f.write(f"NodeName={host} Name=gpu File={root}/dev/nvidia[0-{NODE_GPUS - 1}] AutoDetect=off\n")
    logs = os.path.join(root, "log")
    previous_conf = os.environ.get("SLURM_CONF")
    started: list[subprocess.Popen] = []
    cluster = Cluster(conf=conf, host=host, partition="debug", logs=logs)
    try:
        started.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root}/munge/munged.pid", f"--log-file={logs}/munged.log",
             f"--seed-file={root}/munge/munged.seed"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent))
        _wait_for(lambda: os.path.exists(munge_socket), 20, "munged's socket", logs)
        os.environ["SLURM_CONF"] = conf
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen([daemon, "-D", "-f", conf], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
        _wait_for(lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                  "the node to come up idle", logs)
        yield cluster
    finally:
        try:
            if len(started) == 3:
                subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True, timeout=60)
                try:
                    cluster.wait_idle(timeout=30)
                except AssertionError:
                    pass
        finally:
            for proc in reversed(started):
                _stop(proc)
            if previous_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous_conf
            shutil.rmtree(root, ignore_errors=True)


def _wait_for(condition, timeout: float, what: str, logs: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            tails = []
            for name in sorted(os.listdir(logs)):
                with open(os.path.join(logs, name), errors="replace") as f:
                    tails.append(f"{name}: " + " | ".join(f.read().strip().splitlines()[-5:]))
            raise RuntimeError(f"the test Slurm cluster did not start: no {what} after {timeout:.0f} s; "
                               + "; ".join(tails))
        time.sleep(0.2)
