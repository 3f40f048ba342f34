"""Memory-mapped grid shards as one deterministic stream of training batches.

A grid shard is ``{split}-{i:06d}.npy`` of shape (N, V, h, w[, C]) with a ``.json`` sidecar
holding at least ``grid`` ([h, w]) and, for discrete codes, ``codebook_size``; ``labels`` and
``keys`` when known. Integer shards (uint16/uint32 codes) come out as int64 (B, h*w) batches,
float shards (e.g. float16 latents) as float32 (B, h*w, C).

Order. Each epoch has its own permutation (``torch.randperm`` seeded by ``seed + epoch``), and
sample i of epoch e uses view ``hash(seed, e, i) % V``. A global batch is the next ``size``
samples of that stream, running on into the next epoch when one ends; the position
``(epoch, index)`` is all a checkpoint needs to read exactly the samples an uninterrupted run
would have read.

With ``context_files`` (stage 2) every shard has a partner shard of the same images, views and
crops (the DiGIT tokens of the VQ grids), gathered for the same (image, view) pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_M64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix(*ints: int) -> int:
    """A 64-bit hash of a tuple of integers (seeds derived from (seed, step, rank) and the like)."""
    h = np.zeros(1, dtype=np.uint64)
    for v in ints:
        with np.errstate(over="ignore"):
            h = splitmix64(h ^ np.uint64(int(v) & _M64))
    return int(h[0])


class GridShards:
    """Memory-mapped (N, V, h, w[, C]) shards that agree on grid, codebook and trailing shape."""

    def __init__(self, files: list[str]):
        self.files = [str(f) for f in files]
        self.arrays: list[np.ndarray] = []
        self.metas: list[dict] = []
        self.grid: tuple[int, int] | None = None
        self.codebook_size: int | None = None
        for f in self.files:
            self._add(f)

    def _add(self, f: str) -> None:
        arr = np.load(f, mmap_mode="r")
        meta = json.loads(Path(f).with_suffix(".json").read_text())
        if arr.ndim not in (4, 5):
            raise ValueError(f"{f}: expected (N, V, h, w) grids, got shape {arr.shape}")
        grid = tuple(int(g) for g in meta["grid"])
        if tuple(arr.shape[2:4]) != grid:
            raise ValueError(f"{f}: grid {arr.shape[2:4]} != metadata grid {grid}")
        k = meta.get("codebook_size")
        k = int(k) if k is not None else None
        if not self.arrays:
            self.grid, self.codebook_size = grid, k
        elif grid != self.grid or k != self.codebook_size or arr.shape[4:] != self.arrays[0].shape[4:]:
            raise ValueError(f"{f}: grid/codebook {grid}/{meta.get('codebook_size')} differ from "
                             f"{self.grid}/{self.codebook_size} of {self.files[0]}")
        self.arrays.append(arr)
        self.metas.append(meta)

    @property
    def sizes(self) -> list[int]:
        return [a.shape[0] for a in self.arrays]

    def labels(self) -> np.ndarray:
        out = []
        for f, arr, meta in zip(self.files, self.arrays, self.metas):
            lab = np.asarray(meta.get("labels", [0] * arr.shape[0]), dtype=np.int64)
            if len(lab) != arr.shape[0]:
                raise ValueError(f"{f}: {len(lab)} labels for {arr.shape[0]} images")
            out.append(lab)
        return np.concatenate(out)

    def check_partner_of(self, other: "GridShards") -> None:
        """Raise unless shard i here holds the same images, views and crops as shard i of ``other``."""
        if len(self.files) != len(other.files):
            raise ValueError(f"{len(self.files)} context files for {len(other.files)} token files")
        for cf, f, carr, arr, cmeta, meta in zip(self.files, other.files, self.arrays, other.arrays,
                                                  self.metas, other.metas):
            if carr.shape[:2] != arr.shape[:2]:
                raise ValueError(f"{cf}: {carr.shape[0]} images x {carr.shape[1]} views, but its partner {f} "
                                 f"has {arr.shape[0]} x {arr.shape[1]}")
            if "keys" in meta and "keys" in cmeta and list(meta["keys"]) != list(cmeta["keys"]):
                raise ValueError(f"{cf} and {f} list different image keys: they must come from the same shard")
            if "crops" in meta and "crops" in cmeta and meta["crops"] != cmeta["crops"]:
                raise ValueError(f"{cf} and {f} hold different crops: tokenize both from the same views")


class TokenDataset:
    """All grid shards as one indexable set of N images x V views (see the module docstring)."""

    def __init__(self, token_files: list[str], seed: int = 0, context_files: list[str] | None = None):
        if not token_files:
            raise ValueError("no token files given")
        self.seed = int(seed)
        self.shards = GridShards(token_files)
        self.files, self.grid, self.codebook_size = self.shards.files, self.shards.grid, self.shards.codebook_size
        self.labels = self.shards.labels()
        self.offsets = np.concatenate([[0], np.cumsum(self.shards.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise ValueError("token files hold no images")
        self.context = None
        if context_files:
            self.context = GridShards(context_files)
            self.context.check_partner_of(self.shards)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def context_grid(self):
        return self.context.grid if self.context else None

    @property
    def context_codebook_size(self):
        return self.context.codebook_size if self.context else None

    def __len__(self) -> int:
        return self.n

    @property
    def num_classes(self) -> int:
        if self.labels.min() < 0:
            raise ValueError("class-conditional training needs labels >= 0 for every image")
        return int(self.labels.max()) + 1

    def order(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_cache = (epoch, torch.randperm(self.n, generator=g).numpy())
        return self._perm_cache[1]

    def view_of(self, epoch: int, idx: np.ndarray) -> np.ndarray:
        """Hash of (seed, epoch, sample index) for every index; caller takes it modulo V."""
        base = np.uint64(mix(self.seed, epoch))
        return splitmix64(np.asarray(idx, dtype=np.uint64) ^ base)

    def _stream(self, pos: tuple[int, int], size: int) -> tuple[list[tuple[int, np.ndarray]], tuple[int, int]]:
        """The (epoch, image indices) runs of the next ``size`` samples, and the position after them."""
        epoch, i = pos
        parts, need = [], size
        while need > 0:
            take = min(need, self.n - i)
            parts.append((epoch, self.order(epoch)[i:i + take]))
            need -= take
            i += take
            if i == self.n:
                epoch, i = epoch + 1, 0
        return parts, (epoch, i)

    def next_batch(self, pos: tuple[int, int], size: int, with_context: bool = False):
        """The next ``size`` samples from position (epoch, index): tokens (size, h*w), labels (size,)
        int64 and the position after them; with ``with_context`` also the context grids of the same
        images and views, returned as (tokens, context, labels, position)."""
        parts, pos_next = self._stream(pos, size)
        toks = np.concatenate([self._gather(self.shards, ep, idx) for ep, idx in parts])
        labs = np.concatenate([self.labels[idx] for _, idx in parts])
        if not with_context:
            return toks, labs, pos_next
        if self.context is None:
            raise ValueError("this dataset has no context files")
        ctx = np.concatenate([self._gather(self.context, ep, idx) for ep, idx in parts])
        return toks, ctx, labs, pos_next

    def batch(self, pos: tuple[int, int], size: int) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        """The trainer's view of ``next_batch``: named arrays with one row per sample."""
        if self.context is None:
            toks, labs, pos_next = self.next_batch(pos, size)
            return {"tokens": toks, "labels": labs}, pos_next
        toks, ctx, labs, pos_next = self.next_batch(pos, size, with_context=True)
        return {"tokens": toks, "context": ctx, "labels": labs}, pos_next

    def _gather(self, shards: GridShards, epoch: int, idx: np.ndarray) -> np.ndarray:
        """(len(idx), h*w[, C]) grids of images ``idx`` at the views that epoch assigns them."""
        h = self.view_of(epoch, idx)
        f = np.searchsorted(self.offsets, idx, side="right") - 1
        sample = shards.arrays[0]
        dtype = np.int64 if np.issubdtype(sample.dtype, np.integer) else np.float32
        out = np.empty((len(idx),) + sample.shape[2:], dtype=dtype)
        for k in np.unique(f):
            sel = np.nonzero(f == k)[0]
            arr = shards.arrays[k]
            local = idx[sel] - self.offsets[k]
            views = (h[sel] % np.uint64(arr.shape[1])).astype(np.int64)
            out[sel] = arr[local, views]
        return out.reshape((len(idx), -1) + sample.shape[4:])
