"""Render stage: sampled token grids -> pixels (DiGIT step 6, or the VQ-token generators), and
sampled KL latents -> pixels (the MAR families, ``render_latents_stage``).

DiGIT samples go through a stage 2 with the DiGIT grid as context that draws the VQ grid (the AR
GPT with top-p, or the NAR mask-predict model with its iterative decoding, as the stage-2
checkpoint's family says; resumable in parts under ``render/``, seeded per sample on a stream of
its own) and then the VQGAN decoder; VQ-token samples (VQ GPT, MaskGIT) are decoded directly.
Writes ``images.npz`` (uint8 (n, H, W, 3) + labels), ``grid.png`` (one row per class) and
``images.json`` (provenance).

Provenance, checked before any work: the VQ file must match the sha256 its ``.json`` records and
be the VQ checkpoint that made the VQ tokens the decoded grids' model was trained on (stage 2's,
or the VQ baseline's as samples.json records it); stage 2's context tokens must come from the
tokenizer (centroids, encoder) of the stage-1 model whose samples it renders. A record that is
absent (hand-made checkpoints and sample folders) is not checked.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoints import load_generator
from .devices import resolve_device
from .families import family
from .io import file_sha256, write_bytes_atomic, write_json_atomic, write_npy_atomic
from .provenance import Record, label, model_tokenizer, record_from_json, require_recorded_sha256, require_same
from .sample import SEED_RULE, gather_parts, params_hash, run_parts, sample_seed, sampling_keys
from .vq import load_configured_vq, load_vq, to_uint8

RENDER_SEED_OFFSET = 1 << 40   # stage-2 draws of sample i use sample_seed(seed, i) + this: a stream of their own
ROUTES = {"gpt": "DiGIT tokens -> AR stage 2 (VQ tokens) -> VQGAN decoder",
          "maskgit": "DiGIT tokens -> NAR stage 2 (mask-predict, VQ tokens) -> VQGAN decoder"}


def _decode(vq_model, grids: np.ndarray, batch_size: int, device) -> np.ndarray:
    """VQ token grids (n, h, w) -> uint8 images (n, H, W, 3) through the VQGAN decoder."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(grids), batch_size):
            ids = torch.from_numpy(grids[s:s + batch_size].astype(np.int64)).to(device)
            out.append(to_uint8(vq_model.decode_indices(ids)).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def require_vq(vq_checkpoint, vq_sha: str, record: Record, hint: str) -> None:
    """The VQ file decoding must be the one ``record`` (a model's tokenizer) says made its tokens."""
    if "vq_checkpoint_sha256" in record:
        shard, recorded = record["vq_checkpoint_sha256"]
        require_same("sha256", vq_checkpoint, vq_sha, shard, recorded, hint)


def check_stage2_provenance(src: Path, src_meta: dict, vq_checkpoint, vq_sha: str, stage2_checkpoint: str,
                            s2_meta: dict) -> None:
    """Stage 2 must have been trained on VQ tokens of ``vq_checkpoint``, and on context tokens of the
    tokenizer of the stage-1 model whose samples it renders (samples.json ``tokenizer``)."""
    s2_tok = model_tokenizer(s2_meta.get("token_files"))
    require_vq(vq_checkpoint, vq_sha, s2_tok,
               f"stage 2 ({stage2_checkpoint}) was trained on VQ tokens of another VQ checkpoint; decode with that "
               f"one, or retrain stage 2 on tokens of this one")
    samples_tok = record_from_json(src_meta.get("tokenizer"))
    for key in sorted((samples_tok.keys() & s2_tok.keys()) - {"vq_checkpoint_sha256"}):
        (s_file, s_value), (c_file, c_value) = samples_tok[key], s2_tok[key]
        require_same(label(key), f"{stage2_checkpoint} (context shard {c_file})", c_value,
                     f"{src / 'samples.json'} (shard {s_file} of its stage-1 model)", s_value,
                     "stage 2 was trained on DiGIT tokens of another tokenizer than the stage-1 model whose samples "
                     "it renders; train both on the same tokens")


def render_stage(samples_dir: str, vq_checkpoint: str, out_dir: str | None = None, render_cfg: dict | None = None,
                 *, stage2_checkpoint: str | None = None, device: str = "auto", progress: bool = True,
                 vq_section: dict | None = None) -> dict:
    """Turn the token grids of a sample folder into images (DiGIT step 6, or the VQ baseline).

    With ``stage2_checkpoint`` the grids are DiGIT tokens: stage 2 draws the VQ grid of every sample
    with its DiGIT grid as context (the settings of its family from ``render_cfg``: top-p for the AR
    GPT, iterations for the NAR model), then the VQGAN decodes it. Without, the grids already are
    VQ tokens (VQ GPT, MaskGIT) and are decoded directly. Writes ``images.npz`` (images (n, H, W, 3) uint8, labels), ``grid.png`` and
    ``images.json`` into ``out_dir`` (default: the sample folder); stage-2 work is resumable in parts
    under ``render/``. ``vq_section``: the config's ``vq`` section (needed for taming checkpoints)."""

    t_start = time.time()
    dev = resolve_device(device)
    src = Path(samples_dir)
    out = Path(out_dir) if out_dir else src
    render_cfg = dict(render_cfg or {})
    tokens = np.load(src / "tokens.npy")
    labels = np.load(src / "labels.npy")
    src_meta = json.loads((src / "samples.json").read_text())
    # a taming checkpoint needs the configured architecture; our own files carry theirs
    require_recorded_sha256(vq_checkpoint, "the VQ checkpoint was replaced or half-written; rerun the train-vq stage")
    vq_model = load_configured_vq(vq_section, vq_checkpoint)[0] if vq_section else load_vq(vq_checkpoint)[0]
    vq_model.to(dev).eval()
    vq_sha = file_sha256(vq_checkpoint)
    batch = int(render_cfg.get("batch_size", 64))
    meta = {"stage": "render", "samples": str(src), "samples_checkpoint_sha256": src_meta.get("checkpoint_sha256"),
            "vq_checkpoint": str(vq_checkpoint), "vq_checkpoint_sha256": vq_sha, "n": int(len(tokens)),
            "num_classes": src_meta.get("num_classes"), "device": str(dev)}
    if stage2_checkpoint is None:
        if tokens.max(initial=0) >= vq_model.codebook_size or tuple(tokens.shape[1:]) != (vq_model.grid_size,) * 2:
            raise ValueError(f"{src}/tokens.npy holds grids {tokens.shape[1:]} with ids up to {tokens.max()}: not "
                             f"tokens of the VQ model {vq_checkpoint} ({vq_model.grid_size}x{vq_model.grid_size}, "
                             f"{vq_model.codebook_size} codes); DiGIT tokens need --stage2")
        require_vq(vq_checkpoint, vq_sha, record_from_json(src_meta.get("tokenizer")),
                   f"the model whose samples these are ({src_meta.get('checkpoint')}) was trained on tokens of "
                   f"another VQ checkpoint; decode with that one")
        vq_grids = tokens
        meta["route"] = f"VQ tokens decoded directly ({src_meta.get('family', 'gpt')} over VQ tokens)"
    else:
        model, s2 = load_generator(str(stage2_checkpoint), ema=bool(render_cfg.get("ema", True)), device=dev)
        fam = family(s2["family"])
        c = model.config
        if c.context_len == 0:
            raise ValueError(f"{stage2_checkpoint} is not a stage-2 checkpoint (it has no context grid)")
        if tuple(tokens.shape[1:]) != c.context_grid or tokens.max(initial=0) >= c.context_vocab_size:
            raise ValueError(f"{src}/tokens.npy grids {tokens.shape[1:]} do not fit stage 2's context "
                             f"{c.context_grid} of {c.context_vocab_size} codes")
        if c.vocab_size != vq_model.codebook_size or c.grid != (vq_model.grid_size,) * 2:
            raise ValueError(f"stage 2 predicts {c.grid} grids of {c.vocab_size} codes, but {vq_checkpoint} "
                             f"has {vq_model.grid_size}x{vq_model.grid_size} and {vq_model.codebook_size} codes")
        check_stage2_provenance(src, src_meta, vq_checkpoint, vq_sha, str(stage2_checkpoint), s2)
        keys = sampling_keys(fam.name, render_cfg, str(stage2_checkpoint), drop=("cfg_scale",))
        params = {k: render_cfg[k] for k in keys}
        params.update(stage2_sha256=s2["sha256"], weights=s2["weights"], samples_sha256=file_sha256(src / "tokens.npy"),
                      seed_rule=f"{SEED_RULE}, plus {RENDER_SEED_OFFSET}")
        chunk = int(render_cfg.get("chunk", 1000))
        cond = c.num_classes > 0

        def make_part(start: int, stop: int) -> np.ndarray:
            ctx = torch.from_numpy(tokens[start:stop].reshape(stop - start, -1).astype(np.int64))
            part = labels[start:stop]   # -1 (unconditional samples) -> the null class
            lab = torch.from_numpy(np.where(part >= 0, part, model.null_class)) if cond else None
            seeds = [sample_seed(params["seed"] or 0, i) + RENDER_SEED_OFFSET for i in range(start, stop)]
            grids = fam.draw(model, stop - start, labels=lab, context=ctx, seeds=seeds, cfg=params,
                             batch_size=batch)
            return grids.cpu().numpy().astype(np.uint16).reshape(-1, *c.grid)

        run = run_parts(out / "render", labels, chunk, params_hash(params), make_part, progress=progress,
                        desc=f"stage 2 ({fam.name}) {out.name}")
        if not run["complete"]:
            return run
        vq_grids = gather_parts(out / "render", labels, chunk)
        write_npy_atomic(out / "vq_tokens.npy", vq_grids)
        meta.update(route=ROUTES[fam.name], stage2_family=fam.name, stage2_checkpoint=str(stage2_checkpoint),
                    stage2_checkpoint_sha256=s2["sha256"], stage2_step=s2["step"], **params,
                    stage2_seconds_this_run=round(run["seconds"], 3))
    images = _decode(vq_model, vq_grids, batch, dev)
    write_images(out, images, labels)
    meta.update(shape=list(images.shape), dtype="uint8", seconds=round(time.time() - t_start, 3),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomic(out / "images.json", meta)
    print(f"[render] {len(images)} images {images.shape[1]}x{images.shape[2]} -> {out}/images.npz", file=sys.stderr)
    return meta


def render_latents_stage(samples_dir: str, kl_checkpoint: str, out_dir: str | None = None, *, batch_size: int = 64,
                         device: str = "auto", kl_section: dict | None = None) -> dict:
    """Decode the KL latents of a MAR-family sample folder (``latents.npy``, in the generator's scaled
    space) into images: divided by the latent scale the generator's training shards recorded, then
    through the KL decoder. The KL file must match its recorded sha256, be the one that made those
    shards, and have the same latent scale. Writes images.npz, grid.png and images.json."""
    from .kl import decode_latents, load_configured_kl, load_kl

    t_start = time.time()
    dev = resolve_device(device)
    src = Path(samples_dir)
    out = Path(out_dir) if out_dir else src
    latents = np.load(src / "latents.npy")
    labels = np.load(src / "labels.npy")
    src_meta = json.loads((src / "samples.json").read_text())
    require_recorded_sha256(kl_checkpoint, "the KL checkpoint was replaced or half-written; rerun the train-kl stage")
    kl_model, kl_meta = load_configured_kl(kl_section, kl_checkpoint)[:2] if kl_section else load_kl(kl_checkpoint)
    kl_sha = file_sha256(kl_checkpoint)
    record = record_from_json(src_meta.get("tokenizer"))
    hint = (f"the model whose samples these are ({src_meta.get('checkpoint')}) was trained on latents of another KL "
            f"checkpoint; decode with that one")
    if "kl_checkpoint_sha256" in record:
        require_same("sha256", kl_checkpoint, kl_sha, *record["kl_checkpoint_sha256"], hint)
    if "latent_scale" not in record:
        raise ValueError(f"{src / 'samples.json'} records no latent_scale for its latents: sample again from a "
                         f"model trained on kl-latents shards")
    scale_file, scale = record["latent_scale"]
    if kl_meta.get("latent_scale") is not None:
        require_same("latent_scale", kl_checkpoint, kl_meta["latent_scale"], scale_file, scale, hint)
    if latents.shape[1:3] != (kl_model.grid_size,) * 2 or latents.shape[3] != kl_model.latent_channels:
        raise ValueError(f"{src}/latents.npy holds {latents.shape[1:]} latents, but {kl_checkpoint} decodes "
                         f"{kl_model.grid_size}x{kl_model.grid_size}x{kl_model.latent_channels}")
    images = decode_latents(kl_model.to(dev).eval(), latents / float(scale), batch_size=batch_size, device=dev)
    write_images(out, images, labels)
    meta = {"stage": "render", "samples": str(src), "samples_checkpoint_sha256": src_meta.get("checkpoint_sha256"),
            "route": f"KL latents ({src_meta.get('family')}) / latent_scale {scale} -> KL decoder",
            "kl_checkpoint": str(kl_checkpoint), "kl_checkpoint_sha256": kl_sha, "latent_scale": float(scale),
            "n": int(len(latents)), "num_classes": src_meta.get("num_classes"), "device": str(dev),
            "shape": list(images.shape), "dtype": "uint8", "seconds": round(time.time() - t_start, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(out / "images.json", meta)
    print(f"[render] {len(images)} images {images.shape[1]}x{images.shape[2]} -> {out}/images.npz", file=sys.stderr)
    return meta


def write_images(out: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """images.npz (images uint8 (n, H, W, 3), labels) and grid.png, both atomic."""
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    write_bytes_atomic(out / "images.npz", buf.getvalue())
    buf = io.BytesIO()
    image_grid(images, labels).save(buf, format="PNG")
    write_bytes_atomic(out / "grid.png", buf.getvalue())


def image_grid(images: np.ndarray, labels: np.ndarray, max_per_row: int = 10, max_rows: int = 10,
               target_cell: int = 96):
    """A PIL image: one row per class (label on the left) or plain rows for unconditional samples."""
    from PIL import Image, ImageDraw

    n, H, W = images.shape[:3]
    scale = max(1, target_cell // max(H, W))
    cell_h, cell_w = H * scale, W * scale
    if n and labels.min() >= 0:
        classes = list(dict.fromkeys(labels.tolist()))[:max_rows]
        rows = [(f"class {k}", np.nonzero(labels == k)[0][:max_per_row]) for k in classes]
    else:
        rows = [("", np.arange(s, min(n, s + max_per_row))) for s in range(0, min(n, max_per_row * max_rows), max_per_row)]
    margin = 64 if rows and rows[0][0] else 0
    canvas = Image.new("RGB", (margin + max_per_row * (cell_w + 2), max(1, len(rows)) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, idx) in enumerate(rows):
        y = r * (cell_h + 2)
        if name:
            draw.text((4, y + cell_h // 2 - 6), name, fill="black")
        for c, i in enumerate(idx):
            tile = Image.fromarray(images[i]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (margin + c * (cell_w + 2), y))
    return canvas
