"""Shards stage: any image source -> WebDataset tars + manifest.parquet.

Output for dataset D (all under `shards/D/`):
  {split}-{i:06d}.tar   members {key}.png|jpg, {key}.cls (ascii label), {key}.json (source, size)
  manifest.parquet      one row per stored sample: key, split, shard, index, label, width, height, sha1
  dataset.json          classes, counts, skipped (unreadable) files, the settings used
  .state/{split}-{i:06d}.json   per-shard record; lets an interrupted run resume shard by shard

Shards are byte-identical for identical input: items are listed in sorted order and tar headers
carry no time, owner or permission information of the machine.

Damaged tars are rewritten like missing ones. Each state record holds the tar's size, mtime and
sha256 at write time: every run compares the size and mtime and hashes a tar only when its mtime
changed (an edit in place, a copy); `verify=True` (`shards --verify`) hashes every tar. A damaged
tar is read in full to say what differs (`describe_damage`) and the repair is reported.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import multiprocessing as mp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from . import sources
from .config import ConfigError
from .io import DeterministicTarWriter, atomic_path, file_sha256, read_json, sha1_bytes, write_json_atomic

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.int32()), ("index", pa.int32()),
    ("label", pa.int32()), ("width", pa.int32()), ("height", pa.int32()), ("sha1", pa.string()),
])
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}


class UnreadableImage(ValueError):
    pass


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------- encoding one image

_IDX_CACHE: dict[tuple[str, str], np.ndarray] = {}


def _idx_image(root: str, split: str, i: int) -> np.ndarray:
    if (root, split) not in _IDX_CACHE:
        _IDX_CACHE[(root, split)] = sources.fashion_mnist_split(Path(root), split)[0]
    return _IDX_CACHE[(root, split)][i]


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _resize_shorter(img: Image.Image, shorter: int | None) -> Image.Image:
    if shorter is None or min(img.size) <= shorter:
        return img
    w, h = img.size
    scale = shorter / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.BICUBIC)


def encode_item(item: sources.SourceItem, root: str, settings: dict) -> tuple[bytes, int, int]:
    """Return (stored image bytes, width, height); raise UnreadableImage for a bad file."""
    fmt, quality, shorter = settings["image_format"], settings["jpeg_quality"], settings["resize_shorter"]
    if item.ref[0] == "idx":
        img = Image.fromarray(_idx_image(root, item.ref[1], item.ref[2]), mode="L")
        img = _resize_shorter(img, shorter)
        return _encode(img, fmt, quality), img.width, img.height
    try:
        raw = sources.read_ref_bytes(item.ref)
        img = Image.open(io.BytesIO(raw))
        source_format = img.format
        img.load()  # full decode: catches truncated and corrupt files
    except Exception as exc:  # PIL raises many types for bad data
        raise UnreadableImage(f"{item.source}: {type(exc).__name__}: {exc}") from exc
    same_format = PIL_FORMAT[fmt] == source_format and img.mode in ("L", "RGB")
    if settings["passthrough"] and same_format and (shorter is None or min(img.size) <= shorter):
        return raw, img.width, img.height
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    img = _resize_shorter(img, shorter)
    return _encode(img, fmt, quality), img.width, img.height


# ---------------------------------------------------------------- one shard

def _item_fingerprint(item: sources.SourceItem) -> list:
    fp = [item.key, item.label, item.source, list(item.ref)]
    if item.ref[0] in ("file", "tar"):
        st = os.stat(item.ref[1])
        fp += [st.st_size, st.st_mtime_ns]
    return fp


def plan_hash(items: list[sources.SourceItem], settings: dict) -> str:
    encoding = {k: settings[k] for k in ("image_format", "jpeg_quality", "passthrough", "resize_shorter", "strict")}
    blob = json.dumps([encoding, [_item_fingerprint(it) for it in items]], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def write_shard(job: dict) -> dict:
    """Encode one shard's items into a tar (atomically) and return its state record."""
    out_dir, split, index = Path(job["out_dir"]), job["split"], job["index"]
    items = [sources.SourceItem(*it) for it in job["items"]]
    settings, tar_path = job["settings"], out_dir / shard_name(split, index)
    ext = settings["image_format"]
    rows, skipped = [], []
    with atomic_path(tar_path) as tmp:
        with open(tmp, "wb") as f, DeterministicTarWriter(f) as tar:
            for item in items:
                try:
                    data, width, height = encode_item(item, job["root"], settings)
                except UnreadableImage as exc:
                    if settings["strict"]:
                        raise UnreadableImage(f"unreadable image (strict mode): {exc}") from None
                    skipped.append({"key": item.key, "source": item.source, "error": str(exc)})
                    continue
                meta = {"source": item.source, "width": width, "height": height, "label": item.label}
                tar.add(f"{item.key}.{ext}", data)
                tar.add(f"{item.key}.cls", str(item.label).encode())
                tar.add(f"{item.key}.json", json.dumps(meta, sort_keys=True).encode())
                rows.append({"key": item.key, "split": split, "shard": index, "index": len(rows),
                             "label": item.label, "width": width, "height": height, "sha1": sha1_bytes(data)})
            f.flush()
            os.fsync(f.fileno())
    st = tar_path.stat()
    state = {"tar": tar_path.name, "plan_hash": job["plan_hash"], "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "sha256": file_sha256(tar_path), "rows": rows, "skipped": skipped}
    write_json_atomic(out_dir / ".state" / f"{tar_path.stem}.json", state)
    return state


def _load_state(out_dir: Path, tar_path: Path, expected_hash: str) -> dict | None:
    """The state record of an existing tar written from the current plan (None: write the tar)."""
    state_path = out_dir / ".state" / f"{tar_path.stem}.json"
    if not (tar_path.is_file() and state_path.is_file()):
        return None
    try:
        state = read_json(state_path)
    except (OSError, json.JSONDecodeError):
        return None
    return state if state.get("plan_hash") == expected_hash else None


def _kept_state(out_dir: Path, job: dict, verify: bool) -> tuple[dict | None, str | None]:
    """(the state record if the shard's tar can be kept, else None; what is wrong with a damaged tar)."""
    tar_path = out_dir / shard_name(job["split"], job["index"])
    state = _load_state(out_dir, tar_path, job["plan_hash"])
    if state is None:
        return None, None
    if not _unchanged(tar_path, state, verify):
        damage = describe_damage(tar_path, state["rows"], job["settings"]["image_format"])
        return None, damage or "its sha256 differs from the one recorded when it was written"
    mtime = tar_path.stat().st_mtime_ns
    if state.get("mtime_ns") != mtime:   # copied or touched, bytes intact: hash it once only
        state = {**state, "mtime_ns": mtime}
        write_json_atomic(out_dir / ".state" / f"{tar_path.stem}.json", state)
    return state, None


def _unchanged(tar_path: Path, state: dict, verify: bool) -> bool:
    """Same size, and same mtime (cheap) or, when `verify` or the mtime differs, the same sha256."""
    st = tar_path.stat()
    if st.st_size != state["size"]:
        return False
    if not verify and st.st_mtime_ns == state.get("mtime_ns"):
        return True
    return file_sha256(tar_path) == state["sha256"]


def describe_damage(tar_path: Path, rows: list[dict], ext: str) -> str | None:
    """Read the whole tar and say where it first differs from the samples it was written with (None: nowhere)."""
    expected = [(f"{r['key']}.{e}", r) for r in rows for e in (ext, "cls", "json")]
    done, damage = 0, None
    try:
        for tar, info in sources.tar_members(tar_path):
            if done == len(expected):
                return f"unexpected member {info.name} after the last sample"
            name, row = expected[done]
            if info.name != name:
                return f"member {info.name} where {name} was written"
            problem = _member_problem(tar.extractfile(info).read(), name, row, ext)
            if problem:
                return problem
            done += 1
    except (sources.DamagedTar, tarfile.TarError, EOFError) as exc:
        damage = str(exc)
    if done < len(expected):
        return (f"{done // 3} of {len(rows)} samples intact (first damaged key: {expected[done][1]['key']}"
                + (f"; {damage})" if damage else ")"))
    return damage


def _member_problem(data: bytes, name: str, row: dict, ext: str) -> str | None:
    """How one member's bytes differ from what was written (the image's sha1, the label), or None."""
    if name.endswith(f".{ext}") and sha1_bytes(data) != row["sha1"]:
        return f"image of key {row['key']} has sha1 {sha1_bytes(data)}, written with {row['sha1']}"
    if name.endswith(".cls") and data != str(row["label"]).encode():
        return f"label of key {row['key']} reads {data[:20]!r}, written as {row['label']}"
    return None


# ---------------------------------------------------------------- the whole dataset

def build_shards(dataset_cfg: dict, shards_cfg: dict, out_root: str | Path = "shards", progress: bool = True,
                 verify: bool = False) -> dict:
    """Shard every configured split; reuse shards whose inputs did not change and whose tars are intact
    (every tar hashed when `verify`), rewrite the others. Returns dataset.json."""
    out_dir = Path(out_root) / dataset_cfg["name"]
    root = Path(dataset_cfg["path"])
    per_shard = shards_cfg["samples_per_shard"]
    jobs, classes_by_split = [], {}
    for split in dataset_cfg["splits"]:
        items, classes = sources.list_source(dataset_cfg["source"], root, split, dataset_cfg.get("label_key", "cls"))
        if dataset_cfg.get("shuffle_seed") is not None:
            # class-ordered sources (ImageFolder) would otherwise give one-class shards, and the
            # first shards (k-means sample, `limit`) would cover only the first classes
            order = np.random.default_rng(int(dataset_cfg["shuffle_seed"])).permutation(len(items))
            items = [items[i] for i in order]
        if dataset_cfg.get("limit"):
            items = items[: dataset_cfg["limit"]]
        _check_unique_keys(items, split)
        classes_by_split[split] = classes
        for index, start in enumerate(range(0, len(items), per_shard)):
            chunk = items[start:start + per_shard]
            jobs.append({"out_dir": str(out_dir), "root": str(root), "split": split, "index": index,
                         "items": [tuple(asdict(it).values()) for it in chunk], "settings": shards_cfg,
                         "plan_hash": plan_hash(chunk, shards_cfg)})
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(out_dir, {shard_name(j["split"], j["index"]) for j in jobs})

    states, todo, damaged = {}, [], {}
    for job in tqdm(jobs, desc="verify", unit="shard", disable=not (progress and verify), file=sys.stderr):
        state, damage = _kept_state(out_dir, job, verify)
        if state is not None:
            states[(job["split"], job["index"])] = state
        else:
            todo.append(job)
        if damage:
            damaged[shard_name(job["split"], job["index"])] = damage
    _report_plan(dataset_cfg["name"], len(jobs), len(todo), damaged, verify)
    for job, state in _run_jobs(todo, shards_cfg["workers"], progress):
        states[(job["split"], job["index"])] = state
    if damaged:
        print(f"[shards] repaired {len(damaged)} damaged tar(s) from the source: {', '.join(sorted(damaged))}",
              file=sys.stderr)

    ordered = [states[(j["split"], j["index"])] for j in jobs]
    rows = [row for st in ordered for row in st["rows"]]
    skipped = [s for st in ordered for s in st["skipped"]]
    for s in skipped:
        print(f"[shards] WARNING skipped unreadable image {s['source']}: {s['error']}", file=sys.stderr)
    write_manifest(out_dir / "manifest.parquet", rows)
    summary = {
        "name": dataset_cfg["name"], "source": dataset_cfg["source"], "path": str(root),
        "classes": classes_by_split[dataset_cfg["splits"][0]], "classes_by_split": classes_by_split,
        "splits": {split: {"samples": sum(r["split"] == split for r in rows),
                           "shards": [st["tar"] for st in ordered if st["tar"].startswith(f"{split}-")]}
                   for split in dataset_cfg["splits"]},
        "skipped": skipped, "num_skipped": len(skipped),
        "settings": {"dataset": dataset_cfg, "shards": {k: v for k, v in shards_cfg.items() if k != "workers"}},
        "shard_sha256": {st["tar"]: st["sha256"] for st in ordered},
    }
    write_json_atomic(out_dir / "dataset.json", summary)
    return summary


def _report_plan(name: str, planned: int, to_write: int, damaged: dict[str, str], verify: bool) -> None:
    checked = f" (every tar hashed: {len(damaged)} damaged)" if verify else ""
    print(f"[shards] {name}: {planned} shards planned, {planned - to_write} up to date, {to_write} to write{checked}",
          file=sys.stderr)
    for tar, damage in sorted(damaged.items()):
        print(f"[shards] {tar} is damaged ({damage}): rewriting it", file=sys.stderr)


def _check_unique_keys(items: list[sources.SourceItem], split: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise ValueError(f"split {split}: two source images map to the same key '{it.key}' ({it.source}); "
                             "rename one of them")
        seen.add(it.key)


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    for tar_path in out_dir.glob("*.tar"):
        if tar_path.name not in keep:
            tar_path.unlink()
            (out_dir / ".state" / f"{tar_path.stem}.json").unlink(missing_ok=True)


def _run_jobs(todo: list[dict], workers: int, progress: bool):
    bar = tqdm(total=len(todo), desc="shards", unit="shard", disable=not progress or not todo, file=sys.stderr)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            yield job, write_shard(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            futures = {pool.submit(write_shard, job): job for job in todo}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
                bar.update()
    bar.close()


def write_manifest(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: str | Path):
    return pq.read_table(path)


def shards_stage(config: dict, out_root: str | Path = "shards", progress: bool = True, verify: bool = False) -> dict:
    """The shards stage as the config describes it (`verify`: hash every tar); prints a one-line summary."""
    if "dataset" not in config:
        raise ConfigError("config key 'dataset' is missing: say which images to shard")
    summary = build_shards(config["dataset"], config["shards"], out_root=out_root, progress=progress, verify=verify)
    counts = ", ".join(f"{s}: {v['samples']} images in {len(v['shards'])} shards" for s, v in summary["splits"].items())
    print(f"[shards] {summary['name']}: {counts}; {summary['num_skipped']} unreadable skipped", file=sys.stderr)
    return summary
