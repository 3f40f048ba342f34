"""Command line: `python -m pipeline <stage> ...`. Every stage runs without Snakemake too.

The configuration comes from `--config FILE` (default configs/default.yaml), then `--json` (a
partial config as JSON, how Snakemake rules pass their section), then `--set key.sub=value`.
The result is validated against workflow/schemas/config.schema.yaml before anything runs.
"""
from __future__ import annotations

import argparse
import json
import os
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
    for fragment in args.json or []:
        try:
            _deep_update(config, json.loads(fragment))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json is not valid JSON: {exc}") from None
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key.sub=value")
        set_key(config, *item.split("=", 1))
    return validate_config(config)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML config file (default: {DEFAULT_CONFIG} unless --json is given)")
    p.add_argument("--json", action="append",
                   help="partial config as JSON, merged over the file (repeatable; used by Snakemake rules)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key, e.g. --set shards.samples_per_shard=500 (repeatable)")


def _add_torch_args(p: argparse.ArgumentParser, encoder: bool = False) -> None:
    if encoder:
        p.add_argument("--encoder", help="encoder weights (default: encoder.checkpoint from the config)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_shards(args) -> int:
    from .shards import build_shards
    config = resolve_config(args)
    if "dataset" not in config:
        raise ConfigError("config key 'dataset' is missing: say which images to shard")
    summary = build_shards(config["dataset"], config["shards"], out_root=args.out_root, progress=not args.quiet)
    counts = ", ".join(f"{s}: {v['samples']} images in {len(v['shards'])} shards" for s, v in summary["splits"].items())
    print(f"[shards] {summary['name']}: {counts}; {summary['num_skipped']} unreadable skipped", file=sys.stderr)
    return 0


def _set_threads(args) -> None:
    """Bound torch's (and faiss's OpenMP) CPU threads to what the Snakemake job was given."""
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
        if args.command == "kmeans":
            import faiss
            faiss.omp_set_num_threads(args.threads)


def _view_spec(config: dict):
    from .data import ViewSpec
    return ViewSpec.from_config(config["encoder"])


def cmd_train_encoder(args) -> int:
    from .tiny_encoder import train_encoder
    config = resolve_config(args)
    _set_threads(args)
    enc = config["encoder"]
    if enc["train"] is None:
        raise ConfigError("config key 'encoder.train' is null: nothing to train (real runs use encoder.checkpoint)")
    num_classes = 1 + max(_labels_of(args.train))
    meta = train_encoder(args.train, args.test, args.out, _view_spec(config), enc["train"], num_classes=num_classes,
                         progress=not args.quiet)
    floor = enc["train"]["min_test_accuracy"]
    if meta["test_accuracy"] < floor:
        print(f"error: tiny encoder test accuracy {meta['test_accuracy']:.4f} < encoder.train.min_test_accuracy "
              f"{floor}", file=sys.stderr)
        return 1
    return 0


def _labels_of(tar_paths) -> list[int]:
    from .data import index_shard
    return [s.label for p in tar_paths for s in index_shard(p)]


def cmd_features(args) -> int:
    from .encoder_loading import load_configured_encoder
    from .models.patch_encoder import encoder_info
    from .features import extract_features
    config = resolve_config(args)
    _set_threads(args)
    enc = config["encoder"]
    encoder = load_configured_encoder(config, args.encoder)
    extract_features(args.shard, args.out, encoder, _view_spec(config), batch_size=enc["batch_size"],
                     num_workers=enc["num_workers"], device=enc["device"], precision=enc["precision"],
                     progress=not args.quiet, encoder_meta=encoder_info(encoder),
                     view=config["kmeans"]["feature_view"], seed=config["kmeans"]["seed"])
    return 0


def cmd_kmeans(args) -> int:
    from .kmeans import run_kmeans_stage
    config = resolve_config(args)
    _set_threads(args)
    km = config["kmeans"]
    run_kmeans_stage(sorted(args.stores), args.out_dir, k=km["k"], niter=km["niter"], seed=km["seed"],
                     n_sample=km["sample"], spherical=km["spherical"],
                     use_gpu="auto" if km["device"] == "auto" else km["device"].startswith("cuda"),
                     max_points_per_centroid=km["max_points_per_centroid"])
    return 0


def cmd_tokens(args) -> int:
    import numpy as np
    from .encoder_loading import load_configured_encoder
    from .models.patch_encoder import encoder_info
    from .io import file_sha256
    from .tokens import tokenize_shard
    config = resolve_config(args)
    _set_threads(args)
    enc, tok = config["encoder"], config["tokens"]
    encoder = load_configured_encoder(config, args.encoder)
    centroids = np.load(args.centroids)
    if centroids.ndim != 2 or centroids.shape[1] != encoder.embed_dim:
        raise ValueError(f"{args.centroids}: centroids of shape {centroids.shape} do not match the encoder's "
                         f"{encoder.embed_dim}-dim features")
    provenance = {"encoder": encoder_info(encoder), "centroids": str(args.centroids),
                  "centroids_sha256": file_sha256(args.centroids)}
    tokenize_shard(args.shard, args.out, encoder, centroids, _view_spec(config), views=tok["views"], seed=tok["seed"],
                   batch_size=enc["batch_size"], num_workers=enc["num_workers"], device=enc["device"],
                   precision=enc["precision"], progress=not args.quiet, provenance=provenance)
    return 0


def cmd_train_vq(args) -> int:
    from .vq import train_vq
    config = resolve_config(args)
    _set_threads(args)
    vq = config["vq"]
    if vq["train"] is None:
        raise ConfigError("config key 'vq.train' is null: nothing to train (real runs use vq.checkpoint)")
    train_cfg = {k: v for k, v in vq["train"].items() if k not in ("max_shards", "min_test_psnr")}
    meta = train_vq(args.train, args.test, args.out, _view_spec(config),
                    {"preset": vq["preset"], "model": vq["model"], **train_cfg}, progress=not args.quiet)
    floor = vq["train"]["min_test_psnr"]
    if floor is not None and meta["test_psnr"] < floor:
        print(f"error: VQ test PSNR {meta['test_psnr']:.2f} dB < vq.train.min_test_psnr {floor}", file=sys.stderr)
        return 1
    return 0


def cmd_vq_tokens(args) -> int:
    from .vq import load_configured_vq, vq_tokenize_shard
    config = resolve_config(args)
    _set_threads(args)
    from .devices import resolve_device
    model, _, path = load_configured_vq(config["vq"], args.vq)
    model.to(resolve_device(config["vq"]["device"]))
    vq_tokenize_shard(args.shard, args.digit_tokens, args.out, model, _view_spec(config),
                      batch_size=config["vq"]["batch_size"], progress=not args.quiet, vq_checkpoint=path)
    return 0


def cmd_train(args) -> int:
    from .train import train_stage1
    config = resolve_config(args)
    _set_threads(args)
    section = config["stage2"]["train"] if args.context else config["train"]
    if args.context and len(args.context) != len(args.tokens):
        raise ConfigError(f"--context needs one DiGIT token shard per --tokens shard "
                          f"({len(args.context)} vs {len(args.tokens)})")
    # pair shards by name: the same shard's VQ tokens and DiGIT tokens
    tokens = sorted(args.tokens, key=lambda p: os.path.basename(p))
    context = sorted(args.context, key=lambda p: os.path.basename(p)) if args.context else None
    train_stage1(section, tokens, args.out_dir, max_steps=args.max_steps, progress=not args.quiet,
                 context_files=context)
    return 0


def cmd_render(args) -> int:
    from .sample import render_stage
    config = resolve_config(args)
    _set_threads(args)
    render_stage(args.samples, args.vq, args.out_dir, config["stage2"]["sample"], stage2_checkpoint=args.stage2,
                 device=config["stage2"]["train"]["device"], progress=not args.quiet, vq_section=config["vq"])
    return 0


def cmd_sample(args) -> int:
    from .sample import sample_stage
    config = resolve_config(args)
    _set_threads(args)
    sample_stage(args.checkpoint, args.out_dir, config["sample"], device=config["train"]["device"],
                 progress=not args.quiet)
    return 0


def cmd_probe(args) -> int:
    from .probe import probe_stage
    config = resolve_config(args)
    _set_threads(args)
    probe_stage(args.checkpoint, sorted(args.train), sorted(args.test), args.out, config["probe"],
                device=config["train"]["device"], progress=not args.quiet)
    return 0


def cmd_reference(args) -> int:
    from .evaluate import reference_stage
    config = resolve_config(args)
    _set_threads(args)
    reference_stage(config, args.shards, args.out_dir, progress=not args.quiet)
    return 0


def cmd_score(args) -> int:
    from .evaluate import score_stage
    config = resolve_config(args)
    _set_threads(args)
    score_stage(config, args.images, args.reference, args.out, progress=not args.quiet)
    return 0


def cmd_stability(args) -> int:
    from .stability import stability_stage
    config = resolve_config(args)
    _set_threads(args)
    ev = config["evaluate"]
    stability_stage(config, args.encoder, args.centroids, args.vq, args.shards, args.out,
                    n_images=ev["stability_images"], seed=ev["seed"], snrs=ev["stability_snrs"],
                    batch_size=config["encoder"]["batch_size"], progress=not args.quiet)
    return 0


def cmd_report(args) -> int:
    from .evaluate import metrics_stage
    from .report import write_report
    config = resolve_config(args)
    inputs = {}
    for item in args.input:
        if "=" not in item:
            raise ConfigError(f"--input '{item}' must look like NAME=PATH")
        name, path = item.split("=", 1)
        inputs[name] = path
    metrics_stage(config, inputs, args.metrics)
    write_report(args.metrics, args.html)
    print(f"[report] {args.metrics}, {args.html}", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .artifacts import format_summary, summarise
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

    p = sub.add_parser("train-encoder", help="train the tiny default encoder (a small timm ViT) on the train shards",
                       description="Supervised training of a small timm ViT on the training shards; held-out "
                                   "accuracy goes into the checkpoint metadata and a .json sidecar.")
    _add_config_args(p)
    p.add_argument("--train", nargs="+", required=True, help="training shards (.tar)")
    p.add_argument("--test", nargs="+", required=True, help="held-out shards (.tar) for the accuracy")
    p.add_argument("--out", required=True, help="output encoder file (.pt)")
    _add_torch_args(p)
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("features", help="encode one shard's centre views into a Zarr store of patch features",
                       description="Per shard: (N, T, D) float16 Zarr v3 array, chunked along N, attrs with "
                                   "encoder, weights sha256, block index, preprocessing and keys.")
    _add_config_args(p)
    p.add_argument("--shard", required=True, help="input shard (.tar)")
    p.add_argument("--out", required=True, help="output store (.zarr)")
    _add_torch_args(p, encoder=True)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("kmeans", help="faiss k-means on a seeded sample of patch vectors from feature stores",
                       description="Writes centroids.npy (K, D) float32 and centroids.json (every parameter, "
                                   "faiss version, sample hash, inertia per iteration, cluster sizes).")
    _add_config_args(p)
    p.add_argument("stores", nargs="+", help="feature stores (.zarr)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, help="CPU threads (torch)")
    p.set_defaults(func=cmd_kmeans)

    p = sub.add_parser("tokens", help="encode + assign one shard's views to token grids (N, V, h, w) uint16",
                       description="Fused encode-and-assign: no features are stored. Writes {shard}.npy and "
                                   "{shard}.json (keys, labels, crop parameters, provenance).")
    _add_config_args(p)
    p.add_argument("--shard", required=True, help="input shard (.tar)")
    p.add_argument("--centroids", required=True, help="centroids.npy from the kmeans stage")
    p.add_argument("--out", required=True, help="output token grids (.npy); the .json goes next to it")
    _add_torch_args(p, encoder=True)
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("train", help="train the stage-1 GPT on token shards (exact resume; DDP under torchrun)",
                       description="Trains the GPT over token grids. Resumes exactly from OUT_DIR/last.pt when it "
                                   "exists and the settings match. Under `torchrun --nproc_per_node N -m pipeline "
                                   "train ...` it runs DDP with the same global batch.")
    _add_config_args(p)
    p.add_argument("--tokens", nargs="+", required=True, help="token shards (.npy with .json sidecars)")
    p.add_argument("--context", nargs="+",
                   help="stage 2: the DiGIT token shards of the same images (one per --tokens shard, paired by "
                        "file name); uses the stage2.train settings")
    p.add_argument("--out-dir", required=True, help="checkpoint folder (last.pt, final.pt, metrics.jsonl/csv)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in total (resume later)")
    _add_torch_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-vq", help="train the tiny VQGAN tokenizer on the train shards (real runs load one)",
                       description="Trains the configured VQGAN (vq.preset + vq.model) with reconstruction + VQ "
                                   "losses on crop-sized views; test PSNR goes into the checkpoint and a .json "
                                   "sidecar. Fails below vq.train.min_test_psnr.")
    _add_config_args(p)
    p.add_argument("--train", nargs="+", required=True, help="training shards (.tar)")
    p.add_argument("--test", nargs="+", required=True, help="held-out shards (.tar) for the PSNR")
    p.add_argument("--out", required=True, help="output VQ file (.pt)")
    _add_torch_args(p)
    p.set_defaults(func=cmd_train_vq)

    p = sub.add_parser("vq-tokens", help="VQ token grids of one shard, for the same crops as its DiGIT tokens",
                       description="Reads the crops recorded in the DiGIT token shard's .json and writes VQ token "
                                   "grids (N, V, h, w) for exactly those views, so the two streams line up.")
    _add_config_args(p)
    p.add_argument("--shard", required=True, help="input shard (.tar)")
    p.add_argument("--digit-tokens", required=True, help="the shard's DiGIT token .json (crops, keys)")
    p.add_argument("--vq", help="VQ checkpoint (default: vq.checkpoint from the config)")
    p.add_argument("--out", required=True, help="output VQ token grids (.npy); the .json goes next to it")
    _add_torch_args(p)
    p.set_defaults(func=cmd_vq_tokens)

    p = sub.add_parser("render", help="token samples -> images (stage 2 + VQ decoder, or VQ decoder alone)",
                       description="With --stage2, the sample folder holds DiGIT token grids: stage 2 draws the VQ "
                                   "grid of each (top-p from stage2.sample, resumable parts), the VQGAN decodes it. "
                                   "Without, the grids are VQ tokens (the baseline) and are decoded directly. "
                                   "Writes images.npz (uint8 (n, H, W, 3) + labels), grid.png, images.json.")
    _add_config_args(p)
    p.add_argument("--samples", required=True, help="sample folder (tokens.npy, labels.npy, samples.json)")
    p.add_argument("--vq", required=True, help="VQ checkpoint that decodes")
    p.add_argument("--stage2", help="stage-2 checkpoint (DiGIT tokens -> VQ tokens)")
    p.add_argument("--out-dir", help="output folder (default: the sample folder)")
    _add_torch_args(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("sample", help="sample token grids from a stage-1 checkpoint (resumable, seeded per sample)",
                       description="Writes OUT_DIR/tokens.npy, labels.npy and samples.json. Sample i is seeded "
                                   "from (seed, i): results do not depend on batch size or process count.")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out-dir", required=True)
    _add_torch_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("probe", help="linear probe of every layer of a frozen stage-1 GPT",
                       description="Mean-pooled hidden states of every layer on train and test tokens, one "
                                   "linear classifier per layer; top-1 per layer and the best layer.")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", nargs="+", required=True, help="train token shards (.npy)")
    p.add_argument("--test", nargs="+", required=True, help="test token shards (.npy)")
    p.add_argument("--out", required=True, help="output probe.json")
    _add_torch_args(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("reference", help="Inception features + statistics of the real reference images (FID, P/R)",
                       description="View-0 crops of the first evaluate.n_reference images of the given shards -> "
                                   "OUT_DIR/stats.npz (mu, sigma), features.npy and reference.json (provenance).")
    _add_config_args(p)
    p.add_argument("--shards", nargs="+", required=True, help="shards of evaluate.reference_split (.tar)")
    p.add_argument("--out-dir", required=True)
    _add_torch_args(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("score", help="FID (IS with logits) and precision/recall of one sample set",
                       description="Scores images.npz against the reference folder (or evaluate.reference_stats "
                                   "for FID); writes a JSON with the figures and their provenance.")
    _add_config_args(p)
    p.add_argument("--images", required=True, help="images.npz from the render stage")
    p.add_argument("--reference", required=True, help="folder written by the reference command")
    p.add_argument("--out", required=True, help="output .json")
    _add_torch_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("stability", help="token-stability table (paper Table 1): DiGIT vs VQ tokens under noise",
                       description="Token change rate and cosine similarity of token embeddings when Gaussian noise "
                                   "at evaluate.stability_snrs dB is added to the images.")
    _add_config_args(p)
    p.add_argument("--shards", nargs="+", required=True, help="shards whose first images are used (.tar)")
    p.add_argument("--encoder", help="encoder weights (default: encoder.checkpoint)")
    p.add_argument("--centroids", required=True)
    p.add_argument("--vq", required=True, help="VQ checkpoint")
    p.add_argument("--out", required=True, help="output .json")
    _add_torch_args(p)
    p.set_defaults(func=cmd_stability)

    p = sub.add_parser("report", help="gather every figure into metrics.json and render report.html",
                       description="Reads the artifacts named by --input NAME=PATH (score_digit, score_vq, "
                                   "samples_digit, samples_vq, probe_digit, probe_vq, train_digit, train_vq, "
                                   "train_stage2, stability, vq, encoder), validates metrics.json against "
                                   "workflow/schemas/metrics.schema.yaml and writes report.html.")
    _add_config_args(p)
    p.add_argument("--input", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--metrics", required=True, help="output metrics.json")
    p.add_argument("--html", required=True, help="output report.html")
    p.set_defaults(func=cmd_report)

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
    except BrokenPipeError:  # e.g. `inspect ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
