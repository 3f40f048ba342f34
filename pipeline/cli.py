"""Command line: `python -m pipeline <stage> ...`. Every stage runs without Snakemake too.

The configuration comes from `--config FILE` (default configs/default.yaml), then `--json` (a
partial config as JSON, how Snakemake rules pass their section), then `--set key.sub=value`.
The result is validated against workflow/schemas/config.schema.yaml before anything runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_schema, set_key, validate_config

DEFAULT_CONFIG = "configs/default.yaml"


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def resolve_config(args) -> dict:
    import yaml
    config: dict = {}
    if args.config or not args.json:
        path = Path(args.config or DEFAULT_CONFIG)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        config = yaml.safe_load(path.read_text()) or {}
    if args.json:
        try:
            _deep_update(config, json.loads(args.json))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json is not valid JSON: {exc}") from None
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key.sub=value")
        set_key(config, *item.split("=", 1))
    return validate_config(config)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML config file (default: {DEFAULT_CONFIG} unless --json is given)")
    p.add_argument("--json", help="partial config as JSON, merged over the file (used by Snakemake rules)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key, e.g. --set shards.samples_per_shard=500 (repeatable)")


def cmd_shards(args) -> int:
    from .shards import build_shards
    config = resolve_config(args)
    summary = build_shards(config["dataset"], config["shards"], out_root=args.out_root, progress=not args.quiet)
    counts = ", ".join(f"{s}: {v['samples']} images in {len(v['shards'])} shards" for s, v in summary["splits"].items())
    print(f"[shards] {summary['name']}: {counts}; {summary['num_skipped']} unreadable skipped", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .inspect import format_summary, summarise
    summary = summarise(args.path)
    print(json.dumps(summary, indent=2) if args.as_json else format_summary(summary))
    return 0


def cmd_config(args) -> int:
    import yaml
    if args.schema:
        print(yaml.safe_dump(load_schema(), sort_keys=False))
    else:
        print(yaml.safe_dump(resolve_config(args), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="DiGIT pipeline stages. Usually run through Snakemake (see README); every stage "
                    "also runs alone with a config file.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("shards", help="write WebDataset shards + manifest.parquet from an image source",
                       description="Read the configured source (Fashion-MNIST idx, ImageFolder, or WebDataset "
                                   "tars) and write shards/{dataset}/{split}-{i:06d}.tar, manifest.parquet and "
                                   "dataset.json. Up-to-date shards are kept, so an interrupted run resumes.")
    _add_config_args(p)
    p.add_argument("--out-root", default="shards", help="folder that holds one subfolder per dataset (default: shards)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("inspect", help="summarise an artifact (shard, manifest, dataset folder, sidecar, ...)")
    p.add_argument("path")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("config", help="print the validated config with defaults filled in (or the schema)")
    _add_config_args(p)
    p.add_argument("--schema", action="store_true", help="print the schema that documents every key")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
