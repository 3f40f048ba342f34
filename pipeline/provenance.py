"""Provenance checks: what a stage consumes must be what its inputs' metadata says it is.

Every mismatch raises ValueError with one message format (`require_same`):

    <file a> has <what> <value a>, but <file b> records <value b>: <what happened; what to rerun>

What identifies a tokenizer in a token shard's `.json` sidecar (`shard_tokenizer`): the centroids'
sha256 and the encoder (arch, weights sha256, block index, image size) for DiGIT tokens, the VQ
checkpoint's sha256 for VQ tokens, the KL checkpoint's sha256 and the latent scale for KL latents. A record that is absent (hand-made shards or checkpoints in
tests, files written before a key existed) is not compared: only what two sides both record is.

Who checks what: tokens and stability (centroids vs centroids.json, encoder vs the one the
centroids' features came from), train (one tokenizer per set of shards), render (the VQ file vs
the VQ tokens the model learnt; stage 2's context tokenizer vs the stage-1 model's), evaluate
(reference.json vs the configured FID network).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .io import file_sha256, read_json
from .models.patch_encoder import encoder_info

TOKENIZER_KEYS = ("centroids_sha256", "vq_checkpoint_sha256", "kl_checkpoint_sha256", "latent_scale")
# what identifies the encoder a feature or token came from (models/patch_encoder.EncoderInfo fields)
ENCODER_KEYS = ("arch", "weights_sha256", "block_index", "img_size", "pos_embed_interpolation")

Record = dict[str, tuple[str, Any]]   # key -> (the file that records it, the value)


def require_same(what: str, file_a, value_a, file_b, value_b, hint: str = "") -> None:
    """Raise ValueError in the one message format unless ``value_a == value_b``."""
    if value_a != value_b:
        raise ValueError(f"{file_a} has {what} {value_a}, but {file_b} records {value_b}"
                         + (f": {hint}" if hint else ""))


def label(key: str) -> str:
    """A record key as the message names it: 'centroids_sha256' -> 'centroids sha256'."""
    return key.replace("_", " ")


def read_sidecar(path: str | Path) -> dict | None:
    """The `.json` next to ``path`` (same stem), or None when there is none."""
    side = Path(path).with_suffix(".json")
    return read_json(side) if side.is_file() else None


def require_recorded_sha256(path: str | Path, hint: str) -> None:
    """Check ``path`` against the ``sha256`` its `.json` sidecar records (e.g. a VQ file and
    ``vq.json``); nothing to check when there is no sidecar or it records no sha256."""
    side = read_sidecar(path)
    if side and side.get("sha256"):
        require_same("sha256", path, file_sha256(path), Path(path).with_suffix(".json"), side["sha256"], hint)


# -- centroids and encoder ---------------------------------------------------------------------------

def checked_centroids(centroids_path: str | Path, *, required: bool = True) -> dict | None:
    """``centroids.json`` next to the centroids, once the file's sha256 matches what it records.

    Without a `.json`: ValueError when ``required`` (a stage whose output flows on), else None
    (bare centroids, e.g. fitted in a test, have no record to check against)."""
    meta_path = Path(centroids_path).with_suffix(".json")
    if not meta_path.is_file():
        if required:
            raise ValueError(f"{centroids_path} has no {meta_path.name} next to it: nothing records which features "
                             f"these centroids were fitted on; rerun the kmeans stage")
        return None
    meta = read_json(meta_path)
    require_same("sha256", centroids_path, file_sha256(centroids_path), meta_path, meta["centroids"]["sha256"],
                 "the centroids were replaced or half-written; rerun the kmeans stage")
    return meta


def encoder_identity(info: dict) -> dict:
    """The fields of an `encoder_info` dict that decide its features."""
    return {k: info[k] for k in ENCODER_KEYS if k in info}


def require_same_encoder(info: dict, centroids_meta: dict, centroids_path: str | Path) -> None:
    """The encoder loaded now (``encoder_info``) must be the one the centroids' features came from
    (``feature_attrs.encoder`` of centroids.json); fields either side lacks are not compared."""
    recorded = encoder_identity(centroids_meta.get("feature_attrs", {}).get("encoder") or {})
    now = encoder_identity(info)
    where = info.get("checkpoint") or f"the configured encoder ({info.get('arch')})"
    for key in (k for k in ENCODER_KEYS if k in recorded and k in now):
        require_same(f"encoder {label(key)}", where, now[key], Path(centroids_path).with_suffix(".json"),
                     recorded[key], "the centroids were fitted on another encoder's features; rerun features "
                                    "and kmeans with this encoder, or use the encoder they were made with")


def load_checked_centroids(centroids_path: str | Path, encoder, *, required: bool = True) -> np.ndarray:
    """The centroids, once checked against ``centroids.json`` (their sha256, the encoder their
    features came from) and the encoder's feature size. ``required=False`` accepts bare centroids
    without a `.json` (nothing to check them against)."""
    meta = checked_centroids(centroids_path, required=required)
    if meta is not None:
        require_same_encoder(encoder_info(encoder), meta, centroids_path)
    centroids = np.load(centroids_path)
    if centroids.ndim != 2 or centroids.shape[1] != encoder.embed_dim:
        raise ValueError(f"{centroids_path}: centroids of shape {centroids.shape} do not match the encoder's "
                         f"{encoder.embed_dim}-dim features")
    return centroids


# -- token shards ------------------------------------------------------------------------------------

def shard_tokenizer(meta: dict | None) -> dict:
    """The tokenizer a token shard's sidecar records: centroids / VQ sha256 and the encoder fields,
    flat ({'centroids_sha256': ..., 'encoder block_index': ...}); {} when it records none."""
    meta = meta or {}
    out = {k: meta[k] for k in TOKENIZER_KEYS if meta.get(k)}
    enc = meta.get("encoder")
    if isinstance(enc, dict):
        out.update({f"encoder {k}": v for k, v in encoder_identity(enc).items()})
    return out


def require_one_tokenizer(files: Iterable[str], records: Iterable[dict], hint: str) -> Record:
    """Raise unless every file's record agrees with the first file recording the same key;
    returns {key: (first file, value)}: the tokenizer of the whole set."""
    first: Record = {}
    for f, rec in zip(files, records):
        for key, value in rec.items():
            if key in first:
                require_same(label(key), f, value, first[key][0], first[key][1], hint)
            else:
                first[key] = (str(f), value)
    return first


def token_files_tokenizer(files: list[str], hint: str) -> Record:
    """The one tokenizer of a list of token shards, read from their sidecars (see above)."""
    return require_one_tokenizer(files, [shard_tokenizer(read_sidecar(f)) for f in files], hint)


def model_tokenizer(token_files: list[dict] | None) -> Record:
    """The tokenizer(s) a trained model's inputs record (a checkpoint's ``token_files``: path, sha256
    and the ``tokenizer`` recorded at training time, else the shard's sidecar if it is still there)."""
    entries = token_files or []
    records = [e["tokenizer"] if "tokenizer" in e else shard_tokenizer(read_sidecar(e["path"])) for e in entries]
    return require_one_tokenizer([e["path"] for e in entries], records,
                                 "the model was trained on shards of different tokenizers")


def record_to_json(record: Record) -> dict:
    return {k: {"file": f, "value": v} for k, (f, v) in record.items()}


def record_from_json(obj: dict | None) -> Record:
    return {k: (d["file"], d["value"]) for k, d in (obj or {}).items()}
