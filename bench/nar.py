"""Stage 2 rendering speed: NAR mask-predict (T iterations) vs the AR stage 2 with its KV cache.

Both models have the same size (a GPT preset, random weights, seeded) and the same stage-2 shape:
a DiGIT context grid and a VQ grid. Each draws the VQ grids of the same batch of DiGIT grids; the
AR one token by token after prefilling the context into its KV cache (top-p 0.8, as the paper),
the NAR one in ``--iterations`` full passes (8, as the official inference script). Prints images/s
of both, in the same run, and the ratio NAR / AR.

    python bench/nar.py                                   # tiny preset, 16x16 grids, CPU
    python bench/nar.py --preset base --n 64 --batch-size 64 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.models.mask_sampling import mask_predict_sample  # noqa: E402
from pipeline.models.maskgit import MaskPredictor  # noqa: E402
from pipeline.models.sampling import sample  # noqa: E402


def timed(fn, device: str) -> tuple[torch.Tensor, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base", "large"])
    ap.add_argument("--vq-vocab", type=int, default=1024, help="VQ codebook (MAGE's VQGAN: 1024)")
    ap.add_argument("--digit-vocab", type=int, default=8192, help="DiGIT codebook (base: 8192)")
    ap.add_argument("--grid", type=int, default=16, help="grid side of both grids (256 px: 16)")
    ap.add_argument("--n", type=int, default=16, help="images to render")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast both models to bf16 (GPU)")
    args = ap.parse_args()

    g = (args.grid, args.grid)
    config = GPTConfig.preset(args.preset, vocab_size=args.vq_vocab, grid=g, context_vocab_size=args.digit_vocab,
                              context_grid=g)
    torch.manual_seed(0)
    ar = GPT(config).to(args.device).eval()
    nar = MaskPredictor(config).to(args.device).eval()
    context = torch.randint(0, args.digit_vocab, (args.n, args.grid * args.grid))
    seeds = range(args.n)
    print(f"models: {ar.extra_repr()}; device {args.device}; {args.n} images, batch {args.batch_size}")

    def run_ar():
        return sample(ar, args.n, context=context, top_p=0.8, seeds=seeds, batch_size=args.batch_size)

    def run_nar():
        return mask_predict_sample(nar, args.n, context=context, iterations=args.iterations, seeds=seeds,
                                   batch_size=args.batch_size)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else torch.autocast("cpu", enabled=False)
    with autocast:
        run_ar(), run_nar()                           # warm-up (allocator, kernels)
        t_ar = min(timed(run_ar, args.device)[1] for _ in range(args.repeats))
        t_nar = min(timed(run_nar, args.device)[1] for _ in range(args.repeats))
    print(f"AR stage 2 (KV cache, {args.grid ** 2} steps): {t_ar:8.3f} s  {args.n / t_ar:9.2f} images/s")
    print(f"NAR stage 2 ({args.iterations} iterations):      {t_nar:8.3f} s  {args.n / t_nar:9.2f} images/s")
    print(f"NAR/AR images/s ratio: {t_ar / t_nar:.2f}x")


if __name__ == "__main__":
    main()
