"""Fused encode-and-assign (tokens stage) throughput, and bf16 vs fp32 agreement.

On one shard and one random-weight DINOv2 (saved in the official format): runs the tokens stage
in fp32 and in the default precision (bf16 on GPU), prints images/s of each, the ratio, the
cosine similarity of bf16 vs fp32 features and the fraction of patch tokens that agree.
Centroids: K patch vectors drawn from the fp32 features (no faiss needed).

    python bench/tokens.py --arch dinov2_vitb14_reg4 --images 1024 --batch-size 256 --k 8192
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SPEC, encoder_bench_parser, make_shard, random_dinov2_file  # noqa: E402
from pipeline.data import ShardViews, encoder_input  # noqa: E402
from pipeline.devices import autocast_for, resolve_device  # noqa: E402
from pipeline.encoder_loading import load_encoder  # noqa: E402
from pipeline.tokens import tokenize_shard  # noqa: E402


def main() -> None:
    ap = encoder_bench_parser(__doc__)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--k", type=int, default=1024)
    args = ap.parse_args()
    device = resolve_device("auto")
    spec = SPEC
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tar = make_shard(tmp, args.images, args.fmnist)
        ckpt = random_dinov2_file(tmp, args.arch)
        enc = load_encoder(args.arch, ckpt, layer=3).to(device)
        views = torch.stack([ShardViews([tar], spec)[i][0][0] for i in range(min(256, args.images))]).to(device)
        with torch.inference_mode():
            x = encoder_input(views, spec)
            f32 = enc(x).float()
            with autocast_for(device, "auto"):
                low = enc(x).float()
        cos = torch.nn.functional.cosine_similarity(f32, low, dim=-1)
        flat = f32.reshape(-1, f32.shape[-1]).cpu().numpy()
        rng = np.random.default_rng(0)
        centroids = flat[rng.choice(len(flat), size=min(args.k, len(flat)), replace=False)]
        rates = {}
        for precision in ("fp32", "auto"):
            t0 = time.perf_counter()
            tokenize_shard(tar, tmp / f"{precision}.npy", enc, centroids, spec, views=args.views,
                           batch_size=args.batch_size, num_workers=args.workers, device=str(device),
                           precision=precision, progress=False)
            rates[precision] = args.images * args.views / (time.perf_counter() - t0)
        agree = (np.load(tmp / "fp32.npy") == np.load(tmp / "auto.npy")).mean()
        print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {args.arch}, "
              f"{args.images} images x {args.views} views, batch {args.batch_size}, K={len(centroids)}")
        print(f"tokens stage fp32: {rates['fp32']:.1f} img/s; default precision "
              f"({'bf16' if device.type == 'cuda' else 'fp32'}): {rates['auto']:.1f} img/s; "
              f"ratio {rates['auto'] / rates['fp32']:.2f}x")
        print(f"bf16 vs fp32 features: cosine mean {cos.mean():.5f} min {cos.min():.5f}; token agreement {agree:.4f}")


if __name__ == "__main__":
    main()
