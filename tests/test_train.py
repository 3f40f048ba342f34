"""Stage-1 training: exact resume, DDP == single process, NaN stop, logging, load_model."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.gpt import GPT, GPTConfig
from pipeline.token_data import TokenDataset
from pipeline.train import load_model, train_stage1
from pipeline.training_log import METRIC_COLUMNS
from pipeline.trainer import lr_at

REPO = Path(__file__).resolve().parent.parent


def make_tokens(d: Path, n_files=2, n=24, views=2, k=16, grid=(4, 4), classes=4, seed=0) -> list[str]:
    """Label-dependent, learnable token grids: token(i, j) = (3*label + i + j + view) % k, 10% noise."""
    rng = np.random.default_rng(seed)
    files = []
    d.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        labels = rng.integers(0, classes, n)
        ii, jj = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        toks = np.empty((n, views) + grid, dtype=np.uint16)
        for a in range(n):
            for v in range(views):
                t = (3 * labels[a] + ii + jj + v) % k
                noise = rng.random(grid) < 0.1
                toks[a, v] = np.where(noise, rng.integers(0, k, grid), t)
        p = d / f"train-{f:06d}.npy"
        np.save(p, toks)
        meta = {"keys": [f"{f}-{a}" for a in range(n)], "labels": labels.tolist(), "codebook_size": k,
                "grid": list(grid), "views": views}
        p.with_suffix(".json").write_text(json.dumps(meta))
        files.append(str(p))
    return files


def cfg(**kw) -> dict:
    c = dict(preset="tiny", model=dict(n_layer=2, n_head=2, n_embd=32, dropout=0.1), conditional=True,
             class_dropout=0.1, steps=8, batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=2,
             weight_decay=0.1, betas=[0.9, 0.95], grad_clip=1.0, label_smoothing=0.1, ema=None, compile=False,
             precision="auto", seed=0, log_every=1, checkpoint_every=2, device="cpu")
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("tokens"))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_dataset_views_and_order(tokens):
    ds = TokenDataset(tokens, seed=3)
    assert len(ds) == 48 and ds.grid == (4, 4) and ds.codebook_size == 16
    t1, l1, p1 = ds.next_batch((0, 0), 30)
    t2, l2, p2 = ds.next_batch(p1, 30)       # runs into epoch 1
    assert t1.shape == (30, 16) and t1.dtype == np.int64 and p1 == (0, 30) and p2 == (1, 12)
    again = TokenDataset(tokens, seed=3)
    a1, _, _ = again.next_batch((0, 0), 30)
    assert np.array_equal(a1, t1)
    # the first epoch visits every image once
    assert sorted(ds.order(0).tolist()) == list(range(48))
    # both views are used
    h = ds.view_of(0, np.arange(48)) % np.uint64(2)
    assert 0 < int(h.sum()) < 48



def test_dataset_of_float_latent_grids(tokens, tmp_path):
    """Float16 (N, V, h, w, C) shards (continuous latents) stream like code grids: same order and
    views, float32 (B, h*w, C) batches, no codebook."""
    latents = []
    for f in tokens:
        codes = np.load(f).astype(np.float32)
        lat = np.stack([codes, -codes, codes * 0.5], axis=-1).astype(np.float16)   # C = 3, derived from the codes
        p = tmp_path / Path(f).name
        np.save(p, lat)
        meta = json.loads(Path(f).with_suffix(".json").read_text())
        meta.pop("codebook_size")
        p.with_suffix(".json").write_text(json.dumps(meta))
        latents.append(str(p))
    ds, codes = TokenDataset(latents, seed=3), TokenDataset(tokens, seed=3)
    assert ds.codebook_size is None and ds.grid == (4, 4) and ds.num_classes == codes.num_classes
    batch, pos = ds.batch((0, 40), 20)          # runs into epoch 1
    want, _ = codes.batch((0, 40), 20)
    assert batch["tokens"].dtype == np.float32 and batch["tokens"].shape == (20, 16, 3) and pos == (1, 12)
    np.testing.assert_array_equal(batch["tokens"][..., 0], want["tokens"])
    np.testing.assert_array_equal(batch["tokens"][..., 2], want["tokens"] * 0.5)
    np.testing.assert_array_equal(batch["labels"], want["labels"])


@pytest.mark.parametrize("ema,accum", [(None, 1), (0.9, 2)])
def test_exact_resume(tokens, tmp_path, ema, accum):
    c = cfg(ema=ema, grad_accum=accum, checkpoint_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    train_stage1(c, tokens, str(a), progress=False)
    s1 = train_stage1(c, tokens, str(b), max_steps=4, progress=False)
    assert not s1["finished"] and not (b / "final.pt").exists()
    assert torch.load(b / "last.pt", weights_only=True)["step"] == 4
    s2 = train_stage1(c, tokens, str(b), progress=False)
    assert s2["finished"] and s2["steps"] == 8
    ca = torch.load(a / "final.pt", weights_only=True)
    cb = torch.load(b / "final.pt", weights_only=True)
    for k in ("model", "optimizer", "scheduler", "ema", "step", "data_position", "model_config"):
        _assert_same(ca[k], cb[k], k)
    if ema:
        assert ca["ema"] is not None and not torch.equal(ca["ema"]["head.weight"], ca["model"]["head.weight"])
    assert _losses(a) == _losses(b) and len(_losses(b)) == 8
    summary = json.loads((b / "train.json").read_text())
    assert summary["steps"] == 8 and len(summary["checkpoint_sha256"]) == 64
    # calling a finished run again is a no-op that leaves the checkpoints as they are
    s3 = train_stage1(c, tokens, str(b), progress=False)
    assert s3["steps"] == 8 and s3["checkpoint_sha256"] == summary["checkpoint_sha256"]


def test_changed_config_starts_fresh(tokens, tmp_path):
    out = tmp_path / "run"
    train_stage1(cfg(steps=4), tokens, str(out), max_steps=2, progress=False)
    # a longer schedule resumes (steps may change) ...
    train_stage1(cfg(steps=4), tokens, str(out), progress=False)
    assert len(_losses(out)) == 4
    # ... a different lr does not
    train_stage1(cfg(steps=2, lr=1e-3), tokens, str(out), progress=False)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # ... and a checkpoint past a smaller `steps` is not taken as finished
    train_stage1(cfg(steps=4, lr=1e-3), tokens, str(out), progress=False)
    s = train_stage1(cfg(steps=3, lr=1e-3), tokens, str(out), progress=False)
    assert s["steps"] == 3 and torch.load(out / "final.pt", weights_only=True)["step"] == 3


def test_nan_stops_without_checkpointing_bad_step(tokens, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("DIGIT_INJECT_NAN_AT_STEP", "5")
    with pytest.raises(FloatingPointError, match="step 5"):
        train_stage1(cfg(checkpoint_every=2), tokens, str(out), progress=False)
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] == 4
    model, meta = load_model(str(out / "last.pt"))
    assert meta["step"] == 4 and not (out / "final.pt").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loss_decreases_logs_and_load_model(tokens, tmp_path):
    out = tmp_path / "run"
    c = cfg(steps=60, batch_size=16, log_every=5, checkpoint_every=20, ema=0.9, lr=1e-2, warmup_steps=5)
    s = train_stage1(c, tokens, str(out), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    for r in rows:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed"} <= r.keys()
    with open(out / "metrics.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == METRIC_COLUMNS
        assert len(list(reader)) == len(rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    assert s["final_loss"] == rows[-1]["loss"] and s["params"] > 0
    assert rows[-1]["lr"] < rows[1]["lr"]          # cosine decay

    ck = torch.load(out / "final.pt", weights_only=True)
    mc = dict(ck["model_config"], grid=tuple(ck["model_config"]["grid"]))
    ref = GPT(GPTConfig(**mc))
    ref.load_state_dict(ck["model"])
    ref.eval()
    model, meta = load_model(str(out / "final.pt"), ema=False)
    assert not model.training and meta["num_classes"] == 4 and meta["vocab_size"] == 16 and meta["grid"] == [4, 4]
    assert meta["step"] == 60 and meta["sha256"] == s["checkpoint_sha256"]
    x = torch.randint(0, 16, (3, 16))
    y = torch.tensor([0, 1, 4])    # 4 = null class
    with torch.no_grad():
        assert torch.equal(model(x, labels=y)[0], ref(x, labels=y)[0])
    model_ema, meta_ema = load_model(str(out / "final.pt"), ema=True)
    assert meta_ema["ema"]
    _assert_same(model_ema.state_dict(), ck["ema"])



def test_inverse_sqrt_schedule_values():
    """fairseq's inverse_sqrt (DiGIT's configs): linear from warmup_init_lr to lr, then lr*sqrt(warm/step)."""
    c = cfg(schedule="inverse_sqrt", lr=3e-4, warmup_init_lr=1e-7, warmup_steps=6250, steps=125000)
    assert lr_at(0, c) == pytest.approx(1e-7)
    assert lr_at(3125, c) == pytest.approx(1e-7 + (3e-4 - 1e-7) / 2)
    assert lr_at(6250, c) == pytest.approx(3e-4)
    assert lr_at(25000, c) == pytest.approx(1.5e-4)                 # sqrt(6250 / 25000) = 1/2
    assert lr_at(125000, c) == pytest.approx(3e-4 * (6250 / 125000) ** 0.5)
    assert lr_at(200000, c) < lr_at(125000, c)                      # no floor at min_lr, no end
    lrs = [lr_at(s, c) for s in range(0, 20000, 50)]
    peak = lrs.index(max(lrs))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises ...
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))   # ... then falls
    with pytest.raises(ValueError, match="warmup_steps > 0"):
        lr_at(0, dict(c, warmup_steps=0))
    with pytest.raises(ValueError, match="unknown train.schedule 'linear'"):
        lr_at(0, dict(c, schedule="linear"))


def test_constant_schedule_values():
    """MAR's constant schedule: linear warmup to lr, then lr until the end (min_lr not used)."""
    c = cfg(schedule="constant", lr=8e-4, min_lr=1e-6, warmup_steps=100, steps=1000)
    assert lr_at(0, c) == pytest.approx(8e-6)
    assert lr_at(49, c) == pytest.approx(4e-4)
    assert [lr_at(s, c) for s in (99, 100, 500, 999, 5000)] == [pytest.approx(8e-4)] * 5


def test_inverse_sqrt_resume_and_logged_lr(tokens, tmp_path):
    c = cfg(schedule="inverse_sqrt", warmup_init_lr=1e-5, warmup_steps=3, lr=3e-3, checkpoint_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    train_stage1(c, tokens, str(a), progress=False)
    train_stage1(c, tokens, str(b), max_steps=5, progress=False)
    train_stage1(c, tokens, str(b), progress=False)
    ca = torch.load(a / "final.pt", weights_only=True)
    cb = torch.load(b / "final.pt", weights_only=True)
    for k in ("model", "optimizer", "scheduler", "step", "data_position"):
        _assert_same(ca[k], cb[k], k)
    logged = [json.loads(x)["lr"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    expected = [1e-5 + (3e-3 - 1e-5) * s / 3 for s in range(3)] + [3e-3 * (3 / s) ** 0.5 for s in range(3, 8)]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from pipeline.train import train_stage1
c = json.loads(open(sys.argv[1]).read())
train_stage1(c, sys.argv[3:], sys.argv[2], progress=False)
"""


def test_ddp_matches_single_process(tokens, tmp_path):
    c = cfg(steps=6, batch_size=8, model=dict(n_layer=2, n_head=2, n_embd=32, dropout=0.0), class_dropout=0.0,
            checkpoint_every=0)
    single = tmp_path / "single"
    train_stage1(c, tokens, str(single), progress=False)

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO)))
    cpath = tmp_path / "cfg.json"
    cpath.write_text(json.dumps(dict(c, grad_accum=2)))   # 2 ranks x 2 micro-steps x 2 rows = 8
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(cpath), str(ddp), *tokens],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((ddp / "train.json").read_text())["world_size"] == 2
    np.testing.assert_allclose(_losses(ddp), _losses(single), rtol=1e-4)
    a = torch.load(single / "final.pt", weights_only=True)["model"]
    b = torch.load(ddp / "final.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
