"""The Snakemake DAG on the smoke config: dry run, real run, nothing-to-do, rerun on change."""
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
