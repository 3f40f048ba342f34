"""Stage-1 training throughput and MFU on a GPU: the `base` preset (DiGIT 219M) in bf16.

Synthetic token grids (the step time does not depend on the token values); AdamW (fused),
bf16 autocast, optional torch.compile. MFU counts 6 * params * tokens plus the attention
matmuls (12 * layers * T * d per token), against the GPU's dense bf16 peak. Compares eager vs
compiled in the same run, so the ratio is meaningful on a shared machine.

    python bench/mfu.py --preset base --batch-size 64 --steps 20
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), 989e12)


def run(cfg: GPTConfig, batch: int, steps: int, compile_model: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    step_model = torch.compile(model) if compile_model else model
    T = cfg.grid[0] * cfg.grid[1]
    x = torch.randint(0, cfg.vocab_size, (batch, T), device="cuda")
    y = torch.randint(0, max(1, cfg.num_classes), (batch,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x, y, targets=x, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    tok_s = batch * T * steps / (time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n + 12 * cfg.n_layer * (T + 1) * cfg.n_embd
    return tok_s, tok_s * flops_per_token / peak_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trainer", action="store_true", help="also time the real trainer (train_stage1)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = GPTConfig.preset(args.preset, num_classes=1000)
    print(f"{torch.cuda.get_device_name()}, preset {args.preset}, K={cfg.vocab_size}, grid {cfg.grid}, "
          f"batch {args.batch_size}, bf16")
    results = {}
    for compiled in (False, True):
        tok_s, mfu = run(cfg, args.batch_size, args.steps, compiled)
        results[compiled] = tok_s
        print(f"{'compiled' if compiled else 'eager   '}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%")
    print(f"compiled/eager tokens/s ratio: {results[True] / results[False]:.2f}x (MFU target >= 40%)")
    if args.trainer:
        trainer_run(args)


def trainer_run(args) -> None:
    """The same model through the real trainer (`train_stage1`: EMA, clipping, logging, checkpoints)."""
    import json
    import tempfile

    import numpy as np

    from pipeline.config import validate_config
    from pipeline.train import train_stage1

    with tempfile.TemporaryDirectory() as tmp:
        n, rng = 4096, np.random.default_rng(0)
        grids = rng.integers(0, 8192, (n, 1, 16, 16), dtype=np.uint16)
        np.save(f"{tmp}/train-000000.npy", grids)
        meta = {"labels": rng.integers(0, 1000, n).tolist(), "keys": [str(i) for i in range(n)],
                "codebook_size": 8192, "grid": [16, 16], "views": 1}
        with open(f"{tmp}/train-000000.json", "w") as f:
            json.dump(meta, f)
        for compiled in (False, True):
            cfg = validate_config({"train": {"preset": args.preset, "steps": args.steps + 10,
                                             "batch_size": args.batch_size, "warmup_steps": 5, "log_every": 5,
                                             "checkpoint_every": 10_000, "compile": compiled, "ema": 0.9999}})
            out = f"{tmp}/run-{compiled}"
            train_stage1(cfg["train"], [f"{tmp}/train-000000.npy"], out, progress=False)
            rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
            last = rows[-1]
            print(f"train_stage1 {'compiled' if compiled else 'eager   '}: {last['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {100 * (last.get('mfu') or 0):.1f}% (last logged window, EMA on)")


if __name__ == "__main__":
    main()
