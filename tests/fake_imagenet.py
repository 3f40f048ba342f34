"""A fake ImageNet in the paper configs' layout, and helpers to plan the whole DAG on it.

Why this works the way it does: the shards stage is a Snakemake checkpoint, because how many
shards a dataset has is known only once the source has been listed. On a fresh directory a dry
run therefore shows only `shards` (and `all`); everything downstream is planned after the
checkpoint's `dataset.json` exists. So the helpers here do what a user does, for real, on a
small tree: write ImageNet's layout (`{root}/{train,val}/<wnid>/*.JPEG`, 1000 class folders),
run the real shards checkpoint on it, then dry-run the paper config.

The DAG's shape depends only on how many shards each split has, not on how many images a shard
holds, so the fake config stores one image per shard (`shards.samples_per_shard: 1`): 1282
tiny JPEGs give ImageNet's 1282 train shards (ceil(1,281,167 / 1000) at the paper configs'
1000 images per shard) and 50 give its 50 val shards. Everything else is the paper config as
shipped, except `dataset.path` and `kmeans.shards`, which is scaled with the train shard count
when that differs from ImageNet's (the paper configs' 128 of 1282, ~10%).

"A previous run" for the incremental check is made of placeholders: every output of a planned
job is created empty with one common mtime (newer than the shards), so Snakemake sees a finished
run; no Snakemake metadata is written, so only the mtime rerun trigger applies, which is the
one that adding a shard fires. `parse_dry_run` reads the jobs (rule, wildcards, input, output)
back from the dry run's own listing.
"""
from __future__ import annotations

import io
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
N_CLASSES = 1000
IMAGENET_TRAIN_SHARDS = 1282   # ceil(1,281,167 / 1000)
IMAGENET_VAL_SHARDS = 50       # 50,000 / 1000
PAPER_KMEANS_SHARDS = 128      # configs/imagenet_*.yaml: ~10% of the 1282 train shards


# ---------------------------------------------------------------- the fake tree

def tiny_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wnid(label: int) -> str:
    return f"n{label:08d}"


def make_fake_imagenet(root: str | Path, n_train: int, n_val: int, n_classes: int = N_CLASSES) -> Path:
    """1000 class folders per split; image i of a split goes to class i * n_classes // n (in order).

    Folders left without images stay empty (an ImageFolder allows that). Well under a second.
    """
    root = Path(root)
    data = tiny_jpeg()
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            (root / split / wnid(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i * n_classes // n
            (root / split / wnid(c) / f"{wnid(c)}_{i:08d}.JPEG").write_bytes(data)
    return root


def add_train_image(root: str | Path, n_classes: int = N_CLASSES) -> Path:
    """One more train image that sorts after every other one (last class, largest name).

    At one image per shard it becomes one new last shard and leaves every other shard as it was
    (at ImageNet's 1000 per shard it would change the last, partial shard instead: same DAG).
    """
    folder = Path(root) / "train" / wnid(n_classes - 1)
    path = folder / f"{wnid(n_classes - 1)}_zz{len(list(folder.iterdir())):06d}.JPEG"
    path.write_bytes(tiny_jpeg())
    return path


def fake_config(src: str | Path, dest: str | Path, data_root: str | Path, n_train: int) -> Path:
    """The paper config `src` reading the fake tree, one image per shard (see the module docstring)."""
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["dataset"]["path"] = str(data_root)
    cfg["shards"]["samples_per_shard"] = 1
    cfg["shards"]["workers"] = 2
    # The scenario grows the dataset by one image. A shuffled source deals every image anew when it
    # grows (all shards change), so growth is tested in source order, where a new image appends a shard.
    cfg["dataset"]["shuffle_seed"] = None
    if n_train != IMAGENET_TRAIN_SHARDS and cfg["kmeans"].get("shards"):
        cfg["kmeans"]["shards"] = max(1, round(n_train * cfg["kmeans"]["shards"] / IMAGENET_TRAIN_SHARDS))
    Path(dest).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Path(dest)


def placeholder_weights(workdir: str | Path, config: str | Path) -> list[Path]:
    """Empty files where the config expects local weights (a real run points these at real files)."""
    cfg = yaml.safe_load(Path(config).read_text())
    made = []
    for path in (cfg.get(section, {}).get("checkpoint") for section in ("encoder", "vq", "kl")):
        if path:
            p = Path(workdir) / path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
            made.append(p)
    return made


# ---------------------------------------------------------------- running Snakemake

def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def snakemake(*args, workdir, configfile, check=True) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run Snakemake on the repo's Snakefile; return (process, wall seconds, CPU seconds) of the call.

    CPU is the child's user + sys time: steadier than wall time on a loaded machine.
    """
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *map(str, args)]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(map(str, args))} failed:\n"
                             f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc, seconds, cpu


def run_shards(workdir, configfile, force: bool = False, via_snakemake: bool = True) -> float:
    """Run the shards stage; returns seconds.

    via_snakemake: the real checkpoint rule (`force` re-lists a changed source tree, as a user
    must after adding images); otherwise the function that rule's shell command calls,
    `pipeline.shards.build_shards`, in this process (what `python -m pipeline shards` does;
    saves Snakemake's start-up in the fast test).
    """
    t0 = time.perf_counter()
    if via_snakemake:
        name = yaml.safe_load(Path(configfile).read_text())["dataset"]["name"]
        extra = ("--forcerun", "shards") if force else ()
        snakemake(f"shards/{name}/manifest.parquet", *extra, workdir=workdir, configfile=configfile)
    else:
        from pipeline.config import load_config
        from pipeline.shards import build_shards
        cfg = load_config(configfile)
        build_shards(cfg["dataset"], cfg["shards"], out_root=Path(workdir) / "shards", progress=False)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- reading a dry run

@dataclass
class Job:
    rule: str
    wildcards: dict = field(default_factory=dict)
    input: list = field(default_factory=list)
    output: list = field(default_factory=list)

    @property
    def shard(self) -> tuple[str, str] | None:
        """(split, shard_id) of a per-shard job, else None."""
        if "shard_id" in self.wildcards:
            return self.wildcards.get("split", ""), self.wildcards["shard_id"]
        return None


@dataclass
class Plan:
    jobs: list
    counts: Counter
    seconds: float   # wall time of the whole Snakemake call, start-up included
    cpu_s: float     # its CPU time (user + sys)
    text: str

    @property
    def nothing_to_do(self) -> bool:
        return "Nothing to be done" in self.text


_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
_FIELD = re.compile(r"^    (input|output|wildcards): (.*)$")
_STATS_ROW = re.compile(r"^(\S+)\s+(\d+)$")


def _split_list(value: str) -> list[str]:
    return [] if value.strip() in ("", "<TBD>") else [v.strip() for v in value.split(", ")]


def parse_dry_run(text: str) -> tuple[list[Job], Counter]:
    """Every job a `snakemake -n` lists (rule, wildcards, input, output), and the "Job stats" table."""
    jobs: list[Job] = []
    counts: Counter = Counter()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            jobs.append(Job(m.group(1)))
            continue
        m = _FIELD.match(line)
        if m and jobs:
            key, value = m.groups()
            if key == "wildcards":
                jobs[-1].wildcards = dict(kv.split("=", 1) for kv in _split_list(value))
            else:
                setattr(jobs[-1], key, _split_list(value))
            continue
        if line.strip() == "Job stats:" and not counts:
            for row in lines[i + 3:]:  # after the "job count" header and its rule
                r = _STATS_ROW.match(row.strip())
                if not r:
                    break
                if r.group(1) != "total":
                    counts[r.group(1)] = int(r.group(2))
    return jobs, counts


def dry_run(workdir, configfile, *args) -> Plan:
    """`snakemake -n` with every job listed; its wall time includes Snakemake's start-up (~1.5 s)."""
    proc, seconds, cpu = snakemake("-n", *args, workdir=workdir, configfile=configfile)
    text = proc.stdout + proc.stderr
    jobs, counts = parse_dry_run(text)
    return Plan(jobs, counts, seconds, cpu, text)


# ---------------------------------------------------------------- reasoning about a plan

def shards_per_rule(plan: Plan) -> dict[str, dict[str, set[str]]]:
    """rule -> split -> shard ids, for the per-shard rules (jobs with a shard_id wildcard)."""
    out: dict[str, dict[str, set[str]]] = {}
    for job in plan.jobs:
        if job.shard:
            split, shard_id = job.shard
            out.setdefault(job.rule, {}).setdefault(split, set()).add(shard_id)
    return out


def downstream(plan: Plan, seeds: list[Job]) -> list[Job]:
    """The seed jobs and every job of the plan that consumes their outputs, transitively."""
    producer = {f: j for j, job in enumerate(plan.jobs) for f in job.output}
    consumers: dict[int, set[int]] = {}
    for j, job in enumerate(plan.jobs):
        for f in job.input:
            if f in producer:
                consumers.setdefault(producer[f], set()).add(j)
    index = {id(job): j for j, job in enumerate(plan.jobs)}
    todo = [index[id(s)] for s in seeds]
    seen = set(todo)
    while todo:
        for c in consumers.get(todo.pop(), ()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return [plan.jobs[j] for j in sorted(seen)]


def make_placeholder_outputs(workdir: str | Path, plan: Plan) -> int:
    """Create every output of the plan's jobs (empty; a folder for `.zarr` and suffix-less paths,
    the pipeline's directory outputs) with one common mtime, as if the plan had run. Returns the count."""
    paths = {Path(workdir) / f for job in plan.jobs for f in job.output}
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix in (".zarr", ""):
            p.mkdir(exist_ok=True)
        else:
            p.touch()
    now = time.time()
    for p in paths:
        os.utime(p, (now, now))
    return len(paths)
