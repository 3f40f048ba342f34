"""Feature extraction throughput: the pipeline's features stage vs an official-style loop.

Baseline ("official dump_features style"): decode and transform each image in the main process,
run the FULL model (all blocks) and keep the output of block depth-3 (what DiGIT's
get_intermediate_layers(n=3) does), batch by batch. Pipeline: `extract_features` (decoding in
DataLoader workers, blocks after the chosen one never built, Zarr output).
Both run on the same shard in the same process; the ratio is what counts (the machine is noisy).

    python bench/features.py --arch dinov2_vitb14_reg4 --images 64 --batch-size 16
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
from pipeline.data import ShardViews, ViewSpec, crop_view, encoder_input, index_shard, read_image, to_tensor, view_params  # noqa: E402
from pipeline.devices import autocast_for, resolve_device  # noqa: E402
from pipeline.encoder_loading import load_encoder  # noqa: E402
from pipeline.features import extract_features  # noqa: E402


@torch.inference_mode()
def baseline(tar: Path, arch: str, ckpt: Path, spec: ViewSpec, batch_size: int, device, precision) -> float:
    full = load_encoder(arch, ckpt, layer=f"block:{_depth(arch) - 1}", img_size=spec.image_size).to(device)
    block = _depth(arch) - 3
    captured = {}
    full.vit.blocks[block].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    samples = index_shard(tar)
    t0 = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        views = []
        for s in samples[start:start + batch_size]:  # per-image decode in the main process
            img = read_image(tar, s)
            views.append(to_tensor(crop_view(img, view_params(0, s.key, 0, img.width, img.height, spec), spec)))
        x = encoder_input(torch.stack(views).to(device), spec)
        with autocast_for(device, precision):
            full(x)  # all blocks run
            feats = full.vit.norm(captured["x"])[:, full.vit.num_prefix_tokens:]
        feats.float().cpu().numpy().astype(np.float16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(samples) / (time.perf_counter() - t0)


def _depth(arch: str) -> int:
    return {"s": 12, "b": 12, "l": 24, "g": 40}[arch.split("_vit")[1][0]]


def pipeline_rate(tar, out, arch, ckpt, spec, batch_size, workers, device, precision) -> float:
    enc = load_encoder(arch, ckpt, layer=3, img_size=spec.image_size)
    n = len(ShardViews([tar], spec))
    t0 = time.perf_counter()
    extract_features(tar, out, enc, spec, batch_size=batch_size, num_workers=workers, device=str(device),
                     precision=precision, progress=False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = encoder_bench_parser(__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=2, help="alternate baseline/pipeline runs; best of each")
    args = ap.parse_args()
    device = resolve_device(args.device)
    spec = SPEC
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tar = make_shard(tmp, args.images, args.fmnist)
        ckpt = random_dinov2_file(tmp, args.arch)
        base, ours = [], []
        for r in range(args.repeat):
            base.append(baseline(tar, args.arch, ckpt, spec, args.batch_size, device, args.precision))
            ours.append(pipeline_rate(tar, tmp / f"f{r}.zarr", args.arch, ckpt, spec, args.batch_size, args.workers,
                                      device, args.precision))
        print(f"device {device}, {args.arch}, {args.images} images at 224 px, batch {args.batch_size}, "
              f"precision {args.precision}")
        print(f"baseline (official-style full-model loop): {max(base):.1f} img/s  runs {[round(b, 1) for b in base]}")
        print(f"pipeline features stage:                   {max(ours):.1f} img/s  runs {[round(o, 1) for o in ours]}")
        print(f"pipeline/baseline images/s ratio: {max(ours) / max(base):.2f}x (target >= 1.2x on CPU)")


if __name__ == "__main__":
    main()
