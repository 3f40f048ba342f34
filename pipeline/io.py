"""Small I/O helpers shared by every stage: atomic writes, hashing, deterministic tars."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def tmp_path_for(path: str | Path) -> Path:
    """Sibling temp name; never matches an artifact glob such as `*.tar` or `*.zarr`."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write a file or directory to; rename it onto `path` on success.

    A crash or kill leaves only the temp name behind, which no stage accepts as an output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_npy_atomic(path: str | Path, array) -> None:
    """np.save under a temp name, then rename (a .npy that exists is complete)."""
    import numpy as np
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DeterministicTarWriter:
    """Write a tar whose bytes depend only on the members' names and contents (in order)."""

    def __init__(self, fileobj):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
