"""Slow: the whole DAG on the smoke config, then incrementality when a shard is added."""
import json

import numpy as np
import pytest
import yaml

from conftest import run_cli, run_snakemake

pytestmark = pytest.mark.slow


def _config(repo, tmp_path, limit):
    cfg = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    cfg["dataset"]["limit"] = limit
    cfg["encoder"]["train"]["max_shards"] = 3
    path = tmp_path / f"smoke-{limit}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_full_smoke_dag_and_incremental_shard(repo, tmp_path, fmnist_dir):
    work = tmp_path / "work"
    work.mkdir()
    run_snakemake(workdir=work, configfile=_config(repo, tmp_path, 300))
    res = work / "results" / "smoke"
    tokens = sorted((res / "tokens").glob("*.npy"))
    assert [t.stem for t in tokens] == [f"{s}-{i:06d}" for s in ("test", "train") for i in range(3)]
    grids = np.load(tokens[0])
    assert grids.shape == (100, 2, 7, 7) and grids.dtype == np.uint16
    meta = json.loads((res / "encoder" / "encoder.json").read_text())
    assert 0 <= meta["test_accuracy"] <= 1
    km = json.loads((res / "kmeans" / "centroids.json").read_text())
    assert km["params"]["k"] == 32 and len(km["cluster_sizes"]) == 32
    assert "codebook_size: 32" in run_cli("inspect", tokens[0]).stdout

    again = run_snakemake("-n", workdir=work, configfile=_config(repo, tmp_path, 300))
    assert "Nothing to be done" in again.stdout + again.stderr

    before = {p.name: p.stat().st_mtime_ns for p in (res / "tokens").glob("*.npy")}
    centroids_before = (res / "kmeans" / "centroids.npy").stat().st_mtime_ns
    run_snakemake(workdir=work, configfile=_config(repo, tmp_path, 350))  # adds train/test-000003 (50 images)
    after = {p.name: p.stat().st_mtime_ns for p in (res / "tokens").glob("*.npy")}
    assert set(after) - set(before) == {"train-000003.npy", "test-000003.npy"}
    assert all(after[name] == before[name] for name in before), "old shards' tokens must not be recomputed"
    assert (res / "kmeans" / "centroids.npy").stat().st_mtime_ns == centroids_before
    assert np.load(res / "tokens" / "train-000003.npy").shape == (50, 2, 7, 7)
