import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Tests that CI runs deliberately (`make test-slow`, `make test-slurm`): under CI=true a skip of one
# of them (no root for the SLURM cluster, a set-up that failed) is a failure, never a silent pass.
MUST_RUN_IN_CI = ("slow", "slurm")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    markers = [m for m in MUST_RUN_IN_CI if item.get_closest_marker(m)]
    if markers:
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true, which must run every {'/'.join(markers)} test: "
                           f"{reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true a whole module skipped at import (importorskip, allow_module_level) fails too:
    its markers are unknown then, and it may hold slow or SLURM tests."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped at collection under CI=true: {reason}"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST not found in {FMNIST_DIR}: run `make data` (or set FMNIST_DIR)")
    return FMNIST_DIR


def run_cli(*args, cwd=None, check=True):
    """Run `python -m pipeline ...` in a subprocess, as Snakemake rules do."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_snakemake(*args, workdir, configfile, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_fmnist_shards(out_root, name, fmnist_dir, limit, per_shard, splits=("train", "test")):
    """Real Fashion-MNIST shards (the first `limit` images of each split) under out_root/name."""
    from pipeline.config import validate_config
    from pipeline.shards import build_shards
    cfg = validate_config({"dataset": {"name": name, "source": "fashion_mnist", "path": str(fmnist_dir),
                                       "limit": limit, "splits": list(splits)},
                           "shards": {"samples_per_shard": per_shard, "workers": 1}})
    build_shards(cfg["dataset"], cfg["shards"], out_root=out_root, progress=False)
    return Path(out_root) / name
