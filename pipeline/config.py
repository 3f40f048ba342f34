"""Load and validate the pipeline configuration against pipeline/schemas/config.schema.yaml.

Both the Snakefile and the command line go through `validate_config`, so a typo in a key or a
value of the wrong type stops every entry point with the same message naming the key. Beyond the
schema it rejects settings that would be silently ignored (a tokenizer both trained here and given
as a checkpoint) and split names the dataset does not have; split keys left out follow
``dataset.splits`` (``SPLIT_KEYS``).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = "configs/default.yaml"   # relative to the working directory, like every path


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        prefix = f"{where}." if error.absolute_path else ""
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        return f"unknown config key {names}; allowed keys here: {', '.join(allowed)}"
    if error.validator == "required":
        return f"config key '{where}': {error.message}"
    return f"config key '{where}': {error.message}"


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Insert schema defaults for missing keys, recursing into objects (in place)."""
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not isinstance(instance, dict) or "object" not in kinds:
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)


# Tokenizers that are either trained here (SECTION.train) or loaded (SECTION.checkpoint), with what
# SECTION.train trains: setting both would silently ignore the checkpoint.
TRAINED_OR_LOADED: dict[str, str] = {
    "encoder": "a tiny encoder",
    "vq": "a VQGAN",
    "kl": "a KL autoencoder",
}


def training_split(splits: list[str]) -> str:
    """The split models train on: ``train`` when the dataset has one, else its first split."""
    return "train" if "train" in splits else splits[0]


EVALUATION_SPLITS = ("test", "val", "validation")   # in this order of preference


def evaluation_split(splits: list[str]) -> str:
    """The held-out split: the first of test, val, validation the dataset has, else its last split."""
    return next((s for s in EVALUATION_SPLITS if s in splits), splits[-1])


# Keys that name dataset splits -> their value when the config leaves them out, from dataset.splits.
# Without a dataset section (the config fragments stage commands get) they follow the schema's
# default dataset.splits ([train, test]) and are not checked.
SPLIT_KEYS: dict[str, Callable[[list[str]], str | list[str]]] = {
    "kmeans.split": training_split,
    "tokens.splits": list,
    "train.splits": lambda splits: [training_split(splits)],
    "stage2.train.splits": lambda splits: [training_split(splits)],
    "stage2_nar.train.splits": lambda splits: [training_split(splits)],
    "maskgit.train.splits": lambda splits: [training_split(splits)],
    "mar.train.splits": lambda splits: [training_split(splits)],
    "mar_causal.train.splits": lambda splits: [training_split(splits)],
    "probe.train_split": training_split,
    "probe.test_split": evaluation_split,
    "evaluate.reference_split": evaluation_split,
}


def has_key(config: Any, dotted: str) -> bool:
    """Whether the nested mapping ``config`` has the dotted key (e.g. ``probe.test_split``)."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _node(config: dict, dotted: str) -> tuple[dict, str]:
    """The mapping that holds ``dotted``'s last key, and that key."""
    *parents, last = dotted.split(".")
    for part in parents:
        config = config[part]
    return config, last


def _fill_splits(config: dict, given: set[str], schema: dict) -> None:
    """Fill in the split keys the user left out (``given``: those the user set), in place."""
    dataset = config.get("dataset")
    splits = dataset["splits"] if dataset else schema["properties"]["dataset"]["properties"]["splits"]["default"]
    for dotted, derive in SPLIT_KEYS.items():
        if dotted not in given:
            node, key = _node(config, dotted)
            node[key] = derive(list(splits))


def _split_errors(config: dict) -> list[str]:
    """Each split key naming a split that dataset.splits does not list (no dataset section: none)."""
    if "dataset" not in config:
        return []
    splits = config["dataset"]["splits"]
    errors = []
    for dotted in SPLIT_KEYS:
        node, key = _node(config, dotted)
        values = node[key] if isinstance(node[key], list) else [node[key]]
        errors += [f"config key '{dotted}': '{v}' is not a split of the dataset; dataset.splits has: "
                   f"{', '.join(splits)}" for v in values if v not in splits]
    return errors


def _precedence_errors(config: dict) -> list[str]:
    """Each tokenizer section that is both trained here and given as a checkpoint."""
    errors = []
    for name, what in TRAINED_OR_LOADED.items():
        section = config.get(name)
        if isinstance(section, dict) and section.get("train") is not None and section.get("checkpoint") is not None:
            errors.append(f"config keys '{name}.train' and '{name}.checkpoint' are both set: {name}.train trains "
                          f"{what} here and the weights in {name}.checkpoint would never be used; set {name}.train: "
                          f"null to use the weights, or {name}.checkpoint: null to train")
    return errors


def validate_config(config: dict) -> dict:
    """Return a validated copy of `config` with defaults filled in; raise ConfigError otherwise.
    Split keys the config leaves out are derived from ``dataset.splits`` (``SPLIT_KEYS``); the
    result is a fixed point (validating it again changes nothing)."""
    if not isinstance(config, dict):
        raise ConfigError(f"the configuration must be a mapping, got {type(config).__name__}")
    schema = load_schema()
    given = {dotted for dotted in SPLIT_KEYS if has_key(config, dotted)}
    config = copy.deepcopy(config)
    _fill_defaults(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    _fill_splits(config, given, schema)
    problems = _precedence_errors(config) + _split_errors(config)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def set_key(config: dict, dotted: str, value: str) -> None:
    """Apply a `key.sub=value` override; the value is parsed as YAML (so 10 is an int)."""
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a mapping")
    node[parts[-1]] = yaml.safe_load(value)


def deep_update(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into ``base`` (in place), section by section."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None = DEFAULT_CONFIG, overrides: list[str] | None = None, *,
                fragments: list[str] | None = None) -> dict:
    """The one configuration loader: a YAML file, then JSON fragments (how Snakemake rules pass the
    sections a stage depends on), then ``key.sub=value`` overrides; validated, defaults filled in.
    ``path=None`` starts from an empty config (the fragments say everything)."""
    config: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    for fragment in fragments or []:
        try:
            deep_update(config, json.loads(fragment))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json is not valid JSON: {exc}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        set_key(config, key, value)
    return validate_config(config)


def config_hash(config: dict) -> str:
    """Stable short hash of a (sub)configuration, for provenance."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
