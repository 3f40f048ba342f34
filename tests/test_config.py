import copy

import pytest
import yaml

from pipeline.config import ConfigError, load_config, validate_config
from conftest import run_cli

MINIMAL = {"dataset": {"name": "d", "source": "fashion_mnist"}}


def test_defaults_are_filled():
    cfg = validate_config(MINIMAL)
    assert cfg["run"] == "default"
    assert cfg["shards"]["samples_per_shard"] == 10000
    assert cfg["dataset"]["splits"] == ["train", "test"]
    assert MINIMAL == {"dataset": {"name": "d", "source": "fashion_mnist"}}, "input must not be modified"


def test_unknown_key_is_named():
    bad = copy.deepcopy(MINIMAL)
    bad["shards"] = {"samples_per_shrad": 10}
    with pytest.raises(ConfigError, match=r"unknown config key 'shards\.samples_per_shrad'"):
        validate_config(bad)


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'tokenz'"):
        validate_config({**MINIMAL, "tokenz": {}})


def test_wrong_type_is_named():
    bad = copy.deepcopy(MINIMAL)
    bad["shards"] = {"samples_per_shard": "lots"}
    with pytest.raises(ConfigError, match=r"'shards\.samples_per_shard': 'lots' is not of type 'integer'"):
        validate_config(bad)


def test_bad_enum_is_named():
    bad = copy.deepcopy(MINIMAL)
    bad["dataset"]["source"] = "imagenet"
    with pytest.raises(ConfigError, match=r"'dataset\.source'"):
        validate_config(bad)


def test_shipped_configs_are_valid(repo):
    for path in sorted((repo / "configs").glob("*.yaml")):
        load_config(path)


def test_cli_reports_bad_key_and_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "shards": {"workerz": 2}}))
    proc = run_cli("config", "--config", path, check=False)
    assert proc.returncode == 2
    assert "shards.workerz" in proc.stderr


def test_cli_set_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    proc = run_cli("config", "--config", path, "--set", "shards.samples_per_shard=7")
    assert yaml.safe_load(proc.stdout)["shards"]["samples_per_shard"] == 7
