"""The mask-predict family (MaskGIT; DiGIT's NAR stage 2): masking law, decoding schedule, seeded
sampling, the objective, training through the generic trainer, and learning on real tokens."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.gpt import GPTConfig
from pipeline.models.mask_sampling import mask_predict_sample
from pipeline.models.maskgit import MaskPredictor, decode_schedule, mask_counts, random_mask
from pipeline.objectives import MaskedTokenCE
from pipeline.train import load_model, train_stage1
from test_stage2 import DIGIT_K, VQ_K, cfg, make_pairs


def tiny(context=True, num_classes=0, grid=(7, 7)) -> MaskPredictor:
    torch.manual_seed(0)
    extra = dict(context_vocab_size=DIGIT_K, context_grid=grid) if context else {}
    return MaskPredictor(GPTConfig(vocab_size=VQ_K, grid=grid, n_layer=2, n_head=2, n_embd=32,
                                   num_classes=num_classes, **extra)).eval()


class Recorder(MaskPredictor):
    """A MaskPredictor that keeps every input grid it is given."""
    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def forward(self, tokens, labels=None, context=None):
        self.seen.append((tokens.clone(), None if context is None else context.clone()))
        return super().forward(tokens, labels, context)


# -- masking (training) -----------------------------------------------------------------------------

def test_mask_counts_follow_the_cosine_law():
    """P(count <= k) = 1 - (2/pi) arccos(k/n) for count = ceil(n cos(pi/2 u)), u ~ U(0,1)."""
    n, draws = 49, 40000
    g = torch.Generator().manual_seed(0)
    counts = random_mask(draws, n, generator=g).sum(1).numpy()
    assert counts.min() >= 1 and counts.max() <= n
    empirical = np.array([(counts <= k).mean() for k in range(n + 1)])
    law = np.array([1 - 2 / math.pi * math.acos(k / n) for k in range(n + 1)])
    assert np.abs(empirical - law).max() < 0.012, np.abs(empirical - law).max()
    # the mean masked fraction is about 2/pi, and u -> 0 masks everything, u -> 1 still one
    assert abs(counts.mean() / n - 2 / math.pi) < 0.02
    assert mask_counts(n, torch.tensor([0.0, 0.999999, 1.0])).tolist() == [n, 1, 1]


def test_masked_positions_are_uniform_over_the_grid():
    masks = random_mask(20000, 16, generator=torch.Generator().manual_seed(1)).float()
    per_position = masks.mean(0)
    assert (per_position - per_position.mean()).abs().max() < 0.02


def test_objective_masks_only_the_grid_and_scores_only_masked_positions():
    model = Recorder(tiny().config).train()
    x = torch.randint(0, VQ_K, (16, 49))
    ctx = torch.randint(0, DIGIT_K, (16, 49))
    objective = MaskedTokenCE(model.mask_code, label_smoothing=0.1)
    torch.manual_seed(3)
    loss = objective.loss(model, {"tokens": x, "context": ctx})
    (inputs, seen_ctx), = model.seen
    torch.testing.assert_close(seen_ctx, ctx)                          # the context is never masked
    masked = inputs == model.mask_code
    assert masked.sum(1).min() >= 1
    assert torch.equal(inputs[~masked], x[~masked])                    # unmasked grid tokens pass through
    torch.manual_seed(3)                                               # the same draws, independently
    assert torch.equal(masked, random_mask(16, 49))
    logits = MaskPredictor.forward(model, inputs, None, ctx)
    expected = F.cross_entropy(logits[masked], x[masked], label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_every_position_sees_every_other():
    """Changing the last grid token changes the logits of the first (no causal mask), and the
    context reaches every position."""
    model = tiny()
    x = torch.full((1, 49), model.mask_code)
    ctx = torch.zeros(1, 49, dtype=torch.long)
    base = model(x, context=ctx)
    x2 = x.clone()
    x2[0, -1] = 3
    assert not torch.allclose(model(x2, context=ctx)[0, 0], base[0, 0])
    ctx2 = ctx.clone()
    ctx2[0, -1] = 5
    assert not torch.allclose(model(x, context=ctx2)[0, 0], base[0, 0])
    with pytest.raises(ValueError, match="needs a context"):
        model(x)


# -- decoding -----------------------------------------------------------------------------------------

def test_decode_schedule_values():
    assert decode_schedule(256, 8) == [math.floor(256 * math.cos(math.pi / 2 * (t + 1) / 8)) for t in range(7)] + [0]
    assert decode_schedule(49, 8) == [48, 45, 40, 34, 27, 18, 9, 0]
    assert decode_schedule(49, 1) == [0]
    # more steps than tokens: every step still fixes one token until one is left
    assert decode_schedule(3, 6) == [2, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError):
        decode_schedule(4, 0)


@pytest.mark.parametrize("iterations", [1, 4, 8])
def test_decoding_follows_the_schedule(iterations):
    model = Recorder(tiny().config).eval()
    model.load_state_dict(tiny().state_dict())
    ctx = torch.randint(0, DIGIT_K, (5, 49))
    out = mask_predict_sample(model, 5, context=ctx, iterations=iterations, seeds=range(5))
    assert len(model.seen) == iterations
    still_masked = [int((x == model.mask_code).sum(1).unique().item()) for x, _ in model.seen]
    assert still_masked == [49] + decode_schedule(49, iterations)[:-1]
    assert not (out == model.mask_code).any() and out.max() < VQ_K
    # a token fixed at one step is never re-masked or changed later
    grids = [x for x, _ in model.seen] + [out]
    for before, after in zip(grids, grids[1:]):
        known = before != model.mask_code
        assert torch.equal(after[known], before[known])


def test_same_seed_same_tokens_across_batch_sizes():
    model = tiny(num_classes=3)
    labels = torch.arange(8) % 3
    ctx = torch.randint(0, DIGIT_K, (8, 49))
    runs = [mask_predict_sample(model, 8, labels=labels, context=ctx, seeds=range(100, 108), batch_size=b,
                                top_k=5) for b in (1, 3, 8)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    other = mask_predict_sample(model, 8, labels=labels, context=ctx, seeds=range(200, 208), top_k=5)
    assert not torch.equal(other, runs[0])
    # sample i depends on seed i alone: the last four of eight equal the same four drawn alone
    alone = mask_predict_sample(model, 4, labels=labels[4:], context=ctx[4:], seeds=range(104, 108), top_k=5)
    assert torch.equal(alone, runs[0][4:])


def test_temperature_zero_and_guidance():
    model = tiny(context=False, num_classes=3)
    a = mask_predict_sample(model, 4, labels=torch.tensor([0, 1, 2, 0]), temperature=0, seeds=range(4))
    b = mask_predict_sample(model, 4, labels=torch.tensor([0, 1, 2, 0]), temperature=0, seeds=range(4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        mask_predict_sample(tiny(context=False), 2, cfg_scale=2.0)


# -- training through the generic trainer --------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("nar_pairs"))


def test_nar_stage2_learns_the_context_map_and_resumes_exactly(pairs, tmp_path):
    """Trained through the generic trainer, the NAR stage 2 learns VQ = (5 d + 1) % 8 from the
    context in one decoding pass; a run stopped and resumed ends with the same weights."""
    torch.set_num_threads(2)
    digit, vq = pairs
    c = cfg(steps=80, checkpoint_every=30, ema=0.9)
    train_stage1(c, vq, str(tmp_path / "a"), context_files=digit, family="maskgit", progress=False)
    train_stage1(c, vq, str(tmp_path / "b"), context_files=digit, family="maskgit", max_steps=35, progress=False)
    train_stage1(c, vq, str(tmp_path / "b"), context_files=digit, family="maskgit", progress=False)
    ca = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert ca["family"] == "maskgit"
    for key in ("model", "ema", "optimizer"):
        for name, value in ca[key].items() if key != "optimizer" else ():
            assert torch.equal(value, cb[key][name]), (key, name)
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("a", "b")]
    assert losses[0] == losses[1]

    with pytest.raises(ValueError, match="not a GPT"):
        load_model(str(tmp_path / "a" / "final.pt"))
    from pipeline.checkpoints import load_generator
    model, meta = load_generator(str(tmp_path / "a" / "final.pt"), ema=False)
    assert isinstance(model, MaskPredictor) and meta["family"] == "maskgit"
    ctx = torch.from_numpy(np.load(digit[0])[:10, 0].reshape(10, -1).astype(np.int64))
    out = mask_predict_sample(model, 10, context=ctx, iterations=1, temperature=0, seeds=range(10))
    assert ((out == (5 * ctx + 1) % VQ_K).float().mean()) > 0.95


# -- learning on real data (slow: builds smoke tokens with the DAG) -------------------------------------

@pytest.mark.slow
def test_nar_stage2_reconstructs_real_vq_tokens_from_digit_tokens(repo, tmp_path, fmnist_dir):
    """On real Fashion-MNIST smoke tokens, a tiny NAR stage 2 trained a few hundred steps predicts
    the VQ tokens of held-out images from their DiGIT tokens (one pass, all masked, argmax) clearly
    better than the unconditional token frequencies (the most frequent code at each position)."""
    import yaml

    from conftest import run_snakemake
    from pipeline.checkpoints import load_generator
    from pipeline.config import validate_config

    cfg_path = tmp_path / "smoke.yaml"
    cfg_path.write_text((repo / "configs" / "smoke.yaml").read_text())
    cfg = validate_config(yaml.safe_load(cfg_path.read_text()))
    work = tmp_path / "work"
    work.mkdir()
    targets = [f"results/smoke/{kind}/{split}-{i:06d}.npy" for kind in ("tokens", "vq_tokens")
               for split in ("train", "test") for i in range(3)]
    run_snakemake(*targets, workdir=work, configfile=cfg_path)
    res = work / "results" / "smoke"
    files = {(kind, split): sorted(str(p) for p in (res / kind).glob(f"{split}-*.npy"))
             for kind in ("tokens", "vq_tokens") for split in ("train", "test")}
    train_cfg = {**cfg["stage2_nar"]["train"], "steps": 300, "batch_size": 32, "lr": 0.003, "warmup_steps": 20,
                 "checkpoint_every": 300, "log_every": 50, "device": "cpu"}
    torch.set_num_threads(2)
    train_stage1(train_cfg, files["vq_tokens", "train"], str(tmp_path / "nar"),
                 context_files=files["tokens", "train"], family="maskgit", progress=False)
    model, _ = load_generator(str(tmp_path / "nar" / "final.pt"), ema=False)

    def view0(kind, split):
        grids = [np.load(f)[:, 0] for f in files[kind, split]]
        return np.concatenate([g.reshape(len(g), -1) for g in grids]).astype(np.int64)

    train_vq, test_vq, test_ctx = view0("vq_tokens", "train"), view0("vq_tokens", "test"), view0("tokens", "test")
    k = model.config.vocab_size
    mode = np.array([np.bincount(train_vq[:, p], minlength=k).argmax() for p in range(train_vq.shape[1])])
    freq_acc = float((test_vq == mode[None]).mean())
    out = mask_predict_sample(model, len(test_ctx), context=torch.from_numpy(test_ctx), iterations=1,
                              temperature=0, seeds=range(len(test_ctx)), batch_size=100).numpy()
    nar_acc = float((out == test_vq).mean())
    print(f"held-out VQ token accuracy: NAR stage 2 {nar_acc:.3f} vs per-position mode {freq_acc:.3f} "
          f"({len(test_vq)} images, K={k})")
    assert nar_acc > freq_acc + 0.1 and nar_acc > 1.5 * freq_acc, (nar_acc, freq_acc)


@pytest.mark.parametrize("name", ["default", "smoke", "imagenet_base", "imagenet_large"])
def test_maskgit_baseline_has_the_vq_gpts_size_and_budget(repo, name):
    from pipeline.config import load_config

    cfg = load_config(repo / "configs" / f"{name}.yaml")
    same = ("preset", "model", "steps", "batch_size", "grad_accum", "conditional", "lr", "schedule", "warmup_steps")
    assert {k: cfg["maskgit"]["train"][k] for k in same} == {k: cfg["train"][k] for k in same}
    for k in ("preset", "model"):      # the NAR stage 2 is the AR stage 2's size
        assert cfg["stage2_nar"]["train"][k] == cfg["stage2"]["train"][k], k
