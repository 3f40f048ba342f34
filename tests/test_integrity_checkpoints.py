"""Issue 12, integrity: damaged checkpoints never pass silently, untrusted files never run code.

The trainer falls back from a damaged last.pt to prev.pt (same final weights as an uninterrupted
run) or starts over and says so; stale temp files of a killed save go; torch files load tensors
only (a Lightning-style .ckpt through inert placeholders); `inspect` prints one `error:` line.
"""
from __future__ import annotations

import ast
import io
import json
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from test_train import cfg, make_tokens
from test_vqgan import SMALL, random_taming_sd

from pipeline import checkpoints
from pipeline.artifacts import summarise, supported
from pipeline.io import ForeignObject, UntrustedPickle, load_torch, remove_stale_temps
from pipeline.models.vqgan import VQGANConfig
from pipeline.train import load_model, train_stage1
from pipeline.vqgan_loading import load_taming_checkpoint, read_taming_object

PKG = Path(__file__).resolve().parent.parent / "pipeline"
CFG = cfg(checkpoint_every=2)          # 8 steps; checkpoints at 2, 4, 6 and the end


class HParams:
    """Stands for a Lightning hparams/callback object: a class no loader may import."""

    def __init__(self, lr):
        self.lr = lr


class WritesMarker:
    """Unpickling this runs `exec`, which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def uninterrupted(tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train_stage1(CFG, tokens, str(out), progress=False)
    return out


def stopped_at_6(tokens, out: Path) -> Path:
    """A run stopped after step 6: last.pt holds step 6, prev.pt step 4."""
    train_stage1(CFG, tokens, str(out), max_steps=6, progress=False)
    assert checkpoints.read(out / "last.pt")["step"] == 6 and checkpoints.read(out / "prev.pt")["step"] == 4
    return out


def assert_same_final(a: Path, b: Path) -> None:
    ca, cb = (torch.load(d / "final.pt", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 8 and ca["data_position"] == cb["data_position"]
    for part in ("model", "optimizer"):
        flat_a, flat_b = _tensors(ca[part]), _tensors(cb[part])
        assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part
    assert [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()] == \
           [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]


def _tensors(obj, prefix="") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}.{key}").items()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[train]")]


# ------------------------------------------------------------------ the trainer

def test_truncated_last_resumes_from_prev(tokens, uninterrupted, tmp_path, capsys):
    out = stopped_at_6(tokens, tmp_path / "run")
    truncate(out / "last.pt")
    capsys.readouterr()
    train_stage1(CFG, tokens, str(out), progress=False)
    lines = stderr_lines(capsys)
    assert lines[0] == (f"[train] damaged checkpoint, not resuming from it: {out / 'last.pt'}: "
                        "truncated or corrupt zip archive (File is not a zip file)")
    assert lines[1] == f"[train] resuming from {out / 'prev.pt'} at step 4"
    assert_same_final(uninterrupted, out)
    assert checkpoints.read(out / "last.pt")["step"] == 8


def test_garbled_last_resumes_from_prev(tokens, uninterrupted, tmp_path, capsys):
    """Random bytes inside a tensor record: torch would load them as weights; the zip CRC catches them."""
    out = stopped_at_6(tokens, tmp_path / "run")
    last = out / "last.pt"
    with zipfile.ZipFile(last) as z:
        biggest = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(last.read_bytes())
    start = biggest.header_offset + 30 + len(biggest.filename.encode()) + len(biggest.extra) + 8
    data[start:start + 16] = np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8).tobytes()
    last.write_bytes(bytes(data))
    capsys.readouterr()
    train_stage1(CFG, tokens, str(out), progress=False)
    lines = stderr_lines(capsys)
    assert lines[0] == (f"[train] damaged checkpoint, not resuming from it: {last}: "
                        f"corrupt zip archive (member {biggest.filename} fails its CRC or header check)")
    assert lines[1] == f"[train] resuming from {out / 'prev.pt'} at step 4"
    assert_same_final(uninterrupted, out)


def test_random_bytes_last_names_it_without_torch_advice(tokens, tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as err:
        checkpoints.read(last)
    msg = str(err.value)
    assert msg.startswith(f"{last}: unreadable torch file, truncated or corrupt (")
    assert "weights_only" not in msg and "\n" not in msg


def test_both_damaged_start_over(tokens, uninterrupted, tmp_path, capsys):
    out = stopped_at_6(tokens, tmp_path / "run")
    truncate(out / "last.pt")
    (out / "prev.pt").write_bytes(b"")
    capsys.readouterr()
    train_stage1(CFG, tokens, str(out), progress=False)
    assert stderr_lines(capsys)[:3] == [
        f"[train] damaged checkpoint, not resuming from it: {out / 'last.pt'}: "
        "truncated or corrupt zip archive (File is not a zip file)",
        f"[train] damaged checkpoint, not resuming from it: {out / 'prev.pt'}: empty file (0 bytes)",
        f"[train] no good checkpoint in {out} (last.pt and prev.pt damaged): starting over from step 0"]
    assert_same_final(uninterrupted, out)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_kill_between_renames_and_stale_temps(tokens, uninterrupted, tmp_path, capsys):
    """A save killed after last.pt -> prev.pt and before temp -> last.pt: prev.pt is the newest
    checkpoint; the temp files of dead processes go, a live process's stays; a log line cut short
    is left out."""
    out = stopped_at_6(tokens, tmp_path / "run")
    (out / "last.pt").replace(out / "prev.pt")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                # a log append cut short as well
    (out / "last.pt.tmp-99999999").write_bytes(b"")
    (out / "metrics.jsonl.tmp-99999998").mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / f"last.pt.tmp-{live.pid}").write_bytes(b"")
        capsys.readouterr()
        train_stage1(CFG, tokens, str(out), progress=False)
        assert stderr_lines(capsys)[:3] == [
            f"[train] removed {out / 'last.pt.tmp-99999999'}, left by a killed save",
            f"[train] removed {out / 'metrics.jsonl.tmp-99999998'}, left by a killed save",
            f"[train] resuming from {out / 'prev.pt'} at step 6"]
        assert sorted(p.name for p in out.glob("*.tmp-*")) == [f"last.pt.tmp-{live.pid}"]
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(out) == [out / f"last.pt.tmp-{live.pid}"]
    assert_same_final(uninterrupted, out)


def test_wrong_files_and_load_errors_name_the_file(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "model": {}}, other)
    with pytest.raises(ValueError) as err:
        checkpoints.read(other)
    assert str(err.value) == f"{other}: not a training checkpoint (format 'something-else'; expected format " \
                             f"'digit-stage1-v1')"
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError) as err:
        checkpoints.read(tensor)
    assert str(err.value) == f"{tensor}: not a training checkpoint (a Tensor; expected format 'digit-stage1-v1')"
    cut = tmp_path / "final.pt"
    torch.save({"format": checkpoints.FORMAT, "model": {"w": torch.zeros(1000)}}, cut)
    truncate(cut)
    with pytest.raises(ValueError) as err:
        load_model(str(cut))
    assert str(err.value) == f"{cut}: truncated or corrupt zip archive (File is not a zip file)"


# ------------------------------------------------------------------ no code from files

def test_every_torch_load_is_weights_only():
    """Each torch.load in the package passes weights_only=True, except the two reviewed ones: the
    restricted unpickler (io.load_torch) and `inspect --trust`."""
    reviewed = {("io.py", "load_torch"), ("artifacts.py", "_load_torch_file")}
    unsafe = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                if ast.unparse(call.func) != "torch.load":
                    continue
                kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
                if kw.get("weights_only") != "True" and (path.name, fn.name) not in reviewed:
                    unsafe.append(f"{path.name}:{call.lineno}")
    assert unsafe == []


def test_lightning_ckpt_loads_through_placeholders(tmp_path):
    cfg_vq = VQGANConfig(**SMALL)
    sd = random_taming_sd(cfg_vq)
    marker = tmp_path / "marker"
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "hyper_parameters": {"cfg": HParams(0.5)},
                "callbacks": {"evil": WritesMarker(marker)}}, path)
    with pytest.raises(UntrustedPickle):
        load_torch(path)                       # the strict reader refuses the file
    obj = read_taming_object(path)
    hp, evil = obj["hyper_parameters"]["cfg"], obj["callbacks"]["evil"]
    assert isinstance(hp, ForeignObject) and hp.origin == f"{__name__}.HParams" and hp.state == {"lr": 0.5}
    assert isinstance(evil, ForeignObject) and evil.origin == "builtins.exec"
    assert evil.args == (f"open({str(marker)!r}, 'w').write('ran')",)
    assert not marker.exists()
    model = load_taming_checkpoint(path, cfg_vq)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    assert not marker.exists()


# ------------------------------------------------------------------ inspect

def error_of(path: Path, *flags: str) -> str:
    proc = run_cli("inspect", path, *flags, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    return proc.stderr.rstrip("\n")


def test_inspect_never_unpickles_code(tmp_path):
    marker = tmp_path / "marker"
    handmade = tmp_path / "evil.pt"
    handmade.write_bytes(pickle.dumps(WritesMarker(marker), protocol=2))
    saved = tmp_path / "saved.pt"
    torch.save({"w": torch.zeros(2), "x": WritesMarker(marker)}, saved)
    hint = ("which is never unpickled (it could run code); only tensors and plain containers are read; "
            "`inspect --trust` loads it anyway, running any code inside: only for files from a source you trust")
    assert error_of(handmade) == f"error: {handmade}: holds a pickled builtins.exec object, {hint}"
    assert error_of(saved) == f"error: {saved}: holds a pickled builtins.exec object, {hint}"
    assert not marker.exists()

    proc = run_cli("inspect", saved, "--trust", "--json")
    assert proc.stderr.splitlines()[0] == \
        f"warning: --trust: unpickling {saved} with weights_only=False; any code inside it runs"
    assert json.loads(proc.stdout)["keys"] == ["w", "x"]
    assert marker.read_text() == "ran"        # trusted: the code did run


def _tar(path: Path) -> None:
    from PIL import Image
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            png = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)).save(png, "PNG")
            for name, data in ((f"s{i}.png", png.getvalue()), (f"s{i}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_inspect_damaged_files_one_error_line(tmp_path):
    pt, npz, npy, tar, js, parquet = (tmp_path / n for n in ("w.pt", "a.npz", "a.npy", "s.tar", "m.json",
                                                             "manifest.parquet"))
    torch.save({"w": torch.zeros(1000)}, pt)
    np.savez(npz, images=np.zeros((4, 8, 8, 3), np.uint8))
    np.save(npy, np.zeros((100, 10), np.float32))
    _tar(tar)
    js.write_text(json.dumps({"keys": ["a", "b"], "stage": "tokens"}))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"label": [1, 2, 3]}), parquet)
    for p in (pt, npz, npy, tar, js, parquet):
        assert summarise(p)["path"] == str(p)              # whole files are fine
        truncate(p)
    cut_tar = tar.stat().st_size
    try:
        json.loads(js.read_text())
    except json.JSONDecodeError as e:
        json_error = str(e)
    assert error_of(pt) == f"error: {pt}: truncated or corrupt zip archive (File is not a zip file)"
    assert error_of(npz) == f"error: {npz}: damaged or unreadable .npz arrays (BadZipFile: File is not a zip file)"
    assert error_of(npy) == f"error: {npy}: damaged or unreadable .npy array " \
                            f"(ValueError: mmap length is greater than file size)"
    assert error_of(tar) == f"error: {tar}: truncated tar ({cut_tar} bytes, no end-of-archive marker)"
    assert error_of(js) == f"error: {js}: damaged or unreadable .json sidecar (JSONDecodeError: {json_error})"
    assert error_of(parquet).startswith(f"error: {parquet}: damaged or unreadable manifest .parquet (ArrowInvalid: ")


def test_inspect_lists_what_it_supports(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    kinds = supported()
    assert "checkpoint .pt/.pth/.ckpt" in kinds and "shard .tar" in kinds and "feature store .zarr" in kinds
    assert error_of(other) == f"error: {other}: don't know how to inspect this; supported: {'; '.join(kinds)}"
    help_text = " ".join(run_cli("inspect", "--help").stdout.split())
    assert f"Reads: {'; '.join(kinds)}." in help_text and "--trust" in help_text
