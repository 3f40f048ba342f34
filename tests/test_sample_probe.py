"""Sample stage (resumable, seed-per-sample) and the linear probe, on tiny fabricated models."""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.families as families
from pipeline.io import file_sha256
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.probe import probe_stage
from pipeline.sample import sample_stage

CFG = dict(n_per_class=3, n=5, temperature=1.0, top_k=None, top_p=None, cfg_scale=1.0, seed=7,
           batch_size=4, chunk=4)


def make_ckpt(path: Path, num_classes=3, seed=0, ema=True) -> Path:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=16, grid=(4, 4), n_layer=2, n_head=2, n_embd=32, num_classes=num_classes)
    model = GPT(cfg)
    mc = asdict(cfg)
    mc["grid"] = list(mc["grid"])
    state = model.state_dict()
    torch.save({"format": "digit-stage1-v1", "model_config": mc, "model": state,
                "ema": {k: v.clone() for k, v in state.items()} if ema else None,
                "step": 123, "train_cfg": {}}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ck") / "cond.pt")


def run(ckpt, out, **over):
    return sample_stage(str(ckpt), str(out), {**CFG, **over}, device="cpu", progress=False)


def test_class_counts_and_meta(ckpt, tmp_path):
    meta = run(ckpt, tmp_path / "a", cfg_scale=1.5, top_k=8)
    toks, labels = np.load(tmp_path / "a/tokens.npy"), np.load(tmp_path / "a/labels.npy")
    assert toks.shape == (9, 4, 4) and toks.dtype == np.uint16 and toks.max() < 16
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    js = json.loads((tmp_path / "a/samples.json").read_text())
    assert js == meta and js["n"] == 9 and js["model_step"] == 123 and js["weights"] == "ema"
    assert js["checkpoint_sha256"] == file_sha256(ckpt)
    for k in ("temperature", "top_k", "top_p", "cfg_scale", "seed", "batch_size", "chunk"):
        assert js[k] == {**CFG, "cfg_scale": 1.5, "top_k": 8}[k]
    assert "seed" in js["seed_rule"]


def test_batch_and_chunk_invariance(ckpt, tmp_path):
    run(ckpt, tmp_path / "ref", batch_size=1, chunk=3)
    ref = np.load(tmp_path / "ref/tokens.npy")
    for i, over in enumerate([dict(batch_size=8, chunk=3), dict(batch_size=8, chunk=10),
                              dict(batch_size=2, chunk=1)]):
        run(ckpt, tmp_path / f"o{i}", **over)
        np.testing.assert_array_equal(np.load(tmp_path / f"o{i}/tokens.npy"), ref)
    assert len(list((tmp_path / "o1/parts").glob("part-*.npy"))) == 1
    # a different seed gives different samples
    run(ckpt, tmp_path / "s", seed=8)
    assert not np.array_equal(np.load(tmp_path / "s/tokens.npy"), ref)


def test_resume_after_crash(ckpt, tmp_path, monkeypatch):
    run(ckpt, tmp_path / "full")
    ref = np.load(tmp_path / "full/tokens.npy")
    real, calls = families.autoregressive_sample, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(families, "autoregressive_sample", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        run(ckpt, tmp_path / "r")
    assert (tmp_path / "r/parts/part-00000.json").is_file() and not (tmp_path / "r/tokens.npy").exists()
    counted = []

    def counting(*a, **k):
        counted.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(families, "autoregressive_sample", counting)
    meta = run(ckpt, tmp_path / "r")
    assert counted == [4, 1] and meta["made_samples_this_run"] == 5  # part 0 was skipped
    np.testing.assert_array_equal(np.load(tmp_path / "r/tokens.npy"), ref)
    # deleting one part and the final files redoes just that part
    for f in ("tokens.npy", "labels.npy", "samples.json", "parts/part-00001.npy"):
        (tmp_path / "r" / f).unlink()
    counted.clear()
    run(ckpt, tmp_path / "r")
    assert counted == [4]
    np.testing.assert_array_equal(np.load(tmp_path / "r/tokens.npy"), ref)
    # a changed parameter invalidates every part
    counted.clear()
    run(ckpt, tmp_path / "r", temperature=0.5)
    assert counted == [4, 4, 1]


def test_world_size_split(ckpt, tmp_path, monkeypatch):
    run(ckpt, tmp_path / "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(ckpt, tmp_path / "two")["complete"] is False
    assert sorted(p.name for p in (tmp_path / "two/parts").glob("*.npy")) == ["part-00001.npy"]
    monkeypatch.setenv("RANK", "0")
    assert run(ckpt, tmp_path / "two")["complete"] is True
    np.testing.assert_array_equal(np.load(tmp_path / "two/tokens.npy"), np.load(tmp_path / "one/tokens.npy"))


def test_unconditional(tmp_path):
    ck = make_ckpt(tmp_path / "u.pt", num_classes=0, ema=False)
    meta = run(ck, tmp_path / "u")
    assert np.load(tmp_path / "u/tokens.npy").shape == (5, 4, 4)
    assert np.load(tmp_path / "u/labels.npy").tolist() == [-1] * 5
    assert meta["weights"] == "model" and meta["n"] == 5
    with pytest.raises(ValueError, match="class-conditional"):
        run(ck, tmp_path / "u2", cfg_scale=2.0)


def write_tokens(path: Path, n: int, rng, num_classes=3, vocab=16):
    """Class c -> tokens mostly from {5c..5c+4}, sometimes uniform noise."""
    labels = rng.integers(0, num_classes, n)
    own = 5 * labels[:, None, None, None] + rng.integers(0, 5, (n, 2, 4, 4))
    noise = rng.integers(0, vocab, (n, 2, 4, 4))
    grids = np.where(rng.random((n, 2, 4, 4)) < 0.7, own, noise).astype(np.uint16)
    np.save(path, grids)
    path.with_suffix(".json").write_text(json.dumps({
        "keys": [f"k{i}" for i in range(n)], "labels": labels.tolist(), "codebook_size": vocab,
        "grid": [4, 4], "views": 2}))
    return str(path)


@pytest.mark.parametrize("num_classes", [3, 0])
def test_probe(tmp_path, num_classes):
    ck = make_ckpt(tmp_path / "m.pt", num_classes=num_classes, seed=1)
    rng = np.random.default_rng(0)
    train = [write_tokens(tmp_path / f"train-{i:06d}.npy", 80, rng) for i in range(2)]
    test = [write_tokens(tmp_path / "val-000000.npy", 90, rng)]
    cfg = dict(max_train=120, epochs=30, lr=0.01, batch_size=32, weight_decay=0.0, seed=0)
    out = tmp_path / "probe.json"
    res = probe_stage(str(ck), train, test, str(out), cfg, device="cpu", progress=False)
    assert json.loads(out.read_text()) == res
    assert res["n_train"] == 120 and res["n_test"] == 90
    assert [r["layer"] for r in res["per_layer"]] == [0, 1]
    assert res["best_test_acc"] == max(r["test_acc"] for r in res["per_layer"])
    assert res["best_test_acc"] > 0.8, res  # chance is 1/3
    assert res["probe_cfg"] == cfg
    # deterministic
    res2 = probe_stage(str(ck), train, test, str(tmp_path / "p2.json"), cfg, device="cpu", progress=False)
    assert res2["per_layer"] == res["per_layer"]
