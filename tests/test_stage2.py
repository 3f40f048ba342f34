"""Stage 2 (DiGIT tokens -> VQ tokens) and rendering: context model, trainer, sampling, decoding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.artifacts import summarise
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.sampling import sample
from pipeline.models.vqgan import VQGAN, preset
from pipeline.render import render_stage
from pipeline.token_data import TokenDataset
from pipeline.train import load_model, train_stage1
from pipeline.vq import save_vq

DIGIT_K, VQ_K = 12, 8
VQ_MODEL = {"ch_mult": (1, 1, 1), "n_embed": VQ_K}     # 28 px -> 7x7 grid


def make_pairs(d: Path, n=40, views=2, grid=(7, 7), seed=0) -> tuple[list[str], list[str]]:
    """Paired token shards: every image's DiGIT grid holds one code d, its VQ grid (5d + 1) % 8, so stage 2
    can learn the map from the context within a few dozen steps."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    digit, vq = [], []
    for f in range(2):
        dg = np.broadcast_to(rng.integers(0, DIGIT_K, (n, views, 1, 1)), (n, views) + grid).astype(np.uint16)
        vg = ((dg.astype(np.int64) * 5 + 1) % VQ_K).astype(np.uint16)
        keys = [f"{f}-{a}" for a in range(n)]
        crops = [[[0, 0, 0]] * views for _ in range(n)]
        for sub, arr, k, out in (("tokens", dg, DIGIT_K, digit), ("vq_tokens", vg, VQ_K, vq)):
            p = d / sub / f"train-{f:06d}.npy"
            p.parent.mkdir(exist_ok=True)
            np.save(p, arr)
            p.with_suffix(".json").write_text(json.dumps(
                {"keys": keys, "labels": [a % 3 for a in range(n)], "codebook_size": k, "grid": list(grid),
                 "crops": crops}))
            out.append(str(p))
    return digit, vq


def cfg(**kw) -> dict:
    c = dict(preset="tiny", model=dict(n_layer=2, n_head=2, n_embd=32), conditional=False, class_dropout=0.0,
             steps=60, batch_size=16, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.0,
             betas=[0.9, 0.95], grad_clip=1.0, label_smoothing=0.0, ema=None, compile=False, precision="fp32",
             seed=0, log_every=5, checkpoint_every=100, device="cpu")
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def stage2(pairs, tmp_path_factory):
    torch.set_num_threads(2)
    digit, vq = pairs
    out = tmp_path_factory.mktemp("stage2")
    summary = train_stage1(cfg(), vq, str(out), context_files=digit, progress=False)
    return out, summary


def test_context_model_loss_is_on_the_vq_part_only():
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=VQ_K, grid=(3, 3), n_layer=2, n_head=2, n_embd=32, context_vocab_size=DIGIT_K,
                  context_grid=(2, 2))
    m = GPT(c).eval()
    ctx, x = torch.randint(0, DIGIT_K, (4, 4)), torch.randint(0, VQ_K, (4, 9))
    logits, loss = m(x, targets=x, context=ctx)
    assert logits.shape == (4, 9, VQ_K)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, VQ_K), x.reshape(-1)))
    # the context reaches the first VQ prediction; a model without context rejects one
    other = m(x, context=(ctx + 1) % DIGIT_K)[0]
    assert not torch.allclose(other[:, 0], logits[:, 0])
    with pytest.raises(ValueError, match="context"):
        m(x)
    # the KV cache prefilled with the context gives the full forward's logits
    cache = m.new_cache(4)
    assert torch.allclose(m.prefill(None, cache, ctx), logits[:, 0], atol=1e-5)
    assert torch.allclose(m.decode_step(x[:, 0], cache), logits[:, 1], atol=1e-5)


def test_paired_dataset_checks_alignment(pairs, tmp_path):
    digit, vq = pairs
    ds = TokenDataset(vq, seed=1, context_files=digit)
    toks, ctx, labels, pos = ds.next_batch((0, 0), 30, with_context=True)
    assert toks.shape == (30, 49) and ctx.shape == (30, 49)
    assert np.array_equal(toks, (ctx * 5 + 1) % VQ_K)          # same image, same view
    bad = tmp_path / "train-000000.npy"
    np.save(bad, np.load(digit[0]))
    meta = json.loads(Path(digit[0]).with_suffix(".json").read_text())
    meta["keys"] = meta["keys"][::-1]
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different image keys"):
        TokenDataset(vq[:1], context_files=[str(bad)])


def test_stage2_learns_and_samples_deterministically(stage2, pairs):
    out, summary = stage2
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["stage"] == "stage2" and summary["model_config"]["context_grid"] == [7, 7]
    assert losses[-1] < 0.5 * losses[0], losses
    model, meta = load_model(str(out / "final.pt"))
    assert meta["context_vocab_size"] == DIGIT_K and meta["context_grid"] == [7, 7]
    ctx = torch.from_numpy(np.load(pairs[0][0])[:6, 0].reshape(6, -1).astype(np.int64))
    a = sample(model, 6, top_p=0.8, seeds=range(6), context=ctx)
    b = sample(model, 6, top_p=0.8, seeds=range(6), context=ctx, batch_size=4, use_cache=False)
    assert torch.equal(a, b)
    # the learnt map: most tokens follow the context
    assert (a == (ctx * 5 + 1) % VQ_K).float().mean() > 0.5


def _sample_folder(d: Path, grids: np.ndarray, labels: np.ndarray) -> Path:
    d.mkdir(parents=True)
    np.save(d / "tokens.npy", grids.astype(np.uint16))
    np.save(d / "labels.npy", labels)
    (d / "samples.json").write_text(json.dumps({"checkpoint_sha256": "x", "num_classes": 3}))
    return d


def _vq_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "vq.pt"
    save_vq(path, VQGAN(preset("tiny", **VQ_MODEL)), {"test_psnr": None})
    return path


def test_render_through_stage2_and_direct(stage2, pairs, tmp_path):
    out, _ = stage2
    vq_path = _vq_file(tmp_path)
    labels = np.repeat(np.arange(3), 3)
    digit_grids = np.load(pairs[0][0])[:9, 0]
    folder = _sample_folder(tmp_path / "digit", digit_grids, labels)
    render_cfg = {"temperature": 1.0, "top_k": None, "top_p": 0.8, "seed": 0, "batch_size": 4, "chunk": 4}
    meta = render_stage(str(folder), str(vq_path), None, render_cfg, stage2_checkpoint=str(out / "final.pt"),
                        device="cpu", progress=False)
    with np.load(folder / "images.npz") as z:
        images, got_labels = z["images"], z["labels"]
    assert images.shape == (9, 28, 28, 3) and images.dtype == np.uint8
    assert got_labels.tolist() == labels.tolist() and meta["top_p"] == 0.8
    assert Image.open(folder / "grid.png").size[0] > 0
    summary = summarise(folder / "images.npz")
    assert summary["kind"] == "rendered images" and summary["shape"] == [9, 28, 28, 3]
    assert summary["stage2_sampling"]["top_p"] == 0.8
    vq_grids = np.load(folder / "vq_tokens.npy")
    assert vq_grids.shape == (9, 7, 7) and vq_grids.max() < VQ_K
    # resumable and deterministic: a rerun reuses the parts and decodes the same images
    parts = sorted((folder / "render").glob("part-*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in parts]
    render_stage(str(folder), str(vq_path), None, render_cfg, stage2_checkpoint=str(out / "final.pt"),
                 device="cpu", progress=False)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    with np.load(folder / "images.npz") as z:
        assert np.array_equal(z["images"], images)
    # the baseline route decodes VQ grids directly: the same grids give the same pixels
    direct = _sample_folder(tmp_path / "vq", vq_grids, labels)
    render_stage(str(direct), str(vq_path), None, {}, device="cpu", progress=False)
    with np.load(direct / "images.npz") as z:
        assert np.array_equal(z["images"], images)
    # DiGIT grids are not VQ tokens: a clear error instead of garbage images
    with pytest.raises(ValueError, match="need --stage2"):
        render_stage(str(folder), str(vq_path), str(tmp_path / "x"), {}, device="cpu", progress=False)
