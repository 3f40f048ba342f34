"""What the encoder benches share: a Fashion-MNIST shard, a random DINOv2 file, the common flags."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import validate_config  # noqa: E402
from pipeline.data import ViewSpec  # noqa: E402
from pipeline.encoder_fixtures import build_random_dinov2, save_official_checkpoint  # noqa: E402
from pipeline.shards import build_shards  # noqa: E402

SPEC = ViewSpec(resize=256, crop=256, image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def make_shard(tmp: Path, images: int, fmnist: str) -> Path:
    cfg = validate_config({"dataset": {"name": "bench", "source": "fashion_mnist", "path": fmnist, "limit": images,
                                       "splits": ["test"]}, "shards": {"samples_per_shard": images, "workers": 1}})
    build_shards(cfg["dataset"], cfg["shards"], out_root=tmp, progress=False)
    return tmp / "bench" / "test-000000.tar"


def random_dinov2_file(tmp: Path, arch: str) -> Path:
    """Seeded random weights of ``arch`` saved in the official DINOv2 layout."""
    return save_official_checkpoint(build_random_dinov2(arch, seed=0), tmp / f"{arch}.pth")


def encoder_bench_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every encoder bench takes (model, images, batch, workers, dataset)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dinov2_vitb14_reg4")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    return ap
