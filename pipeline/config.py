"""Load and validate the pipeline configuration against pipeline/schemas/config.schema.yaml.

Both the Snakefile and the command line go through `validate_config`, so a typo in a key or a
value of the wrong type stops every entry point with the same message naming the key.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

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


def validate_config(config: dict) -> dict:
    """Return a validated copy of `config` with defaults filled in; raise ConfigError otherwise."""
    if not isinstance(config, dict):
        raise ConfigError(f"the configuration must be a mapping, got {type(config).__name__}")
    schema = load_schema()
    config = copy.deepcopy(config)
    _fill_defaults(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
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
