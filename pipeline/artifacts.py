"""`python -m pipeline inspect PATH`: summarise any artifact of the pipeline.

Each summariser returns a JSON-able dict; `format_summary` prints it for people (a list of flat
rows with the same keys, e.g. the figures of a metrics.json, as an aligned table). Later stages
register their artifact kinds with `@summariser(predicate, what)`; `supported()` lists the ``what``
of each (shown in ``inspect --help`` and when a file is not supported). (The module is called
`artifacts`, not `inspect`, so that it does not shadow the standard library's `inspect`.)

Nothing is unpickled that could run code: torch files load with ``weights_only=True`` unless
``summarise(..., trust=True)`` (``inspect --trust``). A damaged file is a ValueError naming it.
"""
from __future__ import annotations

import collections
import contextvars
import io
import json
import math
import sys
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from .io import UntrustedPickle, check_torch_file, load_torch

_SUMMARISERS: list[tuple[Callable[[Path], bool], Callable[[Path], dict], str]] = []
_TRUST = contextvars.ContextVar("trust_pickles", default=False)   # set by summarise(trust=...)


def summariser(predicate: Callable[[Path], bool], what: str):
    """Register ``fn(path) -> dict`` for the paths ``predicate`` accepts; ``what`` names them in help."""
    def register(fn):
        _SUMMARISERS.append((predicate, fn, what))
        return fn
    return register


def supported() -> list[str]:
    """What ``inspect`` reads, one phrase per registered summariser, in the order they are tried."""
    return [what for _, _, what in _SUMMARISERS]


def summarise(path: str | Path, trust: bool = False) -> dict:
    """The summary of the artifact at ``path``; ValueError naming it when it is damaged or unsupported.
    ``trust``: load torch files with ``weights_only=False`` (runs any code in them; warns on stderr)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    token = _TRUST.set(trust)
    try:
        for predicate, fn, what in _SUMMARISERS:
            if _guarded(predicate, path, what):
                return {"path": str(path), **_guarded(fn, path, what)}
    finally:
        _TRUST.reset(token)
    raise ValueError(f"{path}: don't know how to inspect this; supported: {'; '.join(supported())}")


def _guarded(fn: Callable, path: Path, what: str):
    """``fn(path)``, with any failure turned into one ValueError naming ``path`` and ``what`` it is."""
    try:
        return fn(path)
    except Exception as e:  # noqa: BLE001 - whatever a broken file makes a reader raise
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise   # already names the file
        raise ValueError(f"{path}: damaged or unreadable {what} ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def format_summary(summary: dict, indent: int = 0) -> str:
    """The summary for people: one ``key: value`` line each (long values cut at 300 characters),
    nested mappings indented, and tables (lists of flat rows, ``is_table``) in full, aligned."""
    lines = []
    pad = "  " * indent
    for key, value in summary.items():
        if is_table(value):
            lines.append(f"{pad}{key}:")
            lines += [f"{pad}  {line}" for line in table_lines(value)]
        elif isinstance(value, dict) and value and len(json.dumps(value)) > 100:
            lines.append(f"{pad}{key}:")
            lines.append(format_summary(value, indent + 1))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            if len(text) > 300:
                text = text[:297] + "..."
            lines.append(f"{pad}{key}: {text}")
    return "\n".join(lines)


def is_table(value) -> bool:
    """A non-empty list of rows (mappings) with the same keys and plain values only."""
    return (isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)
            and all(list(row) == list(value[0]) for row in value)
            and not any(isinstance(v, (dict, list)) for row in value for v in row.values()))


def format_value(value) -> str:
    """A number for people: a float with 2 decimals from 10 up (an FID: 12.35), else 4 significant
    digits (0.7771); None is '-'."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4g}"
    return str(value)


def _numeric(column: list) -> bool:
    values = [v for v in column if v is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _whole(column: list) -> bool:
    """Numbers that are all whole (a column of counts, seeds, top-k: printed without decimals)."""
    return _numeric(column) and all(v is None or (math.isfinite(v) and float(v).is_integer()) for v in column)


def table_lines(rows: list[dict]) -> list[str]:
    """``rows`` as a header line and one line per row: columns aligned, numbers right-aligned, never cut."""
    keys = list(rows[0])
    whole = [_whole([row[k] for row in rows]) for k in keys]
    cells = [[format_value(int(row[k]) if w and row[k] is not None else row[k]) for k, w in zip(keys, whole)]
             for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    right = [_numeric([row[k] for row in rows]) for k in keys]

    def line(texts):
        return "  ".join(t.rjust(w) if r else t.ljust(w) for t, w, r in zip(texts, widths, right)).rstrip()
    return [line(keys), *(line(c) for c in cells)]


def histogram(values) -> dict:
    counts = collections.Counter(values)
    return {str(k): counts[k] for k in sorted(counts)}


# ---------------------------------------------------------------- shards

@summariser(lambda p: p.is_file() and p.suffix == ".tar", "shard .tar")
def summarise_shard(path: Path) -> dict:
    from PIL import Image
    check_tar_end(path)
    keys, labels, sizes, exts = [], [], collections.Counter(), collections.Counter()
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if ext == "cls":
                labels.append(int(tar.extractfile(info).read()))
            elif ext in ("png", "jpg", "jpeg", "webp"):
                keys.append(key)
                exts[ext] += 1
                with Image.open(io.BytesIO(tar.extractfile(info).read())) as img:
                    sizes[f"{img.width}x{img.height} {img.mode}"] += 1
    return {
        "kind": "webdataset shard", "samples": len(keys), "bytes": path.stat().st_size,
        "first_keys": keys[:5], "last_key": keys[-1] if keys else None,
        "formats": dict(exts), "image_sizes": dict(sizes), "label_histogram": histogram(labels),
    }


def check_tar_end(path: Path) -> None:
    """ValueError unless the tar ends with its end-of-archive marker (two zero blocks): a tar cut at a
    member boundary reads without error, one member short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or len(tail) < 1024 or tail.count(0) != 1024:
        raise ValueError(f"{path}: truncated tar ({size} bytes, no end-of-archive marker)")


@summariser(lambda p: p.is_file() and p.name.endswith(".parquet"), "manifest .parquet")
def summarise_manifest(path: Path) -> dict:
    import pyarrow.parquet as pq
    table = pq.read_table(path).to_pydict()
    splits = collections.Counter(table.get("split", []))
    out = {"kind": "manifest", "rows": len(next(iter(table.values()), [])), "columns": list(table),
           "rows_per_split": dict(sorted(splits.items()))}
    if "label" in table:
        out["label_histogram"] = histogram(table["label"])
    if "width" in table:
        out["image_sizes"] = histogram(f"{w}x{h}" for w, h in zip(table["width"], table["height"]))
    return out


@summariser(lambda p: p.is_dir() and (p / "dataset.json").is_file(), "dataset folder with dataset.json")
def summarise_dataset(path: Path) -> dict:
    meta = json.loads((path / "dataset.json").read_text())
    return {"kind": "sharded dataset", "name": meta["name"], "source": meta["source"], "path_in": meta["path"],
            "classes": meta["classes"],
            "splits": {s: {"samples": v["samples"], "shards": len(v["shards"])} for s, v in meta["splits"].items()},
            "skipped": meta["num_skipped"], "skipped_files": [s["source"] for s in meta["skipped"]][:20],
            "settings": meta["settings"]}


# ---------------------------------------------------------------- tokenizer artifacts

@summariser(lambda p: p.is_dir() and p.suffix == ".zarr", "feature store .zarr")
def summarise_zarr(path: Path) -> dict:
    import zarr
    arr = zarr.open_array(str(path), mode="r")
    attrs = dict(arr.attrs)
    enc = attrs.get("encoder", {})
    out = {"kind": "feature store (zarr)", "shape": list(arr.shape), "dtype": str(arr.dtype),
           "chunks": list(arr.chunks), "images": len(attrs.get("keys", [])), "first_keys": attrs.get("keys", [])[:3],
           "encoder": {k: enc.get(k) for k in ("arch", "block_index", "depth", "grid", "weights_sha256",
                                                 "checkpoint_format")},
           "view": attrs.get("view"), "preprocessing": attrs.get("preprocessing"), "shard": attrs.get("shard")}
    if arr.shape[0]:
        first = np.asarray(arr[: min(64, arr.shape[0])], dtype=np.float32)
        out["sample_stats"] = {"mean": float(first.mean()), "std": float(first.std()),
                               "mean_norm": float(np.linalg.norm(first, axis=-1).mean())}
    return out


def codebook_stats(tokens: np.ndarray, k: int | None) -> dict:
    counts = np.bincount(tokens.reshape(-1).astype(np.int64), minlength=k or 0)
    p = counts[counts > 0] / counts.sum()
    top = np.argsort(counts)[::-1][:10]
    return {"codebook_size": int(k or counts.size), "codes_used": int((counts > 0).sum()),
            "usage": round(float((counts > 0).sum()) / max(1, k or counts.size), 4),
            "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2),
            "top_tokens": {str(int(t)): int(counts[t]) for t in top if counts[t] > 0}}


def _is_token_shard(p: Path) -> bool:
    sidecar = p.with_suffix(".json")
    if not (p.is_file() and p.suffix == ".npy" and sidecar.is_file()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError as e:
        raise ValueError(f"{p}: its sidecar {sidecar.name} is not valid JSON ({e})") from e
    return isinstance(meta, dict) and meta.get("stage") in ("tokens", "vq_tokens", "kl_latents")


@summariser(_is_token_shard, "token or KL latent shard .npy with its .json")
def summarise_tokens(path: Path) -> dict:
    grids = np.load(path, mmap_mode="r")
    meta = json.loads(path.with_suffix(".json").read_text())
    if not np.issubdtype(grids.dtype, np.integer):
        return summarise_latents(grids, meta)
    return {"kind": "token shard", "shape": list(grids.shape), "layout": meta["layout"], "dtype": str(grids.dtype),
            "images": len(meta["keys"]), "first_keys": meta["keys"][:3], "label_histogram": histogram(meta["labels"]),
            "views": meta["views"], "centroids_sha256": meta.get("centroids_sha256"),
            **codebook_stats(np.asarray(grids), meta.get("codebook_size"))}


def summarise_latents(latents: np.ndarray, meta: dict) -> dict:
    """A KL latent shard (N, V, h, w, 2C): posterior means and log-variances per channel."""
    c = latents.shape[-1] // 2
    flat = np.asarray(latents[:, 0], dtype=np.float64).reshape(-1, 2 * c)   # view 0 is enough for a summary
    return {"kind": "KL latent shard (posterior mean, log-variance)", "shape": list(latents.shape),
            "layout": meta.get("layout"), "dtype": str(latents.dtype), "images": len(meta["keys"]),
            "first_keys": meta["keys"][:3], "label_histogram": histogram(meta["labels"]), "views": meta["views"],
            "latent_scale": meta.get("latent_scale"), "kl_checkpoint_sha256": meta.get("kl_checkpoint_sha256"),
            "mean_std_per_channel": np.round(flat[:, :c].std(0), 4).tolist(),
            "posterior_std_mean": round(float(np.exp(0.5 * flat[:, c:]).mean()), 4)}


@summariser(lambda p: p.is_file() and p.name == "centroids.npy", "centroids.npy")
def summarise_centroids(path: Path) -> dict:
    c = np.load(path)
    out = {"kind": "k-means centroids", "shape": list(c.shape), "dtype": str(c.dtype),
           "norm_mean": float(np.linalg.norm(c, axis=1).mean())}
    meta_path = path.with_suffix(".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        sizes = np.asarray(meta.get("cluster_sizes", []))
        out.update(meta.get("params", {}))
        out.update({k: meta[k] for k in ("faiss_version", "gpu_used", "n_train", "n_iterations_run",
                                         "n_empty_clusters", "inertia") if k in meta})
        obj = meta.get("obj_per_iteration") or []
        if obj:
            out["objective_first_last"] = [obj[0], obj[-1]]
        if sizes.size:
            out["cluster_size_min_median_max"] = [int(sizes.min()), int(np.median(sizes)), int(sizes.max())]
    return out


# ---------------------------------------------------------------- checkpoints and samples

def _load_torch_file(path: Path):
    """Tensors and plain data only; with trust (``inspect --trust``) anything, after a warning."""
    if not _TRUST.get():
        try:
            return load_torch(path)
        except UntrustedPickle as e:
            raise UntrustedPickle(f"{e}; `inspect --trust` loads it anyway, running any code inside: "
                                  "only for files from a source you trust") from None
    import torch
    print(f"warning: --trust: unpickling {path} with weights_only=False; any code inside it runs",
          file=sys.stderr, flush=True)
    check_torch_file(path)
    return torch.load(path, map_location="cpu", weights_only=False)


@summariser(lambda p: p.is_file() and p.suffix in (".pt", ".pth", ".ckpt"), "checkpoint .pt/.pth/.ckpt")
def summarise_checkpoint(path: Path) -> dict:
    ckpt = _load_torch_file(path)
    if not isinstance(ckpt, dict):
        return {"kind": "torch file", "type": type(ckpt).__name__}
    state = next((v for v in (ckpt.get("model"), ckpt.get("state_dict")) if isinstance(v, dict) and v),
                 {k: v for k, v in ckpt.items() if hasattr(v, "shape")})
    params = sum(int(v.numel()) for v in state.values() if hasattr(v, "numel"))
    out = {"kind": f"checkpoint ({ckpt.get('format', 'state dict')})", "parameters": params,
           "tensors": len(state), "keys": sorted(ckpt)[:20]}
    if "family" in ckpt:
        out["family"] = ckpt["family"]
        if isinstance(ckpt.get("model_config"), dict):
            out["generator"] = generator_text(ckpt["family"], ckpt["model_config"])
    for key in ("arch", "step", "model_config", "model_kwargs", "data_position"):
        if key in ckpt:
            out[key] = ckpt[key]
    meta = ckpt.get("meta")
    if isinstance(meta, dict):
        out["meta"] = {k: v for k, v in meta.items() if k in ("test_accuracy", "objective", "num_classes", "seconds")}
    if ckpt.get("ema") is not None:
        out["ema"] = True
    return out


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "cfg_scale", "iterations", "choice_temperature", "num_iter",
                 "num_sampling_steps", "clip_x0", "cfg_schedule", "seed")


def generator_text(family: str, mc: dict) -> str:
    """One line on a trained generator: what it is, its size and what it predicts."""
    what = {"gpt": "causal GPT", "maskgit": "mask-predict transformer (MaskGIT, bidirectional)"}.get(family, family)
    grid = "x".join(str(g) for g in mc.get("grid", []))
    if family in ("mar", "mar_causal"):
        return latent_generator_text(family, mc, grid)
    ctx = mc.get("context_grid") or [0, 0]
    context = (f" given a {ctx[0]}x{ctx[1]} context grid of {mc.get('context_vocab_size')} codes (stage 2)"
               if ctx[0] * ctx[1] else "")
    cond = f", {mc['num_classes']} classes" if mc.get("num_classes") else ", unconditional"
    return (f"{what}: {mc.get('n_layer')} layers x {mc.get('n_embd')} wide, {grid} grid of {mc.get('vocab_size')} "
            f"codes{context}{cond}")


def latent_generator_text(family: str, mc: dict, grid: str) -> str:
    """generator_text for the MAR families (their configs name sizes differently from the GPT's)."""
    from .families import family as family_entry
    desc = family_entry(family).description.split(" (")[0]
    sizes = ", ".join(f"{k} {v}" for k, v in mc.items() if k not in ("grid", "token_dim", "num_classes")
                      and isinstance(v, int) and not isinstance(v, bool))
    cond = f", {mc['num_classes']} classes" if mc.get("num_classes") else ", unconditional"
    return f"{desc}: {sizes}; {grid} grid of {mc.get('token_dim')}-channel latents{cond}"


@summariser(lambda p: p.is_dir() and (p / "samples.json").is_file(), "sample folder with samples.json")
def summarise_samples(path: Path) -> dict:
    if (path / "latents.npy").is_file():
        return summarise_latent_samples(path)
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    labels = np.load(path / "labels.npy")
    meta = json.loads((path / "samples.json").read_text())
    out = {"kind": "sampled token grids", "family": meta.get("family", "gpt"), "shape": list(tokens.shape),
           "dtype": str(tokens.dtype), "label_histogram": histogram(labels.tolist()),
           "sampling": {k: v for k, v in meta.items() if k in SAMPLING_KEYS},
           **codebook_stats(np.asarray(tokens), meta.get("vocab_size"))}
    if (path / "images.npz").is_file():
        out["images"] = summarise_images(path / "images.npz")
    return out


def summarise_latent_samples(path: Path) -> dict:
    """A MAR-family sample folder: continuous latents (n, h, w, C) and per-channel statistics."""
    latents = np.load(path / "latents.npy", mmap_mode="r")
    labels = np.load(path / "labels.npy")
    meta = json.loads((path / "samples.json").read_text())
    flat = np.asarray(latents, dtype=np.float64).reshape(-1, latents.shape[-1])
    out = {"kind": "sampled KL latents (scaled, as the generator models them)", "family": meta.get("family"),
           "shape": list(latents.shape), "dtype": str(latents.dtype), "label_histogram": histogram(labels.tolist()),
           "sampling": {k: v for k, v in meta.items() if k in SAMPLING_KEYS},
           "channel_mean": np.round(flat.mean(0), 4).tolist() if len(flat) else [],
           "channel_std": np.round(flat.std(0), 4).tolist() if len(flat) else [],
           "finite": bool(np.isfinite(flat).all())}
    if (path / "images.npz").is_file():
        out["images"] = summarise_images(path / "images.npz")
    return out


@summariser(lambda p: p.is_dir() and (p / "images.npz").is_file(), "rendered sample folder with images.npz")
def summarise_rendered(path: Path) -> dict:
    """A folder of rendered images only (samples/digit_nar: the DiGIT samples through the NAR stage 2)."""
    out = {"kind": "rendered sample folder", "images": summarise_images(path / "images.npz")}
    if (path / "vq_tokens.npy").is_file():
        out["vq_tokens"] = list(np.load(path / "vq_tokens.npy", mmap_mode="r").shape)
    return out


@summariser(lambda p: p.is_file() and p.suffix == ".npz", ".npz arrays")
def summarise_images(path: Path) -> dict:
    """images.npz of the render stage (or any .npz: its arrays' shapes)."""
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z.files:
            return {"kind": "npz", "arrays": {k: [list(z[k].shape), str(z[k].dtype)] for k in z.files}}
        images = z["images"]
        labels = z["labels"] if "labels" in z.files else np.full(len(images), -1)
    out = {"kind": "rendered images", "shape": list(images.shape), "dtype": str(images.dtype),
           "pixel_mean": round(float(images.mean()), 2) if images.size else None,
           "pixel_std": round(float(images.std()), 2) if images.size else None,
           "label_histogram": histogram(labels.tolist())}
    meta_path = path.with_name("images.json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        out["route"] = meta.get("route")
        if meta.get("samples"):
            out["samples"] = meta["samples"]
        if meta.get("stage2_checkpoint"):
            out["stage2_checkpoint"] = meta["stage2_checkpoint"]
            out["stage2_sampling"] = {k: meta[k] for k in SAMPLING_KEYS if k in meta}
    return out


# ---------------------------------------------------------------- the report's metrics.json

METRICS_FORMAT = "digit-metrics-v1"   # evaluate.METRICS_FORMAT (compared, not imported: evaluate pulls in torch)


def _is_metrics(p: Path) -> bool:
    if not (p.is_file() and p.suffix == ".json"):
        return False
    try:
        content = json.loads(p.read_text())
    except ValueError:   # the .json summariser names the damage
        return False
    return isinstance(content, dict) and content.get("format") == METRICS_FORMAT


def read_metrics(path: str | Path) -> dict:
    """The content of a metrics.json (format digit-metrics-v1); ValueError naming ``path`` otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    if not _is_metrics(path):
        raise ValueError(f"{path}: not a metrics.json of the report (format {METRICS_FORMAT})")
    return json.loads(path.read_text())


def figure_rows(metrics: dict) -> list[dict]:
    """One row per figure, in the file's order: model, metric, value, N (images it was computed on)."""
    return [{"model": f["model"], "metric": f["metric"], "value": f["value"], "N": f.get("n_samples")}
            for f in metrics.get("figures", [])]


def figures_markdown(metrics: dict) -> str:
    """The figures of a metrics.json (its parsed content) as a Markdown table."""
    def cell(value) -> str:
        return format_value(value).replace("|", "\\|")
    lines = ["| model | metric | value | N |", "|---|---|--:|--:|"]
    lines += [f"| {' | '.join(cell(v) for v in row.values())} |" for row in figure_rows(metrics)]
    return "\n".join(lines) + "\n"


def probe_rows(metrics: dict) -> list[dict]:
    """Per model: the best layer, its top-1, and the test top-1 of every layer."""
    probe = metrics.get("tables", {}).get("probe") or {}
    return [{"model": model, "best_layer": t.get("best_layer"), "best_top1": t.get("best_top1"),
             "test top-1 by layer": " ".join(format_value(layer.get("test_acc")) for layer in t.get("layers", []))}
            for model, t in probe.items()]


def stability_rows(metrics: dict) -> list[dict]:
    """Per SNR: the token change rate and the cosine of each tokenizer."""
    rows = (metrics.get("tables", {}).get("stability") or {}).get("rows") or []
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in rows))
    snrs = list(dict.fromkeys(r["snr_db"] for r in rows))
    by = {(r["tokenizer"], r["snr_db"]): r for r in rows}
    return [{"snr_db": int(snr) if float(snr).is_integer() else snr,
             **{f"change {t}": by.get((t, snr), {}).get("change_rate") for t in tokenizers},
             **{f"cosine {t}": by.get((t, snr), {}).get("cosine") for t in tokenizers}} for snr in snrs]


@summariser(_is_metrics, f"report metrics.json ({METRICS_FORMAT})")
def summarise_metrics(path: Path) -> dict:
    m = json.loads(path.read_text())
    out = {"kind": "report metrics", "run": m.get("run"), "created": m.get("created"),
           "git_commit": m.get("git_commit"), "git_dirty": m.get("git_dirty"), "config_hash": m.get("config_hash"),
           "figures": figure_rows(m), "probe": probe_rows(m), "stability": stability_rows(m)}
    sweep = m.get("tables", {}).get("sweep")
    if sweep:
        out["sweep"] = sweep
    return out


@summariser(lambda p: p.is_file() and p.suffix == ".json", ".json sidecar")
def summarise_json(path: Path) -> dict:
    meta = json.loads(path.read_text())
    return {"kind": "json sidecar", "content": meta}


@summariser(lambda p: p.is_file() and p.suffix == ".npy", ".npy array")
def summarise_npy(path: Path) -> dict:
    arr = np.load(path, mmap_mode="r")
    return {"kind": "numpy array", "shape": list(arr.shape), "dtype": str(arr.dtype)}
