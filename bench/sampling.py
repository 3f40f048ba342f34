"""Stage-1 sampling: KV cache vs recomputing the whole prefix at every step.

Same random-weight model, same seeds; prints both times and the speedup, and checks that the
two paths give identical tokens.

    python bench/sampling.py --preset tiny --vocab 1024 --grid 16 --n 8 --batch-size 8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.models.sampling import sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "large"])
    ap.add_argument("--vocab", type=int, default=None, help="codebook size (default: the preset's)")
    ap.add_argument("--grid", type=int, default=16, help="grid side: grid x grid tokens")
    ap.add_argument("--n", type=int, default=8, help="number of samples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=0)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    over = dict(grid=(args.grid, args.grid), num_classes=args.num_classes)
    if args.vocab is not None:
        over["vocab_size"] = args.vocab
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.preset, **over)).to(args.device).eval()
    print(f"model: {model.extra_repr()}; device {args.device}; {args.n} samples, batch {args.batch_size}")
    labels = torch.arange(args.n) % args.num_classes if args.num_classes else None
    kw = dict(labels=labels, seeds=range(args.n), batch_size=args.batch_size,
              cfg_scale=args.cfg_scale, top_k=args.top_k)

    sample(model, args.n, use_cache=True, **kw)  # warm-up (allocator, kernels)

    def timed(use_cache):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample(model, args.n, use_cache=use_cache, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    T = model.config.block_size
    cached, t_cache = timed(True)
    full, t_full = timed(False)
    print(f"kv-cache:  {t_cache:8.3f} s  ({args.n * T / t_cache:9.1f} tokens/s)")
    print(f"recompute: {t_full:8.3f} s  ({args.n * T / t_full:9.1f} tokens/s)")
    print(f"kv-cache/recompute speedup: {t_full / t_cache:.2f}x (target >= 10x)")
    assert torch.equal(cached, full), "KV-cache and recomputed samples differ"
    print(f"tokens identical: {cached.shape[0]} x {cached.shape[1]}")


if __name__ == "__main__":
    main()
