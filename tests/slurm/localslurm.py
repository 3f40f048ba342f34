"""A throw-away single-node SLURM cluster on localhost, for tests/test_slurm.py.

Everything lives in one private directory: a MUNGE key and socket, slurm.conf, gres.conf, state,
spool and logs; the daemons (munged, slurmctld, slurmd) run in the foreground as children of this
process and are stopped by PID. Nothing under /etc is changed and no system service is started;
clients find the cluster through SLURM_CONF (and a `bin/srun` shim first on PATH) in `.env`.

The node advertises more CPUs, memory and (fake) GPUs than the machine has
(`SlurmdParameters=config_overrides`; `Gres=gpu:fake:N`, devices that behave like /dev/null), so
that the project's SLURM profile, written for real GPU nodes, can be submitted unchanged. Jobs run
as root, on this machine, in the directory they were submitted from.

Manual use (as root):
    python tests/slurm/localslurm.py start DIR   # prints `export SLURM_CONF=... PATH=...`
    python tests/slurm/localslurm.py stop DIR
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "srun", "scancel")

# What the fake node claims to have (the profile's largest request must fit, retries included).
NODE_CPUS = 64
NODE_MEMORY_MB = 512_000
NODE_GPUS = 4
PARTITIONS = ("cpu", "gpu")  # the names the profile in workflow/profiles/slurm uses

SLURM_CONF = """\
ClusterName=digit-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol this long: the executor plugin polls squeue here
# (no accounting database), and the test reads the jobs' records after all its runs.
MinJobAge=3600
SchedulerParameters=sched_interval=1
MessageTimeout=20
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} Gres=gpu:fake:{gpus} State=UNKNOWN
PartitionName={p0} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName={p1} Nodes=ALL Default=NO MaxTime=INFINITE State=UP
"""


# The executor plugin lives in its own folder, put on PYTHONPATH only for the Snakemake processes
# the SLURM test starts: installed into .venv it would slow every other Snakemake call (it probes
# SLURM at start-up). --no-deps: everything else it needs is already in .venv (Snakemake's own deps).
PLUGIN_PACKAGES = ("snakemake-executor-plugin-slurm==2.8.0", "snakemake-executor-plugin-slurm-jobstep==0.6.1",
                   "pandas==3.1.1")


class SkipCluster(RuntimeError):
    """The cluster cannot be set up here (not root, no apt, ...): a reason to skip, not a failure."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_packages(log=print) -> None:
    """Install the Debian SLURM and MUNGE packages if a daemon or client is missing."""
    missing = [p for p in DAEMONS.values() if not os.access(p, os.X_OK)]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SkipCluster(f"SLURM is not installed ({', '.join(missing)} missing) and installing it "
                          f"needs root: apt-get install {' '.join(DEBIAN_PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise SkipCluster(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get "
                          f"to install the Debian packages {' '.join(DEBIAN_PACKAGES)}")
    log(f"installing {' '.join(DEBIAN_PACKAGES)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SkipCluster(f"apt-get install {' '.join(DEBIAN_PACKAGES)} failed:\n{proc.stdout[-2000:]}"
                          f"\n{proc.stderr[-2000:]}")


def ensure_plugin(target: Path, python: str = sys.executable, log=print) -> Path:
    """Install the SLURM executor plugin into `target` (not into the environment) if missing."""
    target = Path(target)
    stamp = target / ".installed"
    wanted = "\n".join(PLUGIN_PACKAGES) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return target
    log(f"installing {' '.join(PLUGIN_PACKAGES)} into {target}")
    shutil.rmtree(target, ignore_errors=True)
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), *PLUGIN_PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    if (target / "snakemake").exists():
        raise RuntimeError(f"{target} holds a second Snakemake; it must only hold the plugin")
    stamp.write_text(wanted)
    return target


class LocalSlurm:
    """Start with `start()`, stop with `stop()` (idempotent; safe after a partial start)."""

    def __init__(self, root: Path, host: str | None = None):
        self.root = Path(root)
        self.host = host or socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        """Environment for SLURM clients (and everything that calls them)."""
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged insists that everyone may traverse its socket's directory.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, root=self.root, ctld_port=_free_port(), slurmd_port=_free_port(),
            cpus=NODE_CPUS, mem=NODE_MEMORY_MB, gpus=NODE_GPUS, p0=PARTITIONS[0], p1=PARTITIONS[1]))
        # The jobstep plugin drops every SLURM_* variable (SLURM_CONF too) before it calls srun inside
        # a job; a real cluster keeps its config where srun looks by default, this one uses a shim.
        srun = self.root / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF="${{SLURM_CONF:-{self.conf}}}" exec {shutil.which("srun")} "$@"\n')
        os.chmod(srun, 0o755)
        # Fake GPUs: SLURM only needs one file per device to hand out (no cgroup device limits here).
        for i in range(NODE_GPUS):  # character devices like /dev/null (slurmd wants devices)
            try:
                os.mknod(self.root / f"gpu{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
            except OSError:  # e.g. a nodev mount: slurmd complains but plain files work too
                (self.root / f"gpu{i}").touch()
        (self.root / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu Type=fake File={self.root}/gpu[0-{NODE_GPUS - 1}]\n")

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen([DAEMONS[name], *args], stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        out.close()

    def _wait(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.logs())

    def start(self, timeout: float = 60) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise SkipCluster("the local SLURM cluster runs its daemons as root; run the test as root")
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", ["--foreground", "--force", f"--socket={m}/munge.socket",
                               f"--key-file={m}/munge.key", f"--log-file={m}/munged.log",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"])
        self._wait("munged", lambda: (m / "munge.socket").exists(), timeout)
        # -i: ignore saved state; -D: foreground; -f: our config.
        self._spawn("slurmctld", ["-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout)
        self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.host])
        self._wait("the node to become idle", self._node_idle, timeout)
        # For `localslurm.py stop DIR` should this process die without stopping them.
        (self.root / "pids").write_text(" ".join(f"{n}={p.pid}" for n, p in self.procs.items()) + "\n")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        return bool(out) and all(state.rstrip("*") in ("idle", "mix", "alloc") for state in out)

    def run(self, *args, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def jobs(self) -> list[dict]:
        """Every job slurmctld still remembers (finished ones for MinJobAge), as dicts."""
        out = self.run("scontrol", "show", "job", "--oneliner").stdout
        jobs = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            job = {}
            for field in line.split():
                key, sep, value = field.partition("=")
                if sep and key not in job:
                    job[key] = value
            jobs.append(job)
        return jobs

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                parts.append(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text(errors="replace")
                                                                      .splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self, timeout: float = 15) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started, by PID (slurmd
        first, munged last)."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self.run("scancel", "--user", "root", check=False)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING", check=False).stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


def _ours(pid: int, root: Path) -> bool:
    """Whether `pid` is still a daemon of the cluster in `root` (PIDs get reused)."""
    try:
        return str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "start":
        ensure_packages()
        cluster = LocalSlurm(root).start()  # the daemons outlive this script (own sessions)
        print(f"export SLURM_CONF={cluster.conf} PATH={root / 'bin'}:$PATH")
        return 0
    pids = dict(item.split("=") for item in (root / "pids").read_text().split())
    for name in ("slurmd", "slurmctld", "munged"):
        pid = int(pids.get(name, 0))
        if pid and _ours(pid, root):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _ours(pid, root):
                    break
                time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
