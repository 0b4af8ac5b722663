"""A real one-node Slurm cluster for the tests, under a temporary directory.

``ensure_tools()`` installs Debian's ``slurm-wlm``, ``munge`` and ``shellcheck`` with apt when
they are missing and the tests run as root (as CI does); otherwise the test is skipped with
the command to run. ``SlurmCluster`` writes a configuration for this machine as one node
(``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no cgroups needed), starts
munged, slurmctld and slurmd as its own child processes, and on exit cancels its jobs and
stops everything it started, every process of its jobs included.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge", "shellcheck")
INSTALL = f"apt-get install -y {' '.join(PACKAGES)}"
_SBIN = ":/usr/sbin:/sbin"
SLURM_COMMANDS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd",
                  "munged")

# The time-limit check (and the --signal warning) runs every 30 s in slurmctld's background
# thread, counted from its start (PERIODIC_TIMEOUT, src/slurmctld/slurmctld.h).
PERIODIC_CHECK_S = 30


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + _SBIN)


@functools.cache
def _apt_install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ([INSTALL], ["apt-get update -q", INSTALL]):  # a fresh image has no lists
        for command in attempt:
            proc = subprocess.run(command.split(), env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            return
    pytest.fail(f"`{INSTALL}` failed: {proc.stderr.strip()[-500:]}")


def ensure_tools(*commands: str) -> None:
    """Make ``commands`` (default: Slurm's and munged) available: installed with apt as root,
    otherwise the test is skipped with the command to run."""
    missing = [c for c in commands or SLURM_COMMANDS if which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        pytest.skip(f"{', '.join(missing)} missing: install with `sudo {INSTALL}`")
    _apt_install()
    missing = [c for c in missing if which(c) is None]
    if missing:
        pytest.fail(f"`{INSTALL}` did not provide {', '.join(missing)}")


def free_port() -> int:
    from megatron_sppo.runtime.distributed import free_port as port

    return port()


def slurm_conf(root: Path, cpus: int) -> str:
    """One node, ``localhost``, with ``cpus`` CPUs whatever the machine has."""
    return f"""\
ClusterName=megatron-sppo-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (default 120 s; this one 5 + 1 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
OverTimeLimit=0
KillWait=5
MinJobAge=600
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """``with SlurmCluster(tmp_path) as cluster:`` a running one-node cluster; ``started``
    is when slurmctld started (its periodic time-limit checks count from there)."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + _SBIN}
        self.cpus = cpus
        self.daemons: list[subprocess.Popen] = []
        self.started = 0.0

    def __enter__(self) -> SlurmCluster:
        ensure_tools()
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.root, self.cpus))
        try:
            m = self.root / "munge"
            self._daemon("munged", "--foreground", "--force", f"--socket={m}/munge.socket",
                         f"--key-file={key}", f"--pid-file={m}/munged.pid",
                         f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
            self._wait(lambda: (m / "munge.socket").exists(), 10, "munged to start")
            self.started = time.monotonic()
            self._daemon("slurmctld", "-D", "-i")
            self._daemon("slurmd", "-D", "-N", "localhost")
            self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
                       == "idle", 30, "the node to be idle")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.daemons.append(subprocess.Popen([which(name), *args], env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while waiting "
                                       f"for {what}: see {self.root}/*.log and *.out")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s: see {self.root}/*.log")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True, attempts: int = 5) -> subprocess.CompletedProcess:
        """A Slurm command; with ``check``, retried first (on a loaded machine an RPC to
        slurmctld can time out), then an error."""
        for _ in range(attempts if check else 1):
            proc = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env,
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode == 0 or not check:
                return proc
            time.sleep(1)
        raise RuntimeError(f"{' '.join(cmd)} failed {attempts} times: {proc.stderr.strip()}")

    def submit(self, script: Path, env: dict | None = None) -> str:
        proc = subprocess.run([which("sbatch"), "--parsable", str(script)], cwd=self.root,
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, TimeLimit, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, ready, timeout: float, what: str) -> None:
        self._wait(ready, timeout, what)

    def _our_processes(self) -> list[int]:
        """Every process that carries this cluster's SLURM_CONF: daemons, job steps, ranks."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def __exit__(self, *exc) -> None:
        if any(p.poll() is None for p in self.daemons):
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while (self.run("squeue", "-h", check=False).stdout.strip()
                   and time.monotonic() < deadline):
                time.sleep(0.5)
        for proc in reversed(self.daemons):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pid in self._our_processes():  # job steps and ranks left behind, if any
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self._our_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self._our_processes()
        assert not left, f"processes of the test cluster still running: {left}"
