"""Integrity of reruns (issue 12): Snakemake's own guarantees with the default target, and reruns
exactly when a result changes.

- A job killed between its two writes (a real `kill -9` of the Snakemake process group) is found
  by the default target: without --rerun-incomplete Snakemake stops naming the file, with it the job
  reruns and its outputs equal a clean run's. Snakemake alone misses it behind the `shards`
  checkpoint (workflow/rules/integrity.smk explains why and works around it).
- `all` requests every output of every job, so a missing second output is rebuilt.
- On a complete smoke run (the real shards, every other output faked by `snakemake --touch`, which
  records the same metadata as a real run), a dry run with a changed setting plans nothing for a
  runtime setting and exactly the affected rules for a setting that changes a result.
"""
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import has_key, validate_config
from pipeline.settings import OUTPUT_SETTINGS, RUNTIME_KEYS, output_settings, runtime_settings

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
INTEGRITY = REPO / "workflow" / "rules" / "integrity.smk"
SLEEP_ENV = "DIGIT_SLEEP_BETWEEN_WRITES"


def snakemake(workdir, *args, snakefile=REPO / "Snakefile", configfile=None, env=None, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *map(str, args)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.output[-6000:]}")
    return proc


def planned(output: str) -> dict:
    """rule -> job count of a dry run's "Job stats" table ({} when there is nothing to do)."""
    if "Nothing to be done" in output:
        return {}
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Job stats:")), None)
    assert start is not None, f"no plan in:\n{output[-4000:]}"
    rules = {}
    for line in lines[start + 3:]:
        name, _, count = line.strip().rpartition(" ")
        if name.strip() == "total" or not line.strip():
            break
        rules[name.strip()] = int(count)
    return rules


def kill_between_writes(cmd, cwd, first_output_glob, timeout=300):
    """Start `cmd` with the test hook that sleeps between a job's two writes, wait for the first
    file, then `kill -9` the whole process group (Snakemake and its job). Returns the first file."""
    env = {**os.environ, SLEEP_ENV: "600"}
    with open(Path(cwd) / "killed-run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not (found := sorted(Path(cwd).glob(first_output_glob))):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{first_output_glob} never appeared:\n"
                                         f"{(Path(cwd) / 'killed-run.log').read_text()[-4000:]}")
                time.sleep(0.05)
            time.sleep(0.5)   # the first file is complete (ours are renamed into place; echo is quick)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # kill -9 leaves Snakemake's lock on the directory; its message says to run --unlock (which
    # removes the lock only, not the markers of the killed job's outputs)
    subprocess.run([*cmd, "--unlock"], cwd=cwd, capture_output=True, check=True)
    return found[0]


# -- A: a job killed between its two writes, on a tiny workflow shaped like ours -------------------------

TINY = """
INCLUDE

checkpoint listing:
    output: "list.txt"
    shell: "printf 'ITEMS' > {output}"


def items():
    with open(checkpoints.listing.get().output[0]) as f:
        return f.read().split()


rule pair:  # two outputs written one after the other, like kmeans: centroids.npy, then centroids.json
    output: first="out/{item}.npy", second="out/{item}.json"
    shell: "echo {wildcards.item} > {output.first} && sleep ${{DIGIT_SLEEP_BETWEEN_WRITES:-0}} && echo done > {output.second}"


rule all:  # like ours: the targets come from the checkpoint's output
    input: lambda wc: [f"out/{i}.{ext}" for i in items() for ext in EXTS]
    default_target: True
"""


def _tiny(tmp_path, name, *, with_fix, items=("a", "b")):
    """The tiny workflow; with_fix: our integrity.smk included and `all` requesting both outputs
    (as ours does), else Snakemake alone and `all` requesting the first output (as ours did)."""
    work = tmp_path / name
    work.mkdir()
    snakefile = work / "Snakefile"
    snakefile.write_text(TINY.replace("INCLUDE", f'include: "{INTEGRITY}"' if with_fix else "")
                         .replace("ITEMS", "\\\\n".join(items))
                         .replace("EXTS", '("npy", "json")' if with_fix else '("npy",)'))
    return work, snakefile


def _killed_tiny_run(tmp_path, name, **kwargs):
    work, snakefile = _tiny(tmp_path, name, **kwargs)
    first = kill_between_writes([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--cores", "1"],
                                work, "out/*.npy")
    assert first.read_text() == f"{first.stem}\n" and not first.with_suffix(".json").exists()
    assert list((work / ".snakemake" / "incomplete").iterdir()), "Snakemake marks a running job's outputs"
    return work, snakefile, first


@pytest.mark.slow   # about Snakemake itself, not our code
def test_snakemake_alone_misses_a_killed_job_behind_a_checkpoint(tmp_path):
    """The root cause, kept as a canary (Snakemake 9.27.1). 1) Snakemake checks incomplete markers
    only for the jobs known at DAG.init, before the checkpoint's dependents are added: the killed job
    counts as complete, also with --rerun-incomplete. 2) It checks a job's outputs only as far as
    some job requests them: a missing second output nobody reads is never rebuilt. If this fails,
    Snakemake changed: revisit workflow/rules/integrity.smk and all_targets."""
    work, snakefile, first = _killed_tiny_run(tmp_path, "plain", with_fix=False, items=("a",))
    for flags in ([], ["--rerun-incomplete"]):
        dry = snakemake(work, "-n", *flags, snakefile=snakefile)
        assert planned(dry.output) == {}, dry.output       # "Nothing to be done"
    assert not (work / "out" / "a.json").exists()

    clean, snakefile = _tiny(tmp_path, "plain-clean", with_fix=False, items=("a",))
    snakemake(clean, "--cores", "1", snakefile=snakefile)
    (clean / "out" / "a.json").unlink()
    assert planned(snakemake(clean, "-n", snakefile=snakefile).output) == {}


def test_killed_job_behind_a_checkpoint_is_found_and_rerun(tmp_path):
    work, snakefile, first = _killed_tiny_run(tmp_path, "fixed", with_fix=True)
    dry = snakemake(work, "-n", snakefile=snakefile, check=False)
    assert dry.returncode != 0 and "IncompleteFilesException" in dry.output, dry.output
    assert f"out/{first.name}" in dry.output.split("Incomplete files:")[1], dry.output

    plan = snakemake(work, "-n", "--rerun-incomplete", snakefile=snakefile)
    assert planned(plan.output) == {"pair": 2, "all": 1}, plan.output
    snakemake(work, "--cores", "1", "--rerun-incomplete", snakefile=snakefile)
    assert not list((work / ".snakemake" / "incomplete").iterdir())

    clean = {"out/a.json": b"done\n", "out/a.npy": b"a\n", "out/b.json": b"done\n", "out/b.npy": b"b\n"}
    assert {str(p.relative_to(work)): p.read_bytes() for p in (work / "out").iterdir()} == clean
    assert planned(snakemake(work, "-n", snakefile=snakefile).output) == {}

    (work / "out" / "b.json").unlink()   # a second output gone: requested by `all`, so rebuilt
    dry = snakemake(work, "-n", snakefile=snakefile)
    assert planned(dry.output) == {"pair": 1, "all": 1} and "Missing output files: out/b.json" in dry.output


@pytest.mark.slow
def test_killed_job_found_when_the_checkpoint_reruns_first(tmp_path):
    """When the checkpoint itself reruns, the jobs behind it are added at run time: the check runs
    then too, so the killed job is still redone."""
    work, snakefile, first = _killed_tiny_run(tmp_path, "runtime", with_fix=True)
    other = ({"a", "b"} - {first.stem}).pop()
    out = snakemake(work, "--cores", "1", "--rerun-incomplete", "--forcerun", "listing", snakefile=snakefile).output
    assert out.count("rule pair:") == 2, out     # the killed job and the one that never started
    assert (work / "out" / f"{first.stem}.json").read_text() == "done\n"
    assert (work / "out" / f"{other}.json").read_text() == "done\n"


# -- B: which settings rerun what (no Snakemake) ---------------------------------------------------------

def _smoke():
    return validate_config(yaml.safe_load(SMOKE.read_text()))


def _set(cfg, dotted, value):
    cfg = copy.deepcopy(cfg)
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


def _changed_stages(cfg, dotted, value):
    new = _set(cfg, dotted, value)
    return {stage for stage in OUTPUT_SETTINGS if output_settings(stage, cfg) != output_settings(stage, new)}


def _runtime_values():
    """A different value for every runtime key."""
    values = {"workers": 3, "batch_size": 7, "num_workers": 3, "device": "cpu", "processes": 2, "chunk": 3}
    return {f"{name}.{key}": values[key] for name, keys in RUNTIME_KEYS.items() for key in keys}


# key -> value -> the stages whose output that changes (settings.py), beyond `report`, which records
# every setting but the runtime ones
RESULT_KEYS = {
    "kmeans.k": (64, {"kmeans"}),
    "tokens.views": (3, {"tokens"}),
    "train.lr": (0.01, {"train"}),
    "sample.temperature": (0.5, {"sample"}),
    "encoder.layer": (2, {"features", "tokens", "stability"}),     # not the tiny encoder's training
    "encoder.precision": ("fp32", {"features", "tokens"}),          # stability runs in fp32 anyway
    "encoder.crop": (26, {"train-encoder", "features", "tokens", "train-vq", "vq-tokens", "train-kl", "kl-latents",
                          "reference", "stability"}),
    "encoder.train.epochs": (2, {"train-encoder", "features", "tokens", "stability"}),
    "kmeans.feature_view": (1, {"features"}),
    "kmeans.seed": (1, {"features", "kmeans"}),
    "vq.train.lr": (0.01, {"train-vq"}),
    "stage2.train.lr": (0.01, {"train-stage2"}),
    "stage2.sample.top_p": (0.5, {"render"}),
    "stage2_nar.train.lr": (0.01, {"train-stage2-nar"}),
    "stage2_nar.sample.iterations": (6, {"render-nar"}),
    "stage2_nar.sample.n_per_class": (3, set()),      # stage 2 renders the DiGIT samples: counts unused
    "maskgit.train.lr": (0.01, {"train-maskgit"}),
    "maskgit.sample.iterations": (6, {"sample-maskgit"}),
    "kl.train.lr": (0.01, {"train-kl"}),
    "mar.train.lr": (0.01, {"train-mar"}),
    "mar.sample.num_iter": (6, {"sample-mar"}),
    "mar_causal.train.lr": (0.01, {"train-mar-causal"}),
    "mar_causal.sample.num_sampling_steps": (20, {"sample-mar-causal"}),
    "probe.epochs": (3, {"probe"}),
    "evaluate.pr_k": (5, {"score"}),
    "evaluate.fid_resamples": (100, {"score"}),       # the intervals: scoring only, not the reference
    "evaluate.interval_level": (0.9, {"score"}),
    "evaluate.kid_subset_size": (50, {"score"}),
    "evaluate.n_reference": (30, {"reference"}),
    "evaluate.stability_images": (10, {"stability"}),
}
# keys that only choose input files: Snakemake reruns a job whose set of inputs changes
INPUT_ONLY_KEYS = {"kmeans.shards": 1, "kmeans.split": "test", "tokens.splits": ["train"]}


def test_runtime_keys_change_no_output():
    cfg = _smoke()
    for dotted, value in _runtime_values().items():
        assert _changed_stages(cfg, dotted, value) == set(), dotted
    # the ones the issue names, and a key the stage does not read
    for dotted in ("sample.batch_size", "stage2.sample.batch_size", "encoder.num_workers", "train.processes"):
        assert dotted in _runtime_values()
    assert "train-encoder" not in _changed_stages(cfg, "encoder.layer", 2)
    # the tiny encoder and VQGAN are trained here: their arch / checkpoint keys are not read ...
    assert _changed_stages(cfg, "encoder.arch", "dinov2_vits14") == {"report"}
    assert _changed_stages(cfg, "vq.checkpoint", "weights/vq.ckpt") == {"report"}
    # ... but name the weights of a real run
    real = _set(_set(_set(cfg, "encoder.train", None), "encoder.checkpoint", "w/dino.pth"), "vq.train", None)
    real = _set(real, "vq.checkpoint", "w/vq.ckpt")
    assert _changed_stages(real, "encoder.arch", "dinov2_vits14") == {"features", "tokens", "stability", "report"}
    assert _changed_stages(real, "vq.checkpoint", "w/other.ckpt") == {"vq-tokens", "render", "render-nar",
                                                                      "render-vq", "stability", "report"}


def test_result_keys_change_exactly_their_stages():
    cfg = _smoke()
    for dotted, (value, stages) in RESULT_KEYS.items():
        assert _changed_stages(cfg, dotted, value) == stages | {"report"}, dotted
    for dotted, value in INPUT_ONLY_KEYS.items():
        assert _changed_stages(cfg, dotted, value) == {"report"}, dotted


def test_every_key_is_either_runtime_or_changes_a_result():
    """No setting falls through: each key of the smoke config (defaults filled) is a runtime key or
    part of the report's record (which every result setting reaches), never both."""
    cfg = _smoke()
    runtime = set(_runtime_values())
    report = output_settings("report", cfg)

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and v and k != "model":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    keys = list(leaves(cfg))
    assert runtime <= set(keys)
    for dotted in keys:
        assert (dotted in runtime) != has_key(report, dotted), dotted


def test_each_stage_gets_a_valid_config():
    """What a rule passes (output settings, then runtime settings) is a config the CLI accepts, and it
    carries the smoke config's values of the keys it names."""
    from pipeline.config import deep_update

    cfg = _smoke()
    for stage in OUTPUT_SETTINGS:
        fragment = deep_update(copy.deepcopy(output_settings(stage, cfg)), runtime_settings(stage, cfg))
        seen = validate_config(json.loads(json.dumps(fragment)))

        def check(tree, prefix=""):
            for k, v in tree.items():
                if isinstance(v, dict) and v and k not in ("model",):
                    check(v, f"{prefix}{k}.")
                else:
                    node = seen
                    for part in f"{prefix}{k}".split("."):
                        node = node[part]
                    assert node == v, (stage, f"{prefix}{k}")
        check(fragment)


# -- B: dry-run plans on a complete smoke run -------------------------------------------------------------

LATER = {"train_stage1", "sample_stage1", "probe_stage1", "render_digit", "render_digit_nar", "render_vq", "score",
         "report", "all"}
# the KL latents read the DiGIT token shards' crops: rewritten token shards rerun them and the MAR rows
MAR_ROWS = {"kl_latents", "train_mar", "train_mar_causal", "sample_mar", "sample_mar_causal", "render_latent"}
AFTER_TOKENS = ({"tokens", "vq_tokens", "train_stage2", "train_stage2_nar", "train_maskgit", "sample_maskgit"}
                | MAR_ROWS | LATER)
# the rules a dry run plans after one setting changed
PLANS = {
    "kmeans.k": ({"kmeans", "stability"} | AFTER_TOKENS),
    "tokens.views": AFTER_TOKENS,
    "train.lr": LATER,
    "sample.temperature": {"sample_stage1", "render_digit", "render_digit_nar", "render_vq", "score", "report",
                           "all"},
    "encoder.layer": {"features", "kmeans", "stability"} | AFTER_TOKENS,
    "stage2.sample.top_p": {"render_digit", "score", "report", "all"},
    "stage2_nar.sample.iterations": {"render_digit_nar", "score", "report", "all"},
    "maskgit.sample.iterations": {"sample_maskgit", "render_vq", "score", "report", "all"},
    "mar.sample.num_iter": {"sample_mar", "render_latent", "score", "report", "all"},
    "evaluate.pr_k": {"score", "report", "all"},
}


def _outputs_of_every_job(dry_output: str) -> tuple[set, set]:
    """(outputs of every planned job, inputs of `all`) from a dry run's job list."""
    outputs, all_inputs, rule = set(), set(), None
    for line in dry_output.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line):
            rule = m.group(1)
        elif (m := re.match(r"^\s+(input|output): (.*)$", line)) and rule:
            files = {f.strip() for f in m.group(2).split(",") if f.strip()}
            if m.group(1) == "output":
                outputs |= files
            elif rule == "all":
                all_inputs |= files
    return outputs, all_inputs


@pytest.fixture(scope="module")
def complete_smoke_run(tmp_path_factory, fmnist_dir):
    """The smoke DAG as if it had run: real shards (the checkpoint's listing), every other output
    created empty and marked up to date by `snakemake --touch` (metadata as after a real run)."""
    work = tmp_path_factory.mktemp("complete")
    snakemake(work, "--cores", "2", "shards/fashion_mnist_smoke/manifest.parquet", configfile=SMOKE)
    plan = snakemake(work, "-n", configfile=SMOKE)      # every job but the checkpoint's is planned
    outputs, all_inputs = _outputs_of_every_job(plan.output)
    outputs |= {"shards/fashion_mnist_smoke/manifest.parquet", "shards/fashion_mnist_smoke/dataset.json"}
    for f in outputs:
        path = work / f
        if not path.exists():
            if f.endswith(".zarr"):
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    # --forceall: touch every job (a job whose outputs look up to date would otherwise be skipped
    # and keep no metadata); the checkpoint is touched too, and the jobs behind it follow
    snakemake(work, "--cores", "1", "--touch", "--forceall", configfile=SMOKE)
    return work, outputs, all_inputs


def _config_with(tmp_path, changes: dict) -> Path:
    cfg = yaml.safe_load(SMOKE.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_all_requests_every_output_of_every_job(complete_smoke_run):
    work, outputs, all_inputs = complete_smoke_run
    assert len(outputs) > 40
    assert outputs <= all_inputs, sorted(outputs - all_inputs)


def test_complete_run_has_nothing_to_do_and_runtime_keys_change_nothing(complete_smoke_run, tmp_path):
    work, _, _ = complete_smoke_run
    assert planned(snakemake(work, "-n", configfile=SMOKE).output) == {}
    changed = _config_with(tmp_path, _runtime_values())
    dry = snakemake(work, "-n", "--cores", "2", configfile=changed)   # --cores (threads) is runtime too
    assert planned(dry.output) == {}, dry.output


def test_result_keys_rerun_exactly_the_affected_rules(complete_smoke_run, tmp_path):
    """One dry run per key, each in its own copy of the complete run, a few at a time."""
    work, _, _ = complete_smoke_run

    def dry_run(dotted):
        copy_dir = tmp_path / dotted
        shutil.copytree(work, copy_dir / "work", symlinks=True)   # copy2: mtimes kept
        changed = _config_with(copy_dir, {dotted: RESULT_KEYS[dotted][0]})
        return snakemake(copy_dir / "work", "-n", configfile=changed).output

    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = dict(zip(sorted(PLANS), pool.map(dry_run, sorted(PLANS))))
    for dotted, output in outputs.items():
        assert set(planned(output)) == PLANS[dotted], (dotted, output)
        assert "Params have changed" in output, (dotted, output)


def test_missing_second_output_is_rebuilt(complete_smoke_run):
    """centroids.json, which no rule reads, gone while centroids.npy is there: kmeans is planned."""
    work, _, _ = complete_smoke_run
    meta = work / "results" / "smoke" / "kmeans" / "centroids.json"
    meta.unlink()
    try:
        dry = snakemake(work, "-n", configfile=SMOKE)
    finally:
        meta.touch()
        os.utime(meta, ns=((work / "results" / "smoke" / "kmeans" / "centroids.npy").stat().st_mtime_ns,) * 2)
    assert "kmeans" in planned(dry.output), dry.output
    assert "Missing output files: results/smoke/kmeans/centroids.json" in dry.output


# -- A on the real smoke DAG: kmeans killed between centroids.npy and centroids.json ------------------------

def _differing(a, b, prefix=""):
    """Dotted paths where two JSON trees differ (a whole subtree when one side is not a mapping)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {p for k in a.keys() | b.keys() for p in _differing(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


@pytest.mark.slow
def test_smoke_kmeans_killed_between_writes_is_rerun(tmp_path, fmnist_dir):
    km = Path("results/smoke/kmeans")
    clean = tmp_path / "clean"
    clean.mkdir()
    t0 = time.monotonic()
    snakemake(clean, "--cores", "2", "--until", "kmeans", configfile=SMOKE)
    print(f"clean run up to kmeans: {time.monotonic() - t0:.0f} s")

    killed = tmp_path / "killed"
    killed.mkdir()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(SMOKE),
           "--cores", "2", "--until", "kmeans"]
    kill_between_writes(cmd, killed, str(km / "centroids.npy"))
    assert not (killed / km / "centroids.json").exists()

    # the default target: Snakemake stops naming the file; with --rerun-incomplete kmeans is planned
    dry = snakemake(killed, "-n", configfile=SMOKE, check=False)
    assert dry.returncode != 0 and "IncompleteFilesException" in dry.output, dry.output[-3000:]
    assert str(km / "centroids.npy") in dry.output.split("Incomplete files:")[1]
    plan = planned(snakemake(killed, "-n", "--rerun-incomplete", configfile=SMOKE).output)
    assert plan["kmeans"] == 1 and "shards" not in plan and "features" not in plan, plan

    t0 = time.monotonic()
    snakemake(killed, "--cores", "2", "--rerun-incomplete", "--until", "kmeans", configfile=SMOKE)
    print(f"rerun of kmeans: {time.monotonic() - t0:.0f} s")
    assert (killed / km / "centroids.npy").read_bytes() == (clean / km / "centroids.npy").read_bytes()
    a, b = (json.loads((d / km / "centroids.json").read_text()) for d in (killed, clean))
    # only wall-clock parts differ: timings, the feature stores' run time, and the hash of the
    # encoder file, which records its training time (its weights are equal, see tests/test_slurm.py)
    wall_clock = ("timings", "feature_attrs.seconds", "feature_attrs.encoder.weights_sha256")
    differing = _differing(a, b)
    assert {p for p in differing if not any(p == w or p.startswith(w + ".") for w in wall_clock)} == set(), differing
    after = planned(snakemake(killed, "-n", configfile=SMOKE).output)
    assert "kmeans" not in after and "features" not in after and "tokens" in after, after
    np.testing.assert_array_equal(np.load(killed / km / "centroids.npy"), np.load(clean / km / "centroids.npy"))
