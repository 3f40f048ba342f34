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


# -- no silent precedence: a tokenizer is trained here or loaded, never both --------------------------

def _fm(**sections) -> dict:
    return {"dataset": {"name": "d", "source": "fashion_mnist"}, **sections}


@pytest.mark.parametrize("name, what", [("encoder", "a tiny encoder"), ("vq", "a VQGAN")])
def test_trained_and_given_tokenizer_is_rejected(name, what):
    with pytest.raises(ConfigError) as err:
        validate_config(_fm(**{name: {"train": {}, "checkpoint": "weights/w.pth"}}))
    assert str(err.value) == (
        f"invalid configuration:\n  config keys '{name}.train' and '{name}.checkpoint' are both set: {name}.train "
        f"trains {what} here and the weights in {name}.checkpoint would never be used; set {name}.train: null to "
        f"use the weights, or {name}.checkpoint: null to train")


def test_both_tokenizer_conflicts_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_config(_fm(encoder={"train": {}, "checkpoint": "w.pth"}, vq={"train": {}, "checkpoint": "v.ckpt"}))
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 3
    assert lines[1].startswith("  config keys 'encoder.train' and 'encoder.checkpoint' are both set: ")
    assert lines[2].startswith("  config keys 'vq.train' and 'vq.checkpoint' are both set: ")


def test_trained_or_given_tokenizer_is_accepted():
    for name in ("encoder", "vq"):
        assert validate_config(_fm(**{name: {"train": {}, "checkpoint": None}}))[name]["train"] is not None
        assert validate_config(_fm(**{name: {"train": None, "checkpoint": "w.pth"}}))[name]["checkpoint"] == "w.pth"


# -- split names follow the dataset ---------------------------------------------------------------------

SPLIT_KEYS = ("kmeans.split", "tokens.splits", "train.splits", "stage2.train.splits", "stage2_nar.train.splits",
              "maskgit.train.splits", "probe.train_split", "probe.test_split", "evaluate.reference_split")


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _derived(training: str, evaluation: str, splits: list[str]) -> dict:
    return {"kmeans.split": training, "tokens.splits": splits, "train.splits": [training],
            "stage2.train.splits": [training], "stage2_nar.train.splits": [training],
            "maskgit.train.splits": [training], "probe.train_split": training, "probe.test_split": evaluation,
            "evaluate.reference_split": evaluation}


def _folder(splits, **sections) -> dict:
    return {"dataset": {"name": "d", "source": "imagefolder", "path": "data", "splits": splits}, **sections}


@pytest.mark.parametrize("splits, training, evaluation", [
    (["train", "val"], "train", "val"),
    (["val", "train"], "train", "val"),
    (["train", "validation"], "train", "validation"),
    (["train", "val", "test"], "train", "test"),
    (["training", "holdout"], "training", "holdout"),
    (["all"], "all", "all"),
])
def test_split_keys_follow_the_dataset(splits, training, evaluation):
    cfg = validate_config(_folder(splits))
    assert {k: _get(cfg, k) for k in SPLIT_KEYS} == _derived(training, evaluation, splits)
    assert validate_config(cfg) == cfg, "the validated config must be a fixed point"


def test_explicit_split_keys_are_kept():
    cfg = validate_config(_folder(["train", "val", "extra"], probe={"test_split": "extra"}, tokens={"splits": ["val"]},
                                  train={"splits": ["train", "extra"]}, evaluate={"reference_split": "train"}))
    assert cfg["probe"]["test_split"] == "extra" and cfg["probe"]["train_split"] == "train"
    assert cfg["tokens"]["splits"] == ["val"] and cfg["train"]["splits"] == ["train", "extra"]
    assert cfg["evaluate"]["reference_split"] == "train" and cfg["stage2"]["train"]["splits"] == ["train"]
    assert validate_config(cfg) == cfg


def test_split_key_naming_no_dataset_split_is_rejected():
    with pytest.raises(ConfigError) as err:
        validate_config(_folder(["train", "val"], probe={"test_split": "test"}))
    assert str(err.value) == ("invalid configuration:\n  config key 'probe.test_split': 'test' is not a split of the "
                              "dataset; dataset.splits has: train, val")
    with pytest.raises(ConfigError) as err:
        validate_config(_folder(["train", "val"], tokens={"splits": ["train", "test"]},
                                stage2={"train": {"splits": ["training"]}}, evaluate={"reference_split": "test"}))
    assert str(err.value).splitlines()[1:] == [
        "  config key 'tokens.splits': 'test' is not a split of the dataset; dataset.splits has: train, val",
        "  config key 'stage2.train.splits': 'training' is not a split of the dataset; dataset.splits has: train, val",
        "  config key 'evaluate.reference_split': 'test' is not a split of the dataset; dataset.splits has: train, "
        "val",
    ]


def test_fragment_without_dataset_keeps_static_split_defaults():
    """Stage commands get config fragments without a dataset section: the split keys take the
    defaults of the schema's default dataset.splits ([train, test]) and are not checked."""
    cfg = validate_config({"probe": {"epochs": 3}})
    assert {k: _get(cfg, k) for k in SPLIT_KEYS} == _derived("train", "test", ["train", "test"])
    assert validate_config({"evaluate": {"reference_split": "val"}})["evaluate"]["reference_split"] == "val"
    assert validate_config(cfg) == cfg


SHIPPED_SPLITS = {   # what the shipped configs resolve to (unchanged by deriving split keys from the dataset)
    "default.yaml": _derived("train", "test", ["train", "test"]),
    "smoke.yaml": _derived("train", "test", ["train", "test"]),
    "imagenet_base.yaml": _derived("train", "val", ["train", "val"]),
    "imagenet_large.yaml": _derived("train", "val", ["train", "val"]),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_SPLITS))
def test_shipped_configs_resolve_to_the_same_splits(repo, name):
    raw = yaml.safe_load((repo / "configs" / name).read_text())
    cfg = validate_config(raw)
    assert {k: _get(cfg, k) for k in SPLIT_KEYS} == SHIPPED_SPLITS[name]
    assert validate_config(cfg) == cfg
    # the explicit split keys of a shipped config say what the dataset would give anyway
    bare = copy.deepcopy(raw)
    for dotted in SPLIT_KEYS:
        *parents, last = dotted.split(".")
        node = bare
        for part in parents:
            node = node.get(part) or {}
        node.pop(last, None)
    assert validate_config(bare) == cfg
