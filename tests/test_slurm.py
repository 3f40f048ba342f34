"""SLURM: the smoke DAG through the project's SLURM profile on a real single-node cluster.

`make test-slurm` (or `pytest -m slurm`) as root: installs the Debian SLURM + MUNGE packages when
missing, starts munged, slurmctld and slurmd on localhost (tests/slurm/localslurm.py), installs the
executor plugin into .slurm-plugin/ (never into .venv), then runs three Snakemake processes at once:

- through SLURM with workflow/profiles/slurm, unchanged, up to the stage-1 checkpoint (shards ->
  train_encoder -> features x2 -> kmeans -> tokens x2 -> train_stage1: 8 sbatch jobs, CPU and
  fake-GPU ones);
- the same targets locally (--cores 2) in another directory: token grids and centroids must be
  byte-identical, encoder and stage-1 weights equal;
- through SLURM with a broken config (dataset path missing): the shards job fails, is retried
  once with more memory (the profile's mem_mb grows with the attempt), and Snakemake fails.

Every daemon is stopped by PID at the end, also when a test fails.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "slurm"))
from localslurm import LocalSlurm, SkipCluster, ensure_packages, ensure_plugin  # noqa: E402

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "workflow" / "profiles" / "slurm"
TARGETS = ["results/smoke/checkpoints/digit/final.pt"]
TOKENS = [f"results/smoke/tokens/train-{i:06d}" for i in range(2)]
EXPECTED_JOBS = {"shards": 1, "train_encoder": 1, "features": 2, "kmeans": 1, "tokens": 2, "train_stage1": 1}
GPU_RULES = {"features", "kmeans", "tokens", "train_stage1"}
# Settings of this test cluster, not of the profile: no accounting database, so the plugin polls
# squeue (the cluster keeps finished jobs for an hour: MinJobAge), and a short first status check.
CLUSTER_FLAGS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                 "--slurm-keep-successful-logs"]
TIMEOUT_S = 540


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_packages()
    except SkipCluster as exc:
        pytest.skip(str(exc))
    root = Path(tempfile.mkdtemp(prefix="digit-slurm-"))
    local = LocalSlurm(root)
    try:
        local.start()  # stops what it started if it fails
    except BaseException as exc:
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, SkipCluster):
            pytest.skip(str(exc))
        raise
    try:
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


def _snakemake(workdir, configfile, *args):
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), *map(str, args)]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, fmnist_dir):
    """The three Snakemake runs, started together and awaited: name -> (dir, returncode, output)."""
    plugin = ensure_plugin(REPO / ".slurm-plugin")
    base = tmp_path_factory.mktemp("slurm")
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["dataset"]["limit"] = 200  # 2 shards per split
    cfg["dataset"]["path"] = str(fmnist_dir)
    cfg["train"].update(steps=10, checkpoint_every=10)
    good = base / "smoke.yaml"
    good.write_text(yaml.safe_dump(cfg))
    broken_cfg = {**cfg, "dataset": {**cfg["dataset"], "path": str(base / "no-such-dataset")}}
    broken = base / "broken.yaml"
    broken.write_text(yaml.safe_dump(broken_cfg))

    slurm_env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin),
                                                                             os.environ.get("PYTHONPATH")]))}
    plan = {
        "slurm": (good, ["--profile", PROFILE, *CLUSTER_FLAGS, *TARGETS], slurm_env),
        "local": (good, ["--cores", "2", *TARGETS], dict(os.environ)),
        "broken": (broken, ["--profile", PROFILE, *CLUSTER_FLAGS, "shards/fashion_mnist_smoke/manifest.parquet"],
                   slurm_env),
    }
    procs, logs = {}, {}
    start = time.monotonic()
    try:
        for name, (config, args, env) in plan.items():
            (base / name).mkdir()
            logs[name] = open(base / f"{name}.log", "w")
            procs[name] = subprocess.Popen(_snakemake(base / name, config, *args), env=env, stdout=logs[name],
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for name, proc in procs.items():
            proc.wait(timeout=max(1, TIMEOUT_S - (time.monotonic() - start)))
    finally:
        for name, proc in procs.items():  # only after a timeout or an error here
            if proc.poll() is None:
                proc.terminate()  # Snakemake cancels its SLURM jobs
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in logs.values():
            f.close()
    print(f"SLURM test runs took {time.monotonic() - start:.0f} s")
    return {name: (base / name, proc.returncode, (base / f"{name}.log").read_text())
            for name, proc in procs.items()}


def _profile():
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def _resource(rule, key, attempt=1):
    """A rule's resource as the profile sets it (set-resources over default-resources)."""
    prof = _profile()
    value = prof.get("set-resources", {}).get(rule, {}).get(key, prof["default-resources"].get(key))
    return eval(value, {}, {"attempt": attempt}) if isinstance(value, str) and "attempt" in value else value


def _mem_mb(text):
    number, unit = re.fullmatch(r"([\d.]+)([MGT])", text).groups()
    return round(float(number) * {"M": 1, "G": 1024, "T": 1024 ** 2}[unit])


def _slurm_time(minutes):
    days, minutes = divmod(minutes, 24 * 60)
    return (f"{days}-" if days else "") + f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _jobs_in(cluster, workdir):
    """SLURM's record of the jobs submitted from one run directory: (rule, job) pairs."""
    out = []
    for job in cluster.jobs():
        if job.get("WorkDir") == str(workdir):
            rule = re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", job["Comment"]).group(1)
            out.append((rule, job))
    return out


def _check_ok(runs, name, cluster):
    workdir, code, output = runs[name]
    assert code == 0, f"{name} run failed ({code}):\n{output[-6000:]}\n{cluster.logs()}"
    return workdir, output


def test_profile_jobs_go_through_sbatch(runs, cluster):
    workdir, output = _check_ok(runs, "slurm", cluster)
    assert "has been submitted with SLURM jobid" in output
    jobs = _jobs_in(cluster, workdir)
    counts = {}
    for rule, _ in jobs:
        counts[rule] = counts.get(rule, 0) + 1
    assert counts == EXPECTED_JOBS, counts
    for rule, job in jobs:
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert _mem_mb(job["MinMemoryNode"]) == _resource(rule, "mem_mb"), (rule, job["MinMemoryNode"])
        assert job["TimeLimit"] == _slurm_time(_resource(rule, "runtime")), (rule, job["TimeLimit"])
        if rule in GPU_RULES:
            assert job["Partition"] == "gpu" and job["TresPerJob"] == "gres:gpu:1", (rule, job)
            assert job["CpusPerTres"] == f"gres:gpu:{_resource(rule, 'cpus_per_gpu')}", (rule, job)
        else:
            assert job["Partition"] == "cpu", (rule, job)
            assert int(job["NumCPUs"]) == _resource(rule, "cpus_per_task"), (rule, job)
    # The job's own log (kept by --slurm-keep-successful-logs) shows the rule ran inside the job.
    job_logs = sorted((workdir / ".snakemake" / "slurm_logs" / "rule_tokens").rglob("*.log"))
    assert len(job_logs) == 2 and all("[tokens]" in f.read_text() for f in job_logs), job_logs


def _tokens_meta(path):
    """A token shard's metadata without the wall-clock parts (run time; the encoder file's hash,
    which covers its training time too: its weights are compared separately)."""
    meta = json.loads(path.read_text())
    meta.pop("seconds")
    meta["encoder"].pop("weights_sha256")
    return meta


def test_slurm_results_equal_local_run(runs, cluster):
    slurm_dir, _ = _check_ok(runs, "slurm", cluster)
    local_dir, _ = _check_ok(runs, "local", cluster)
    for rel in [f"{t}.npy" for t in TOKENS] + ["results/smoke/kmeans/centroids.npy"]:
        assert (slurm_dir / rel).read_bytes() == (local_dir / rel).read_bytes(), f"{rel} differs"
    for t in TOKENS:
        assert _tokens_meta(slurm_dir / f"{t}.json") == _tokens_meta(local_dir / f"{t}.json"), t
    # The encoder is bit-identical. The GPT's 10 AdamW steps were seen (1 run in 4, both runs with 2
    # threads on a 2-core machine shared by both runs) to differ by ~1e-8 in some weights: CPU float
    # reductions are not bit-stable under oversubscription. Its input tokens are equal (above) and its
    # weights must agree far below what one training step moves them (1e-6).
    for rel, key, atol in [("results/smoke/encoder/encoder.pt", "state_dict", 0.0), (TARGETS[0], "model", 1e-6)]:
        a, b = (torch.load(d / rel, map_location="cpu", weights_only=False)[key] for d in (slurm_dir, local_dir))
        assert a.keys() == b.keys(), rel
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert worst <= atol, f"{rel}: weights differ (max |diff| {worst:.3g} > {atol})"


def test_failing_job_is_retried_with_more_memory_then_reported(runs, cluster):
    workdir, code, output = runs["broken"]
    assert code != 0, output[-4000:]
    assert "Error in rule shards" in output and "SLURM-job" in output, output[-4000:]
    assert "dataset path not found" in output, output[-4000:]  # the job's log, shown by the profile
    jobs = _jobs_in(cluster, workdir)
    assert [rule for rule, _ in jobs] == ["shards"] * (1 + _profile()["retries"]), jobs
    assert all(job["JobState"] == "FAILED" for _, job in jobs), jobs
    mems = sorted(_mem_mb(job["MinMemoryNode"]) for _, job in jobs)
    assert mems == [_resource("shards", "mem_mb", attempt=a) for a in range(1, len(jobs) + 1)], mems
    assert mems[-1] > mems[0]
