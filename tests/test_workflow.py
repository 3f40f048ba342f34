"""The Snakemake DAG on the smoke config: dry run, real run, nothing-to-do, rerun on change; and
CI's rule that slow and SLURM tests never skip silently."""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import run_snakemake


def _smoke_config(repo, tmp_path, **shards):
    cfg = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    cfg["shards"].update(shards)
    path = tmp_path / f"smoke-{len(shards)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_on_smoke_config(repo, tmp_path, fmnist_dir):
    proc = run_snakemake("-n", workdir=tmp_path, configfile=repo / "configs" / "smoke.yaml")
    assert "shards" in proc.stdout + proc.stderr


def test_bad_config_stops_with_key_named(repo, tmp_path):
    cfg = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    cfg["shards"]["samples_per_shrad"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake("-n", workdir=tmp_path, configfile=path, check=False)
    assert proc.returncode != 0
    assert "shards.samples_per_shrad" in proc.stdout + proc.stderr


def test_run_then_nothing_to_do_then_rerun_on_shard_size(repo, tmp_path, fmnist_dir):
    config = repo / "configs" / "smoke.yaml"
    run_snakemake("shards/fashion_mnist_smoke/manifest.parquet", workdir=tmp_path, configfile=config)
    out = tmp_path / "shards" / "fashion_mnist_smoke"
    assert len(list(out.glob("train-*.tar"))) == 3
    again = run_snakemake("shards/fashion_mnist_smoke/manifest.parquet", "-n", workdir=tmp_path, configfile=config)
    assert "Nothing to be done" in again.stdout + again.stderr
    changed = _smoke_config(repo, tmp_path, samples_per_shard=150)
    dry = run_snakemake("shards/fashion_mnist_smoke/manifest.parquet", "-n", workdir=tmp_path, configfile=changed)
    assert "checkpoint shards" in dry.stdout + dry.stderr
    assert "Params have changed" in dry.stdout + dry.stderr
    run_snakemake("shards/fashion_mnist_smoke/manifest.parquet", workdir=tmp_path, configfile=changed)
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


# -- CI never skips silently (tests/conftest.py) ----------------------------------------------------------

CI_PROBE = '''
import pytest


@pytest.fixture(scope="module")
def cluster():
    pytest.skip("SLURM is not installed")      # what tests/test_slurm.py's set-up does without root


@pytest.mark.slurm
def test_on_the_cluster(cluster):
    pass


@pytest.mark.slow
def test_slow_whose_set_up_skips():
    pytest.skip("no data")


def test_fast_may_skip():
    pytest.skip("no GPU here")
'''


def _run_probe(tmp_path, ci):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n    slurm: slurm\n")
    (tmp_path / "test_probe.py").write_text(CI_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA",
                           "test_probe.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    outcomes = dict(reversed(m.groups()) for m in re.finditer(r"^(PASSED|FAILED|SKIPPED|ERROR) \S*?::(\w+)",
                                                             proc.stdout, re.M))
    skipped = re.findall(r"^SKIPPED \[\d+\] test_probe.py:\d+: (.*)$", proc.stdout, re.M)
    return proc, outcomes, skipped


def test_ci_turns_skipped_slurm_and_slow_tests_into_failures(tmp_path):
    proc, outcomes, skipped = _run_probe(tmp_path, ci="true")
    assert proc.returncode == 1, proc.stdout
    assert outcomes == {"test_on_the_cluster": "ERROR", "test_slow_whose_set_up_skips": "FAILED"}, proc.stdout
    assert skipped == ["no GPU here"], proc.stdout                  # an unmarked test may still skip
    assert "skipped under CI=true, which must run every slurm test: SLURM is not installed" in proc.stdout

    proc, outcomes, skipped = _run_probe(tmp_path, ci=None)        # outside CI: skips stay skips
    assert proc.returncode == 0 and outcomes == {}, proc.stdout
    assert sorted(skipped) == ["SLURM is not installed", "no GPU here", "no data"], proc.stdout
