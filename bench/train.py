"""Stage-1 training throughput: our GPT vs Hugging Face GPT2LMHeadModel of the same shape.

Same width, depth, heads, vocabulary and number of transformer positions (ours: condition + the
first h*w-1 tokens, predicting all h*w; HF: h*w tokens with n_positions = h*w), same batch, AdamW,
fp32 (bf16 autocast on GPU with --bf16). HF's head is untied to match ours; GPT-2 keeps its biases
and tanh-GELU. Prints tokens/s of each and the ratio.

    python bench/train.py --dim 256 --layers 4 --heads 4 --vocab 1024 --batch 8
    python bench/train.py --train-stage1    # also time pipeline.train.train_stage1 end to end
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.devices import resolve_device  # noqa: E402
from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402


def step_times(step_fn, warmup: int, steps: int, device) -> list[float]:
    for _ in range(warmup):
        step_fn()
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternate ours/HF this many times")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-stage1", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    T = args.grid * args.grid
    tokens_per_step = args.batch * T
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
           else torch.autocast(device.type, enabled=False))
    print(f"device {device}, threads {torch.get_num_threads()}, {args.layers}L x {args.heads}H x {args.dim}d, "
          f"vocab {args.vocab}, {T} positions, batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}")

    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, T), device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    ours = GPT(GPTConfig(vocab_size=args.vocab, grid=(args.grid, args.grid), n_layer=args.layers,
                         n_head=args.heads, n_embd=args.dim, dropout=0.0, num_classes=10, class_dropout=0.1)).to(device)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def step_ours():
        with amp:
            _, loss = ours(x, labels=y, targets=x, label_smoothing=0.1)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    runs = {"ours": (step_ours, ours)}
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers not installed: HF comparison skipped (pip install transformers)")
        GPT2LMHeadModel = None
    if GPT2LMHeadModel is not None:
        hcfg = GPT2Config(vocab_size=args.vocab, n_positions=T, n_embd=args.dim, n_layer=args.layers,
                          n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=False)
        try:
            hf = GPT2LMHeadModel._from_config(hcfg, attn_implementation="sdpa").to(device)
        except Exception:
            hf = GPT2LMHeadModel(hcfg).to(device)
        opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4)

        def step_hf():
            with amp:
                loss = hf(input_ids=x, labels=x).loss
            loss.backward()
            opt_h.step()
            opt_h.zero_grad(set_to_none=True)

        runs["hf"] = (step_hf, hf)

    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, (fn, m) in runs.items():
            m.train()
            times[k] += step_times(fn, args.warmup, args.steps, device)
    tps = {}
    for k, (fn, m) in runs.items():
        med = statistics.median(times[k])
        tps[k] = tokens_per_step / med
        n = sum(p.numel() for p in m.parameters())
        print(f"{k:>4}: {n / 1e6:.2f}M params, median step {med * 1e3:.1f} ms, {tps[k]:,.0f} tokens/s")
    if "hf" in tps:
        print(f"ours/HF tokens/s ratio: {tps['ours'] / tps['hf']:.2f}x (target >= 1.0x)")

    if args.train_stage1:
        import numpy as np
        import json
        from pipeline.train import train_stage1
        with tempfile.TemporaryDirectory() as d:
            n = max(64, args.batch * 4)
            rng = np.random.default_rng(0)
            p = Path(d) / "train-000000.npy"
            np.save(p, rng.integers(0, args.vocab, (n, 1, args.grid, args.grid)).astype(np.uint16))
            p.with_suffix(".json").write_text(json.dumps({"keys": [str(i) for i in range(n)],
                                                          "labels": [i % 10 for i in range(n)],
                                                          "codebook_size": args.vocab,
                                                          "grid": [args.grid, args.grid], "views": 1}))
            steps = args.warmup + args.steps
            cfg = dict(preset="tiny", model=dict(n_layer=args.layers, n_head=args.heads, n_embd=args.dim),
                       conditional=True, class_dropout=0.1, steps=steps, batch_size=args.batch, grad_accum=1,
                       lr=1e-4, min_lr=1e-5, warmup_steps=1, weight_decay=0.1, betas=[0.9, 0.95], grad_clip=1.0,
                       label_smoothing=0.1, ema=0.9999, compile=False,
                       precision="bf16" if args.bf16 else "fp32", seed=0, log_every=args.warmup,
                       checkpoint_every=0, device=str(device))
            train_stage1(cfg, [str(p)], d + "/out", progress=False)
            rows = [json.loads(r) for r in (Path(d) / "out" / "metrics.jsonl").read_text().splitlines()]
            print(f"train_stage1 (EMA, clip, logging; steps {args.warmup + 1}..{steps}): "
                  f"{rows[-1]['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
