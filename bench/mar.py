"""MAR sampling speed: masked MAR and MAR causal (KV cache) vs the DiGIT pipeline at the same size.

Baseline: DiGIT's two AR stages per image, both GPTs with their KV cache: the stage-1 GPT draws an
h x w grid of K k-means tokens (class-conditional, top-k), then the AR stage 2 draws the VQ grid
with that grid as its context (unconditional, top-p 0.8). Against it, in the same run:

* MAR (masked): ``--num-iter`` encoder/decoder passes, each step's tokens drawn by the diffusion
  head (``--num-sampling-steps`` reverse steps per token);
* MAR causal: one token per step with the KV cache, each token drawn by the head;
* both again at ``--low-steps`` diffusion steps (the cheaper-default knob, `use_sampling_steps`).

Every model is the preset at the same transformer size (tiny: 128 wide, 4 blocks: GPT 4, MAR 2 + 2,
MAR causal 4; base: each family's base preset, DiGIT-B 219M vs MAR-B 208M), random weights,
seeded: the work per image does not depend on the weights (GPT: h*w steps; MAR: num_iter x
num_sampling_steps head passes; MAR causal: h*w x num_sampling_steps). The tokenizer decoders
(VQGAN, KL) are left out of every row. Prints images/s, the ratio to the DiGIT baseline, and the
share of each MAR variant's time spent inside ``DiffusionLoss.sample`` (timed by wrapping it), and,
on a CPU, the part of that spent in the head's MLP forwards (the rest: noise draws, one per sample
generator per step, and the posterior arithmetic). Each variant is timed ``--repeats`` times,
interleaved; the best run (and its shares) is kept.

    python bench/mar.py                                       # tiny, 7x7 (the demo), batch 100, CPU
    python bench/mar.py --batch-size 10 --threads 1           # a shared, loaded CPU
    python bench/mar.py --preset base --n 256 --batch-size 256 --device cuda   # 16x16, MAR num_iter 64

The ``--device cuda`` path (synchronising around each timed call and each head call) is written
but untested here: the development machine has no GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.families import use_sampling_steps  # noqa: E402
from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.models.mar import MAR, MARConfig, mar_sample  # noqa: E402
from pipeline.models.mar_causal import MARCausal, MARCausalConfig, mar_causal_sample  # noqa: E402
from pipeline.models.sampling import sample  # noqa: E402

# per preset: DiGIT codebook K, VQ codebook, classes, latent channels C, stage-1 top-k (the demo's
# config and configs/imagenet_base.yaml / imagenet_large.yaml)
DEFAULTS = {
    "tiny": dict(grid=7, vocab=512, vq_vocab=256, classes=10, token_dim=4, top_k=50),
    "base": dict(grid=16, vocab=8192, vq_vocab=1024, classes=1000, token_dim=16, top_k=200),
    "large": dict(grid=16, vocab=16384, vq_vocab=1024, classes=1000, token_dim=16, top_k=200),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class HeadTimer:
    """Seconds spent inside ``model.diffloss.sample`` (and, with ``mlp``, inside the head MLP's
    ``forward``) since the last `reset`, by wrapping both on the instance."""

    def __init__(self, model, device: str, mlp: bool):
        self.sample_s = self.mlp_s = 0.0
        loss = model.diffloss
        loss.sample = self._wrap(loss.sample, device, "sample_s")
        if mlp:
            loss.net.forward = self._wrap(loss.net.forward, device, "mlp_s")

    def _wrap(self, fn, device, field):
        def timed(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
        return timed

    def reset(self) -> None:
        self.sample_s = self.mlp_s = 0.0


def params(model: torch.nn.Module, skip: str | None = None) -> float:
    """Millions of parameters, leaving out the submodule ``skip``."""
    n = sum(p.numel() for name, p in model.named_parameters() if skip is None or not name.startswith(skip + "."))
    return n / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(DEFAULTS), help="the same preset for every model")
    ap.add_argument("--grid", type=int, default=None, help="grid side of every grid (tiny: 7, the demo; else 16)")
    ap.add_argument("--vocab", type=int, default=None, help="DiGIT codebook K (tiny: 512, the demo; base: 8192)")
    ap.add_argument("--vq-vocab", type=int, default=None, help="VQ codebook of stage 2 (tiny: 256; base: 1024)")
    ap.add_argument("--classes", type=int, default=None, help="classes (tiny: 10; base: 1000)")
    ap.add_argument("--token-dim", type=int, default=None, help="KL latent channels C (tiny: 4; base: 16)")
    ap.add_argument("--top-k", type=int, default=None, help="stage-1 top-k (tiny: 50, the demo; base: 200)")
    ap.add_argument("--num-iter", type=int, default=None,
                    help="MAR steps (default: 16 below 16x16, the demo's; else 64, MAR's faster setting)")
    ap.add_argument("--num-sampling-steps", type=int, default=100, help="diffusion steps per token (MAR: 100)")
    ap.add_argument("--low-steps", type=int, default=25, help="the cheaper diffusion setting timed too (0: skip)")
    ap.add_argument("--cfg-scale", type=float, default=1.0,
                    help="guidance of stage 1 and both MARs (1 = off, every config's default)")
    ap.add_argument("--n", type=int, default=100, help="images per timed run")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each, interleaved; the best is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: torch's default; 1 on a loaded machine, where spinning threads stall)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_iter is None:
        args.num_iter = 16 if args.grid * args.grid < 256 else 64

    dev, g, L = args.device, (args.grid, args.grid), args.grid * args.grid
    torch.manual_seed(0)
    stage1 = GPT(GPTConfig.preset(args.preset, vocab_size=args.vocab, grid=g, num_classes=args.classes)).to(dev).eval()
    stage2 = GPT(GPTConfig.preset(args.preset, vocab_size=args.vq_vocab, grid=g, context_vocab_size=args.vocab,
                                  context_grid=g)).to(dev).eval()
    mar = MAR(MARConfig.preset(args.preset, grid=g, token_dim=args.token_dim, num_classes=args.classes)).to(dev).eval()
    causal = MARCausal(MARCausalConfig.preset(args.preset, grid=g, token_dim=args.token_dim,
                                              num_classes=args.classes)).to(dev).eval()
    on_cpu = not dev.startswith("cuda")
    timers = {"mar": HeadTimer(mar, dev, mlp=on_cpu), "causal": HeadTimer(causal, dev, mlp=on_cpu)}
    labels = torch.arange(args.n) % args.classes
    seeds = range(args.n)
    print(f"stage 1: {stage1.extra_repr()}")
    print(f"stage 2: {stage2.extra_repr()}")
    print(f"MAR: {mar.extra_repr()}; {params(mar, 'diffloss'):.2f}M + head {params(mar.diffloss):.2f}M")
    print(f"MAR causal: {causal.extra_repr()}; {params(causal, 'diffloss'):.2f}M + head "
          f"{params(causal.diffloss):.2f}M")
    print(f"device {dev}, {torch.get_num_threads()} threads; {args.n} images, batch {args.batch_size}; "
          f"cfg {args.cfg_scale}; MAR num_iter {args.num_iter}")

    def digit(n=args.n):
        t0 = time.perf_counter()
        grids = sample(stage1, n, labels=labels[:n], top_k=args.top_k, cfg_scale=args.cfg_scale,
                       seeds=seeds[:n], batch_size=args.batch_size)
        sync(dev)
        t1 = time.perf_counter()
        sample(stage2, n, context=grids, top_p=0.8, seeds=seeds[:n], batch_size=args.batch_size)
        sync(dev)
        return {"stage 1": t1 - t0, "stage 2": time.perf_counter() - t1}

    def mar_run(steps, n=args.n):
        use_sampling_steps(mar, steps)
        mar_sample(mar, n, labels=labels[:n], seeds=seeds[:n], num_iter=args.num_iter, cfg_scale=args.cfg_scale,
                   batch_size=args.batch_size)

    def causal_run(steps, n=args.n):
        use_sampling_steps(causal, steps)
        mar_causal_sample(causal, n, labels=labels[:n], seeds=seeds[:n], cfg_scale=args.cfg_scale,
                          batch_size=args.batch_size)

    hi, lo = args.num_sampling_steps, args.low_steps
    variants = [("DiGIT stage 1 + AR stage 2", f"{L} + {L}", None, digit)]
    for steps in [hi] + ([lo] if lo and lo != hi else []):
        variants.append((f"MAR, {steps} diffusion steps", f"{args.num_iter} x {steps}", "mar",
                         lambda s=steps: mar_run(s)))
        variants.append((f"MAR causal, {steps} diffusion steps", f"{L} x {steps}", "causal",
                         lambda s=steps: causal_run(s)))

    warm = min(args.n, args.batch_size, 8)              # warm-up: a small batch each (allocator, kernels)
    digit(warm), mar_run(hi, warm), causal_run(hi, warm)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, _steps, timer_key, fn in variants:
            timer = timers.get(timer_key)
            if timer:
                timer.reset()
            sync(dev)
            t0 = time.perf_counter()
            parts = fn()
            sync(dev)
            run = {"time": time.perf_counter() - t0, "parts": parts,
                   "head": timer.sample_s if timer else None, "mlp": timer.mlp_s if timer else None}
            if name not in best or run["time"] < best[name]["time"]:
                best[name] = run

    base_t = best[variants[0][0]]["time"]
    print(f"\n{'':36} {'steps':>11} {'time s':>8} {'images/s':>9} {'vs DiGIT':>9} {'head':>6} {'MLP':>6}")
    for name, steps, _key, _fn in variants:
        run = best[name]
        if run["parts"]:
            for part, t in run["parts"].items():
                print(f"  {part:34} {L:>11} {t:8.3f} {args.n / t:9.1f}")
        head = f"{100 * run['head'] / run['time']:5.0f}%" if run["head"] is not None else ""
        mlp = f"{100 * run['mlp'] / run['time']:5.0f}%" if run["head"] is not None and on_cpu else ""
        print(f"{name:36} {steps:>11} {run['time']:8.3f} {args.n / run['time']:9.1f} "
              f"{base_t / run['time']:8.2f}x {head:>6} {mlp:>6}")
    print("(head: share of the time inside DiffusionLoss.sample; MLP: the part of it in the head MLP's forward,"
          " CPU only)")
    for key, label in (("MAR", "MAR"), ("MAR causal", "MAR causal")):
        t_hi = best[f"{key}, {hi} diffusion steps"]["time"]
        print(f"{label} / DiGIT images/s at {hi} steps: {base_t / t_hi:.2f}x", end="")
        if lo and lo != hi:
            t_lo = best[f"{key}, {lo} diffusion steps"]["time"]
            print(f"; at {lo} steps: {base_t / t_lo:.2f}x ({hi} -> {lo} steps: {t_hi / t_lo:.2f}x the images/s)")
        else:
            print()


if __name__ == "__main__":
    main()
