"""A one-node Slurm for tests and benchmarks: munged, slurmctld and slurmd (Debian's slurm-wlm, installed by
scripts/ensure-slurm.sh) started as root in a directory of their own, with a free port each. Slurm's commands find
it through SLURM_CONF=<root>/slurm.conf.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "adaptery0"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_conf(root: Path) -> str:
    return f"""ClusterName=adaptery
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig=/dev/null
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: Path) -> str | None:
    """Start the three daemons; None when the node is idle, else why not."""
    if os.geteuid() != 0:
        return "a test Slurm runs its daemons as root"
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing or shutil.which("sbatch") is None:
        return f"slurm-wlm / munge are not installed (scripts/ensure-slurm.sh): {', '.join(missing) or 'sbatch'}"
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(mode=0o700)
    (root / "slurm.conf").write_text(slurm_conf(root))
    commands = [
        ["munged", "--force", f"--socket={root}/munge/munge.socket", "--key-file=/etc/munge/munge.key",
         f"--log-file={root}/munged.log", f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/seed"],
        ["slurmctld", "-i"],
        ["slurmd", "-N", NODE],
    ]  # fmt: skip
    for command in commands:
        binary = shutil.which(command[0]) or f"/usr/sbin/{command[0]}"
        done = subprocess.run([binary, *command[1:]], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            return f"{command[0]} did not start: {done.stderr.strip()[-300:]}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return None
        time.sleep(0.5)
    log = root / "slurmd.log"
    return f"the node did not come up: {log.read_text()[-300:] if log.exists() else 'no slurmd log'}"


def stop_cluster(root: Path) -> None:
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        path = root / pid_file
        if path.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(path.read_text().strip()), signal.SIGTERM)
