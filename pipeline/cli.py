"""Command line: `python -m pipeline <stage> ...`. Every stage runs without Snakemake too.

The configuration comes from `--config FILE` (default configs/default.yaml unless `--json` is
given), then `--json` (a partial config as JSON, how Snakemake rules pass the sections a stage
depends on), then `--set key.sub=value`; it is validated against the schema before anything runs
(``config.load_config``). Each command is one row of ``COMMANDS`` (DAG order): its name, one line
of help, a description, its arguments and the stage function it calls.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

from .config import DEFAULT_CONFIG, ConfigError, load_config, load_schema
from .errors import StageFailed
from .settings import section


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict


def arg(*flags: str, **options) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str                                   # one line in `python -m pipeline --help`
    description: str
    run: Callable[[dict, argparse.Namespace], int | None]   # (validated config, arguments)
    args: tuple[Arg, ...] = ()
    config: bool = True                         # takes --config / --json / --set
    threads: bool = True                        # takes --threads


def shards_arg(name: str, what: str) -> Arg:
    return arg(name, nargs="+", required=True, help=what)


ENCODER_ARG = arg("--encoder", help="encoder weights (default: encoder.checkpoint from the config)")
OUT_ARG = arg("--out", required=True)


# -- what each command calls (stage modules are imported when their command runs) ----------------------

def run_init(c, a):
    from .init_config import init_stage
    init_stage(out=a.out, force=a.force, imagefolder=a.imagefolder, webdataset=a.webdataset,
               fashion_mnist=a.fashion_mnist, label_key=a.label_key, encoder_weights=a.encoder_weights,
               encoder_arch=a.encoder_arch, vq_weights=a.vq_weights, vq_preset=a.vq_preset, name=a.name, base=a.base)


def run_shards(c, a):
    from .shards import shards_stage
    shards_stage(c, out_root=a.out_root, progress=not a.quiet, verify=a.verify)


def run_train_encoder(c, a):
    from .tiny_encoder import train_encoder_stage
    train_encoder_stage(c, a.train, a.test, a.out, progress=not a.quiet)


def run_features(c, a):
    from .features import features_stage
    features_stage(c, a.shard, a.out, encoder_path=a.encoder, progress=not a.quiet)


def run_kmeans(c, a):
    from .kmeans import kmeans_stage
    kmeans_stage(c, a.stores, a.out_dir)


def run_tokens(c, a):
    from .tokens import tokens_stage
    tokens_stage(c, a.shard, a.centroids, a.out, encoder_path=a.encoder, progress=not a.quiet)


def run_train_vq(c, a):
    from .vq import train_vq_stage
    train_vq_stage(c, a.train, a.test, a.out, progress=not a.quiet)


def run_vq_tokens(c, a):
    from .vq import vq_tokens_stage
    vq_tokens_stage(c, a.shard, a.digit_tokens, a.out, vq_path=a.vq, progress=not a.quiet)


def run_train_kl(c, a):
    from .kl import train_kl_stage
    train_kl_stage(c, a.train, a.test, a.out, progress=not a.quiet)


def run_kl_latents(c, a):
    from .kl import kl_latents_stage
    kl_latents_stage(c, a.shard, a.digit_tokens, a.out, kl_path=a.kl, progress=not a.quiet)


def run_train(c, a):
    from .train import train_stage
    train_stage(c, a.tokens, a.out_dir, context=a.context, max_steps=a.max_steps, progress=not a.quiet,
                section=a.section)


# sampling settings section -> the training section whose device sampling uses
SAMPLE_SECTIONS = {"sample": "train", "maskgit.sample": "maskgit.train", "mar.sample": "mar.train",
                   "mar_causal.sample": "mar_causal.train"}
RENDER_SECTIONS = {"stage2.sample": "stage2.train", "stage2_nar.sample": "stage2_nar.train"}


def run_sample(c, a):
    from .sample import sample_stage
    device = section(c, SAMPLE_SECTIONS[a.section])["device"]
    sample_stage(a.checkpoint, a.out_dir, section(c, a.section), device=device, progress=not a.quiet)


def run_probe(c, a):
    from .probe import probe_stage
    probe_stage(a.checkpoint, sorted(a.train), sorted(a.test), a.out, c["probe"], device=c["train"]["device"],
                progress=not a.quiet)


def run_render(c, a):
    from .render import render_stage
    render_stage(a.samples, a.vq, a.out_dir, section(c, a.section), stage2_checkpoint=a.stage2,
                 device=section(c, RENDER_SECTIONS[a.section])["device"], progress=not a.quiet, vq_section=c["vq"])


def run_render_latents(c, a):
    from .render import render_latents_stage
    render_latents_stage(a.samples, a.kl, a.out_dir, batch_size=c["kl"]["batch_size"], device=c["kl"]["device"],
                         kl_section=c["kl"])


def run_reference(c, a):
    from .evaluate import reference_stage
    reference_stage(c, a.shards, a.out_dir, progress=not a.quiet)


def run_score(c, a):
    from .evaluate import score_stage
    score_stage(c, a.images, a.reference, a.out, progress=not a.quiet)


def run_stability(c, a):
    from .stability import stability_stage
    ev = c["evaluate"]
    stability_stage(c, a.encoder, a.centroids, a.vq, a.shards, a.out, n_images=ev["stability_images"],
                    seed=ev["seed"], snrs=ev["stability_snrs"], batch_size=c["encoder"]["batch_size"],
                    progress=not a.quiet)


def run_report(c, a):
    from .report import report_stage
    report_stage(c, a.input, a.metrics, a.html)


def run_inspect(c, a):
    from .artifacts import figures_markdown, format_summary, read_metrics, summarise
    if a.markdown:
        if a.as_json:
            raise ValueError("inspect: --markdown and --json exclude each other")
        print(figures_markdown(read_metrics(a.path)), end="")
        return
    summary = summarise(a.path, trust=a.trust)
    print(json.dumps(summary, indent=2) if a.as_json else format_summary(summary))


def inspect_description() -> str:
    from .artifacts import supported
    return ("Prints what an artifact holds: counts, shapes, codebook use, provenance. Reads: "
            f"{'; '.join(supported())}. Never runs code from a file: torch files load tensors and plain data only "
            "(weights_only=True) unless --trust. A damaged or unsupported file is one error line, exit status 2.")


def run_config(c, a):
    import yaml
    from .settings import output_settings, runtime_settings
    if a.schema:
        out = load_schema()
    elif a.settings:
        out = {"changes the output": output_settings(a.settings, c), "runtime only": runtime_settings(a.settings, c)}
    else:
        out = c
    print(yaml.safe_dump(out, sort_keys=False))


# -- the table, in DAG order -------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("init", "write a validated config for your own images (and DINOv2 / VQGAN weights)",
            "Writes a complete config for a dataset: the splits it has (training split: train, else the first; "
            "evaluation split: the first of test / val / validation, else the last), its class count, model sizes "
            "from --base, and either the given weights (checked to exist, not loaded) or the tiny encoder and VQGAN "
            "the DAG trains. Validated before it is written; every top-level section carries a comment.", run_init,
            (arg("--imagefolder", metavar="PATH", help="ImageFolder: PATH/<split>/<class>/<images>"),
             arg("--webdataset", metavar="PATH", help="WebDataset tars: PATH/<split>/*.tar"),
             arg("--fashion-mnist", nargs="?", const="", metavar="PATH",
                 help="Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)"),
             arg("--label-key", default="cls", help="webdataset: member extension holding the label (default: cls)"),
             arg("--encoder-weights", metavar="FILE", help="official DINOv2 .pth (default: train the tiny encoder)"),
             arg("--encoder-arch", help="arch of --encoder-weights (default: dinov2_vitb14_reg4)"),
             arg("--vq-weights", metavar="FILE", help="taming-format VQGAN .ckpt (default: train the tiny VQGAN)"),
             arg("--vq-preset", help="architecture of --vq-weights (default: mage_vqgan)"),
             arg("--name", help="dataset and run name (default: the dataset folder's name, made safe)"),
             arg("--base", default="tiny", choices=("tiny", "imagenet_base", "imagenet_large"),
                 help="model sizes: tiny (configs/default.yaml, CPU demo) or the paper's (configs/imagenet_*.yaml)"),
             arg("--out", metavar="FILE", help="write here (atomically) instead of printing"),
             arg("--force", action="store_true", help="overwrite an existing --out file")),
            config=False, threads=False),
    Command("shards", "image source -> WebDataset shards + manifest.parquet",
            "Read the configured source (Fashion-MNIST idx, ImageFolder, or WebDataset tars) and write "
            "shards/{dataset}/{split}-{i:06d}.tar, manifest.parquet and dataset.json. Up-to-date shards are kept, "
            "so an interrupted run resumes; damaged tars (size, or sha256 when the mtime changed or with --verify) "
            "are rewritten and reported.", run_shards,
            (arg("--out-root", default="shards", help="folder that holds one subfolder per dataset (default: shards)"),
             arg("--verify", action="store_true",
                 help="hash every existing tar (not only those whose size or mtime changed) and rewrite the damaged "
                      "ones")),
            threads=False),
    Command("train-encoder", "train the tiny default encoder (a small timm ViT) on the train shards",
            "Supervised training of a small timm ViT on the training shards; held-out accuracy goes into the "
            "checkpoint metadata and a .json sidecar. Fails below encoder.train.min_test_accuracy.", run_train_encoder,
            (shards_arg("--train", "training shards (.tar)"),
             shards_arg("--test", "held-out shards (.tar) for the accuracy"),
             arg("--out", required=True, help="output encoder file (.pt)"))),
    Command("features", "one shard's views -> a Zarr store of patch features (k-means sample)",
            "Per shard: (N, T, D) float16 Zarr v3 array, chunked along N, attrs with encoder, weights sha256, "
            "block index, preprocessing and keys.", run_features,
            (arg("--shard", required=True, help="input shard (.tar)"),
             arg("--out", required=True, help="output store (.zarr)"), ENCODER_ARG)),
    Command("kmeans", "faiss k-means on a seeded sample of patch vectors -> centroids.npy",
            "Writes centroids.npy (K, D) float32 and centroids.json (every parameter, faiss version, sample hash, "
            "inertia per iteration, cluster sizes).", run_kmeans,
            (arg("stores", nargs="+", help="feature stores (.zarr)"), arg("--out-dir", required=True))),
    Command("tokens", "encode + assign one shard's views -> DiGIT token grids (N, V, h, w)",
            "Fused encode-and-assign: no features are stored. Writes {shard}.npy and {shard}.json (keys, labels, "
            "crop parameters, provenance).", run_tokens,
            (arg("--shard", required=True, help="input shard (.tar)"),
             arg("--centroids", required=True, help="centroids.npy from the kmeans stage"),
             arg("--out", required=True, help="output token grids (.npy); the .json goes next to it"), ENCODER_ARG)),
    Command("train-vq", "train the tiny VQGAN tokenizer on the train shards (real runs load one)",
            "Trains the configured VQGAN (vq.preset + vq.model) with reconstruction + VQ losses on crop-sized "
            "views; test PSNR goes into the checkpoint and a .json sidecar. Fails below vq.train.min_test_psnr.",
            run_train_vq,
            (shards_arg("--train", "training shards (.tar)"),
             shards_arg("--test", "held-out shards (.tar) for the PSNR"),
             arg("--out", required=True, help="output VQ file (.pt)"))),
    Command("vq-tokens", "VQ token grids of one shard, for the same crops as its DiGIT tokens",
            "Reads the crops recorded in the DiGIT token shard's .json and writes VQ token grids (N, V, h, w) for "
            "exactly those views, so the two streams line up.", run_vq_tokens,
            (arg("--shard", required=True, help="input shard (.tar)"),
             arg("--digit-tokens", required=True, help="the shard's DiGIT token .json (crops, keys)"),
             arg("--vq", help="VQ checkpoint (default: vq.checkpoint from the config)"),
             arg("--out", required=True, help="output VQ token grids (.npy); the .json goes next to it"))),
    Command("train-kl", "train the tiny KL autoencoder (MAR's continuous tokenizer) on the train shards",
            "Trains the configured KL autoencoder (kl.preset + kl.model) with reconstruction + a small KL term on "
            "crop-sized views; test PSNR and the latent scale go into the checkpoint and a .json sidecar. Fails "
            "below kl.train.min_test_psnr. Real runs load MAR's kl16.ckpt (kl.checkpoint) instead.", run_train_kl,
            (shards_arg("--train", "training shards (.tar)"),
             shards_arg("--test", "held-out shards (.tar) for the PSNR"),
             arg("--out", required=True, help="output KL file (.pt)"))),
    Command("kl-latents", "KL posterior latents of one shard, for the same crops as its DiGIT tokens",
            "Reads the crops recorded in the DiGIT token shard's .json and writes the posterior mean and "
            "log-variance (N, V, h, w, 2C) float16 for exactly those views (MAR's cached latents).", run_kl_latents,
            (arg("--shard", required=True, help="input shard (.tar)"),
             arg("--digit-tokens", required=True, help="the shard's DiGIT token .json (crops, keys)"),
             arg("--kl", help="KL checkpoint (default: kl.checkpoint from the config)"),
             arg("--out", required=True, help="output latents (.npy); the .json goes next to it"))),
    Command("train", "train a generator: a GPT (stage 1, AR stage 2), MaskGIT (NAR stage 2, baseline) or MAR "
                     "(masked or causal, over KL latents)",
            "Trains the model of the --section settings with the generic trainer: train (GPT), "
            "stage2.train (GPT after the DiGIT grid), stage2_nar.train (mask-predict given the DiGIT grid), "
            "maskgit.train (mask-predict, the MaskGIT baseline), mar.train and mar_causal.train (MAR and its "
            "causal variant with the diffusion loss, on kl-latents shards). Resumes exactly from OUT_DIR/last.pt when it "
            "exists and the settings match. Under `torchrun --nproc_per_node N -m pipeline train ...` it runs DDP "
            "with the same global batch.", run_train,
            (shards_arg("--tokens", "token (or KL latent) shards (.npy with .json sidecars)"),
             arg("--context", nargs="+", help="stage 2: the DiGIT token shards of the same images (one per --tokens "
                                              "shard, paired by file name)"),
             arg("--section", choices=("train", "stage2.train", "stage2_nar.train", "maskgit.train", "mar.train",
                                       "mar_causal.train"),
                 help="settings section (default: train, or stage2.train with --context)"),
             arg("--out-dir", required=True, help="checkpoint folder (last.pt, final.pt, metrics.jsonl/csv)"),
             arg("--max-steps", type=int, help="stop after this many steps in total (resume later)"))),
    Command("sample", "sample from a trained generator: token grids (GPT, MaskGIT) or KL latents (MAR)",
            "Writes OUT_DIR/tokens.npy (latents.npy for MAR), labels.npy and samples.json. Sample i is seeded "
            "from (seed, i): results do not depend on batch size or process count. The checkpoint's family picks "
            "the sampler: KV-cache autoregression (GPT), iterative mask-predict decoding (MaskGIT), MAR's cosine "
            "schedule of random-order steps or its causal variant, each token drawn by the diffusion head.",
            run_sample,
            (arg("--checkpoint", required=True), arg("--out-dir", required=True),
             arg("--section", choices=tuple(SAMPLE_SECTIONS), default="sample",
                 help="sampling settings: sample (GPT), maskgit.sample, mar.sample or mar_causal.sample"))),
    Command("probe", "linear probe of every layer of a frozen stage-1 GPT",
            "Mean-pooled hidden states of every layer on train and test tokens, one linear classifier per layer; "
            "top-1 per layer and the best layer.", run_probe,
            (arg("--checkpoint", required=True), shards_arg("--train", "train token shards (.npy)"),
             shards_arg("--test", "test token shards (.npy)"), arg("--out", required=True, help="output probe.json"))),
    Command("render", "token samples -> images (stage 2 + VQ decoder, or VQ decoder alone)",
            "With --stage2, the sample folder holds DiGIT token grids: stage 2 draws the VQ grid of each (the AR "
            "stage 2 with stage2.sample, the NAR one with stage2_nar.sample; resumable parts), the VQGAN decodes "
            "it. Without, the grids are VQ tokens (VQ GPT, MaskGIT) and are decoded directly. Writes images.npz "
            "(uint8 (n, H, W, 3) + labels), grid.png, images.json.",
            run_render,
            (arg("--samples", required=True, help="sample folder (tokens.npy, labels.npy, samples.json)"),
             arg("--vq", required=True, help="VQ checkpoint that decodes"),
             arg("--stage2", help="stage-2 checkpoint (DiGIT tokens -> VQ tokens)"),
             arg("--section", choices=tuple(RENDER_SECTIONS), default="stage2.sample",
                 help="stage-2 sampling settings: stage2.sample (AR) or stage2_nar.sample (NAR)"),
             arg("--out-dir", help="output folder (default: the sample folder)"))),
    Command("render-latents", "KL latent samples (MAR families) -> images through the KL decoder",
            "Divides latents.npy by the latent scale the generator was trained with and decodes it with the KL "
            "autoencoder that made its training latents (checked by sha256). Writes images.npz, grid.png and "
            "images.json.", run_render_latents,
            (arg("--samples", required=True, help="sample folder (latents.npy, labels.npy, samples.json)"),
             arg("--kl", required=True, help="KL checkpoint that decodes"),
             arg("--out-dir", help="output folder (default: the sample folder)"))),
    Command("reference", "Inception features + statistics of the real reference images (FID, P/R)",
            "View-0 crops of the first evaluate.n_reference images of the given shards -> OUT_DIR/stats.npz (mu, "
            "sigma), features.npy and reference.json (provenance).", run_reference,
            (shards_arg("--shards", "shards of evaluate.reference_split (.tar)"), arg("--out-dir", required=True))),
    Command("score", "FID (IS with logits) and precision/recall of one sample set",
            "Scores images.npz against the reference folder (or evaluate.reference_stats for FID); writes a JSON "
            "with the figures and their provenance.", run_score,
            (arg("--images", required=True, help="images.npz from the render stage"),
             arg("--reference", required=True, help="folder written by the reference command"),
             arg("--out", required=True, help="output .json"))),
    Command("stability", "token-stability table (paper Table 1): DiGIT vs VQ tokens under noise",
            "Token change rate and cosine similarity of token embeddings when Gaussian noise at "
            "evaluate.stability_snrs dB is added to the images.", run_stability,
            (shards_arg("--shards", "shards whose first images are used (.tar)"), ENCODER_ARG,
             arg("--centroids", required=True), arg("--vq", required=True, help="VQ checkpoint"),
             arg("--out", required=True, help="output .json"))),
    Command("report", "gather every figure into metrics.json and render report.html",
            "Reads the artifacts named by --input NAME=PATH: score_ROW and samples_ROW (the stage-1 samples.json) "
            "for every ROW of the config's generators (digit, digit_nar, vq, maskgit), probe_digit, probe_vq, "
            "train_NAME (train.json of digit, vq, stage2, stage2_nar, maskgit: those given), stability, vq, "
            "encoder; validates metrics.json against pipeline/schemas/metrics.schema.yaml and writes "
            "report.html.", run_report,
            (arg("--input", action="append", required=True, metavar="NAME=PATH"),
             arg("--metrics", required=True, help="output metrics.json"),
             arg("--html", required=True, help="output report.html")), threads=False),
    Command("inspect", "summarise an artifact (shard, manifest, features, tokens, checkpoint, samples, ...)",
            inspect_description(), run_inspect,
            (arg("path"), arg("--json", dest="as_json", action="store_true", help="print JSON instead of text"),
             arg("--markdown", action="store_true", help="metrics.json only: print its figures as a Markdown table"),
             arg("--trust", action="store_true", help="load a .pt/.pth/.ckpt with weights_only=False, which runs any "
                 "code pickled inside it: only for files from a source you trust")),
            config=False, threads=False),
    Command("config", "print the validated config with defaults filled in (or the schema, or a stage's settings)",
            "Prints the configuration every stage would see, the schema that documents every key (--schema), or "
            "which settings change a stage's output and which do not (--settings STAGE).", run_config,
            (arg("--schema", action="store_true", help="print the schema that documents every key"),
             arg("--settings", metavar="STAGE", help="the settings that change STAGE's output, and the runtime ones")),
            threads=False),
)


def _add_common(p: argparse.ArgumentParser, command: Command) -> None:
    if command.config:
        p.add_argument("--config", help=f"YAML config file (default: {DEFAULT_CONFIG} unless --json is given)")
        p.add_argument("--json", action="append",
                       help="partial config as JSON, merged over the file (repeatable; used by Snakemake rules)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one key, e.g. --set shards.samples_per_shard=500 (repeatable)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    if command.threads:
        p.add_argument("--threads", type=int, help="CPU threads for torch and faiss")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="DiGIT pipeline stages, in DAG order. Usually run through Snakemake (see README); every stage "
                    "also runs alone with a config file. `python -m pipeline COMMAND --help` explains one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        for a in command.args:
            p.add_argument(*a.flags, **a.options)
        _add_common(p, command)
        p.set_defaults(command_row=command)
    return parser


def config_of(args) -> dict:
    path = args.config or (None if args.json else DEFAULT_CONFIG)
    return load_config(path, args.set, fragments=args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.command_row
    try:
        config = config_of(args) if command.config else {}
        if command.threads and args.threads:
            from .devices import set_threads
            set_threads(args.threads)
        return command.run(config, args) or 0
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `inspect ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
