"""Small I/O helpers shared by every stage: atomic writes, stale temp files, hashing, deterministic
tars, and reading torch files without running code from them (``load_torch``)."""
from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import types
import zipfile
from pathlib import Path
from typing import Any, Iterator

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


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files and folders that killed writes left in ``folder`` (``*.tmp-<pid>`` whose
    process is gone on this machine); returns what was removed. Temps of live processes stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in sorted(folder.glob(f"*{TMP_MARK}*")) if not _writer_alive(p)]
    for p in stale:
        _remove(p)
    return stale


def _writer_alive(tmp: Path) -> bool:
    """Whether the process named by a temp name's pid still runs (names without a pid count as alive)."""
    pid = tmp.name.rpartition(TMP_MARK)[2]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


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


# -- torch files ----------------------------------------------------------------------------------------

class UntrustedPickle(ValueError):
    """A torch file that holds pickled Python objects other than tensors and plain containers."""


class ForeignObject(dict):
    """Inert stand-in for an object of a class that a file names but that is never imported: it keeps
    what the file says about it (constructor arguments, state, items) as plain data."""
    origin = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs, self.state, self.listed = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.listed.append(item)

    def extend(self, items):
        self.listed.extend(items)

    def __repr__(self):
        return f"<{self.origin}, not unpickled>"


@functools.lru_cache(maxsize=1)
def _safe_globals() -> dict[str, Any]:
    """What a restricted unpickle may name: tensor rebuilding, dtypes, sizes, devices, plain containers
    (as torch's ``weights_only`` allows; storages are resolved by torch before this is asked)."""
    import collections
    import codecs

    import torch
    rebuild = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage")
    allowed = {f"torch._utils.{name}": getattr(torch._utils, name) for name in rebuild}
    allowed.update({f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    allowed.update({"collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
                    "torch.Size": torch.Size, "torch.device": torch.device, "torch.Tensor": torch.Tensor,
                    "torch.nn.parameter.Parameter": torch.nn.Parameter,
                    "torch.serialization._get_layout": torch.serialization._get_layout,
                    "_codecs.encode": codecs.encode, "builtins.set": set, "builtins.frozenset": frozenset,
                    "builtins.complex": complex, "builtins.bytearray": bytearray})
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``_safe_globals``; any other class or function becomes a ``ForeignObject``
    subclass. Nothing is imported, so no code from the file runs."""

    def find_class(self, module: str, name: str):
        module, name = _python3_name(module, name)
        allowed = _safe_globals().get(f"{module}.{name}")
        if allowed is not None:
            return allowed
        return type(name, (ForeignObject,), {"origin": f"{module}.{name}"})


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global in a protocol-2 pickle (``__builtin__.set`` -> ``builtins.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="pipeline.io.restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load())


def load_torch(path: str | Path, map_location="cpu", *, foreign_objects: bool = False):
    """``torch.load`` with ``weights_only=True`` of a file checked first (zip CRCs). Any unreadable,
    truncated or corrupt file is a ValueError naming it; one with pickled objects other than tensors
    and containers is an ``UntrustedPickle``, unless ``foreign_objects``: then those objects load as
    inert ``ForeignObject``s (Lightning hparams, callbacks) and the tensors as tensors."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    check_torch_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        name = _unsafe_global(str(e))
        if name is None:
            raise _corrupt(path, e) from e
        if not foreign_objects:
            raise UntrustedPickle(f"{path}: holds a pickled {name} object, which is never unpickled (it could "
                                  f"run code); only tensors and plain containers are read") from None
    except Exception as e:  # truncated, garbage, wrong format: whatever torch raises
        raise _corrupt(path, e) from e
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as e:
        raise _corrupt(path, e) from e


def check_torch_file(path: Path) -> None:
    """ValueError naming ``path`` when it is empty, or a zip archive (torch's format) that is cut
    short or whose members fail their CRC (torch itself does not check them)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: empty file (0 bytes)")
    if head != b"PK\x03\x04":
        return   # a legacy (pre-zip) torch pickle or garbage: torch.load tells
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: truncated or corrupt zip archive ({e})") from e
    with zf:
        for info in zf.infolist():
            if info.CRC == 0 and info.file_size:   # saved without CRCs (torch's compute_crc32=False)
                continue
            try:
                with zf.open(info) as member:
                    while member.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ValueError(f"{path}: corrupt zip archive (member {info.filename} fails its CRC or "
                                 "header check)") from e


def _unsafe_global(message: str) -> str | None:
    """The name of the class or function torch's weights_only unpickler refused, if that was the error."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m is None:
        return None
    return m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"   # torch names builtins bare


def _corrupt(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{path}: unreadable torch file, truncated or corrupt ({_short_reason(exc)})")


def _short_reason(exc: Exception) -> str:
    """The first line of an exception's message, without torch's advice about weights_only."""
    noise = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")
    lines = [line.strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(noise) and "weights_only" not in line]
    reason = lines[0] if lines else ""
    reason = re.sub(r"^WeightsUnpickler error:\s*", "", reason)
    return f"{type(exc).__name__}: {reason[:200]}" if reason else type(exc).__name__
