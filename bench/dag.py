"""Dry-run planning time of the whole DAG vs the number of shards, on a paper config.

For each train-shard count N, a fake ImageNet tree (1000 class folders, N tiny train JPEGs and
N * 50/1282 val ones, see tests/fake_imagenet.py) is sharded one image per shard by the real
shards stage, then `snakemake -n --configfile <paper config>` plans everything downstream of the
shards checkpoint. Timed: the whole Snakemake call (wall) and its CPU time (user + sys of the
child, steadier than wall on a shared machine). Named baselines, measured in the same run:
  * "start-up": the same dry run with only the shards manifest as target (Snakemake start-up,
    Snakefile parsing and config validation; no downstream planning);
  * the smallest N's plan: "cpu x" is each plan's CPU time over its CPU time; "marginal/1000"
    is the extra CPU per 1000 more shards from one row to the next, and the last step's marginal
    cost is compared with the one before (1.0 = linear growth).

    python bench/dag.py                              # N = 10, 100, 1282, 5000 on imagenet_base
    python bench/dag.py --shards 10 1282 --repeat 3 --config configs/imagenet_large.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import fake_imagenet as fi  # noqa: E402

TARGET_S = 10.0  # the target for ImageNet's shard count


def measure(root: Path, config_src: Path, n_train: int, repeat: int, quiet: bool) -> dict:
    n_val = max(1, round(n_train * fi.IMAGENET_VAL_SHARDS / fi.IMAGENET_TRAIN_SHARDS))
    case = root / f"n{n_train}"
    work = case / "work"
    work.mkdir(parents=True)
    fi.make_fake_imagenet(case / "data", n_train, n_val)
    config = fi.fake_config(config_src, case / "config.yaml", case / "data", n_train)
    fi.placeholder_weights(work, config)
    shard_s = fi.run_shards(work, config, via_snakemake=False)
    args = ("--quiet", "rules") if quiet else ()
    best = None
    for _ in range(repeat):
        plan = fi.dry_run(work, config, *args)
        if best is None or plan.cpu_s < best["cpu_s"]:
            best = {"wall_s": plan.seconds, "cpu_s": plan.cpu_s, "jobs": sum(plan.counts.values()),
                    "counts": dict(plan.counts)}
    assert "shards" not in best["counts"] and "tokens" in best["counts"], best["counts"]
    start = min((fi.dry_run(work, config, "shards/imagenet/manifest.parquet") for _ in range(repeat)),
                key=lambda p: p.cpu_s)
    return {"train_shards": n_train, "val_shards": n_val, "shards": n_train + n_val, "shards_stage_s": shard_s,
            **best, "startup_wall_s": start.seconds, "startup_cpu_s": start.cpu_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[10, 100, fi.IMAGENET_TRAIN_SHARDS, 5000],
                    help="train-shard counts to plan (val shards scale with them)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "imagenet_base.yaml")
    ap.add_argument("--repeat", type=int, default=1, help="dry runs per count (the least CPU is reported)")
    ap.add_argument("--quiet", action="store_true", help="dry runs with --quiet rules (no per-job listing)")
    ap.add_argument("--keep", type=Path, default=None, help="build the trees here and keep them")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    counts = sorted(set(args.shards))
    with tempfile.TemporaryDirectory(prefix="bench-dag-") as tmp:
        root = args.keep or Path(tmp)
        rows = []
        for n in counts:
            t0 = time.perf_counter()
            rows.append(measure(root, args.config, n, args.repeat, args.quiet))
            print(f"  measured {n} train shards in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    base = rows[0]
    print(f"config {args.config.name}; Snakemake dry run (-n{' --quiet rules' if args.quiet else ''}), "
          f"least CPU of {args.repeat}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"baseline start-up (manifest target only): {base['startup_wall_s']:.2f} s wall, "
          f"{base['startup_cpu_s']:.2f} s CPU")
    head = (f"{'train':>6} {'val':>4} {'jobs':>6} {'wall s':>7} {'cpu s':>7} {'cpu x':>7} "
            f"{'cpu-startup':>11} {'cpu s/1000 shards':>17} {'marginal/1000':>13}")
    print(head)
    print("-" * len(head))
    prev = None
    for r in rows:
        planning = r["cpu_s"] - r["startup_cpu_s"]
        r["planning_cpu_s"] = planning
        r["cpu_s_per_1000_shards"] = 1000 * planning / r["shards"]
        r["ratio_vs_base_cpu"] = r["cpu_s"] / base["cpu_s"]
        marginal = (1000 * (r["cpu_s"] - prev["cpu_s"]) / (r["shards"] - prev["shards"])) if prev else float("nan")
        r["marginal_cpu_s_per_1000_shards"] = marginal
        print(f"{r['train_shards']:>6} {r['val_shards']:>4} {r['jobs']:>6} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} "
              f"{r['ratio_vs_base_cpu']:>7.2f} {planning:>11.2f} {r['cpu_s_per_1000_shards']:>17.2f} "
              f"{marginal:>13.2f}")
        prev = r
    if len(rows) >= 3:
        a, b = rows[-2]["marginal_cpu_s_per_1000_shards"], rows[-1]["marginal_cpu_s_per_1000_shards"]
        print(f"growth: marginal CPU per 1000 shards {b:.2f} s in the last step vs {a:.2f} s in the one "
              f"before (ratio {b / a:.2f}; 1.0 = linear)")
    at = [r for r in rows if r["train_shards"] == fi.IMAGENET_TRAIN_SHARDS]
    if at:
        r = at[0]
        print(f"ImageNet ({r['train_shards']} + {r['val_shards']} shards, {r['jobs']} jobs): {r['wall_s']:.2f} s wall, "
              f"{r['cpu_s']:.2f} s CPU (target < {TARGET_S:.0f} s: {'met' if r['cpu_s'] < TARGET_S else 'NOT met'} "
              f"in CPU time; wall depends on the machine's load)")
        print(f"jobs per rule at ImageNet scale: {r['counts']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
