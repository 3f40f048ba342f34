"""The ImageNet paper configs: they validate, say what the paper says, and plan the whole DAG.

DiGIT's (imagenet_base / imagenet_large, every generator row) and MAR's published recipe on the same
data (imagenet_mar_base / imagenet_mar_large: MAR-B / MAR-L and the causal variant). Step counts follow
MAR's loader, which drops the last partial batch: floor(1,281,167 / batch) steps per epoch.

Planning runs the real shards checkpoint on a fake ImageNet tree (1000 class folders, tiny JPEGs,
one image per shard; see tests/fake_imagenet.py for why), then dry-runs the paper config:
  * before the checkpoint has run, only `shards` is planned (how many shards is unknown);
  * after it, every rule downstream is planned, each per-shard rule once per shard;
  * with placeholders for a finished run, nothing is left to do; after one more image (one
    more shard) exactly that shard's per-shard jobs and the jobs downstream of them are planned.
The fast test does this at 20 train shards; the slow one at ImageNet's 1282 + 50, timed.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

import fake_imagenet as fi
from pipeline.config import load_config

PAPER = ("imagenet_base", "imagenet_large")
# MAR's published recipe (LTH14/mar) on the same data; each MAR config keeps its DiGIT config's data,
# tokenizer and stage-1 sections (the KL latents are taken for the DiGIT tokens' crops).
MAR_CONFIGS = {"imagenet_mar_base": "imagenet_base", "imagenet_mar_large": "imagenet_large"}
MAR_SIZE = {"imagenet_mar_base": "base", "imagenet_mar_large": "large",    # the DiGIT configs' MAR rows:
            "imagenet_base": "base", "imagenet_large": "large"}            # MAR's size nearest 219M / 732M
IMAGENET_TRAIN = 1_281_167
MAR_BLR = 1e-4                 # main_mar.py: lr = blr x global batch / 256
MAR_EPOCHS, MAR_WARMUP_EPOCHS = 800, 100   # README: the released MAR-B/L/H (800 epochs), --warmup_epochs 100
MAR_CFG = {"base": 2.9, "large": 3.0}      # README evaluation commands: FID 2.31 (MAR-B), 1.78 (MAR-L)
# README: --diffloss_d x --diffloss_w per size, and models/mar.py's mar_base / mar_large / mar_huge
MAR_SIZES = {"base": dict(width=768, depth=12, heads=12, head_depth=6, head_width=1024, params=208e6),
             "large": dict(width=1024, depth=16, heads=16, head_depth=8, head_width=1280, params=479e6),
             "huge": dict(width=1280, depth=20, heads=16, head_depth=12, head_width=1536, params=943e6)}
# The target: a dry run at ImageNet's shard count in < 10 s. Asserted loosely, because this
# machine is shared: CPU time (steady under load) < 2x the target, wall time < 6x.
PLAN_CPU_LIMIT_S = 20.0
PLAN_WALL_LIMIT_S = 60.0


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_validates(repo, name):
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    base = name == "imagenet_base"
    assert cfg["dataset"]["source"] == "imagefolder" and cfg["dataset"]["splits"] == ["train", "val"]
    enc = cfg["encoder"]
    assert enc["arch"] == ("dinov2_vitb14_reg4" if base else "dinov2_vitl14_reg4")
    assert enc["checkpoint"] and enc["train"] is None and enc["layer"] == 3
    assert (enc["resize"], enc["crop"], enc["image_size"]) == (256, 256, 224)
    assert enc["mean"] == [0.485, 0.456, 0.406] and enc["std"] == [0.229, 0.224, 0.225]
    k = 8192 if base else 16384
    assert cfg["kmeans"]["k"] == k and cfg["kmeans"]["niter"] == 20
    assert cfg["kmeans"]["sample"] == cfg["kmeans"]["max_points_per_centroid"] * k == 256 * k
    assert cfg["train"]["preset"] == ("base" if base else "large")
    assert cfg["train"]["label_smoothing"] == 0.1 and cfg["train"]["conditional"]
    assert cfg["sample"]["top_k"] == (200 if base else 400) and cfg["sample"]["n_per_class"] == 50
    assert cfg["stage2"]["sample"]["top_p"] == 0.8
    nar = cfg["stage2_nar"]       # the paper's "DiGIT (+MaskGIT)": 219M, label smoothing 0.1, 8 iterations
    assert nar["train"]["preset"] == "base" and nar["train"]["label_smoothing"] == 0.1
    assert not nar["train"]["conditional"] and nar["train"]["lr"] == 0.0005
    assert nar["train"]["steps"] * nar["train"]["batch_size"] == 125000 * 1024
    assert (nar["sample"]["iterations"], nar["sample"]["choice_temperature"]) == (8, 4.5)
    assert cfg["generators"] == ["digit", "digit_nar", "vq", "maskgit", "mar", "mar_causal"]
    assert cfg["vq"]["checkpoint"] and cfg["vq"]["train"] is None and cfg["vq"]["preset"] == "mage_vqgan"
    ev = cfg["evaluate"]
    assert ev["reference_split"] == "val" and ev["n_reference"] == 0
    assert "val" in cfg["tokens"]["splits"] and cfg["probe"]["test_split"] == "val"


def mar_steps_per_epoch(batch: int) -> int:
    """MAR's DataLoader drops the last partial batch (drop_last=True): floor(1,281,167 / batch)
    steps per epoch (625 at 2048; on 32 ranks x 64: floor(ceil(1,281,167 / 32) / 64) = 625 too)."""
    return IMAGENET_TRAIN // batch


def _check_mar_optimizer(train: dict) -> None:
    """MAR's optimizer recipe (main_mar.py, util/lr_sched.py), whatever the budget."""
    batch = train["batch_size"]
    assert train["lr"] == pytest.approx(MAR_BLR * batch / 256), "lr = blr x batch / 256"
    assert train["schedule"] == "constant" and train["warmup_init_lr"] == 0.0
    assert train["warmup_steps"] == MAR_WARMUP_EPOCHS * mar_steps_per_epoch(batch)
    assert (train["weight_decay"], train["betas"], train["grad_clip"], train["ema"]) == (0.02, [0.9, 0.95], 3.0, 0.9999)
    assert train["conditional"] and train["class_dropout"] == 0.1, "MAR's label drop 0.1"
    assert train["model"] == {}, "MAR's sizes and defaults come from the presets, not overrides"
    assert train["splits"] == ["train"]


@pytest.mark.parametrize("name", sorted(MAR_CONFIGS))
def test_mar_config_is_mars_published_recipe(repo, name):
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    digit = load_config(repo / "configs" / f"{MAR_CONFIGS[name]}.yaml")
    size = MAR_SIZE[name]
    assert cfg["run"] == name and cfg["generators"] == ["mar", "mar_causal"]
    # the same images, crops and DiGIT tokens as the DiGIT config (and its stage-1 GPTs, which `all` builds)
    for key in ("dataset", "shards", "encoder", "kmeans", "tokens", "train", "sample", "probe", "vq", "evaluate"):
        assert cfg[key] == digit[key], f"{name}: {key} differs from {MAR_CONFIGS[name]}.yaml"
    kl = cfg["kl"]
    assert kl["checkpoint"] == "weights/kl16.ckpt" and kl["preset"] == "kl16" and kl["train"] is None
    assert kl["model"] == {}
    for section in ("mar", "mar_causal"):      # the causal variant: the same size and budget
        train, sample = cfg[section]["train"], cfg[section]["sample"]
        assert train["preset"] == size
        assert train["batch_size"] == 2048, "README: --batch_size 64 per GPU x 32 GPUs"
        assert train["lr"] == 0.0008
        assert train["steps"] == MAR_EPOCHS * mar_steps_per_epoch(train["batch_size"]) == 500_000
        assert train["warmup_steps"] == 62_500
        _check_mar_optimizer(train)
        assert train["batch_size"] % (train["processes"] * train["grad_accum"]) == 0
        assert (sample["num_sampling_steps"], sample["temperature"]) == (100, 1.0)
        assert (sample["cfg_scale"], sample["cfg_schedule"]) == (MAR_CFG[size], "linear")
        assert sample["n_per_class"] == 50
    assert cfg["mar"]["sample"]["num_iter"] == 256, "README: 256 iterations for the published FIDs"
    assert cfg["mar"]["train"] == cfg["mar_causal"]["train"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_mar_rows_have_stage1_budget(repo, name):
    """The DiGIT configs' MAR rows: stage 1's steps and global batch (like for like), MAR's
    optimizer otherwise, sampled without guidance as the GPTs (MAR's no-CFG temperature 0.95)."""
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    assert cfg["kl"]["checkpoint"] and cfg["kl"]["train"] is None and cfg["kl"]["preset"] == "kl16"
    stage1 = cfg["train"]
    for section in ("mar", "mar_causal"):
        train, sample = cfg[section]["train"], cfg[section]["sample"]
        assert train["preset"] == MAR_SIZE[name]
        assert (train["steps"], train["batch_size"], train["grad_accum"]) == \
            (stage1["steps"], stage1["batch_size"], stage1["grad_accum"]) == (125000, 2048, 1)
        _check_mar_optimizer(train)
        assert train["lr"] == 0.0008 and train["warmup_steps"] == 62_500
        assert sample["cfg_scale"] == cfg["sample"]["cfg_scale"] == 1.0 and sample["temperature"] == 0.95
        assert sample["num_sampling_steps"] == 100 and sample["n_per_class"] == cfg["sample"]["n_per_class"]
    assert cfg["mar"]["sample"]["num_iter"] == 256


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_mar_presets_are_mars_sizes(size):
    """preset base / large / huge = MAR-B / L / H: transformer and diffusion-MLP sizes, MAR's
    defaults, and the published parameter counts (208M / 479M / 943M), for both MAR families."""
    torch = pytest.importorskip("torch")
    from pipeline.models.mar import MAR, MARConfig
    from pipeline.models.mar_causal import MARCausal, MARCausalConfig

    want = MAR_SIZES[size]
    mar, causal = MARConfig.preset(size), MARCausalConfig.preset(size)
    assert (mar.encoder_width, mar.encoder_depth, mar.encoder_heads) == (want["width"], want["depth"], want["heads"])
    assert (mar.decoder_width, mar.decoder_depth, mar.decoder_heads) == (want["width"], want["depth"], want["heads"])
    assert (mar.head_depth, mar.head_width) == (want["head_depth"], want["head_width"])
    assert (mar.buffer_size, mar.mask_ratio_min, mar.diffusion_batch_mul) == (64, 0.7, 4)
    assert (mar.attn_dropout, mar.proj_dropout, mar.label_drop_prob, mar.num_sampling_steps) == (0.1, 0.1, 0.1, "100")
    assert (causal.n_embd, causal.n_head, causal.n_layer) == (want["width"], want["heads"], 2 * want["depth"])
    assert (causal.head_depth, causal.head_width, causal.diffusion_batch_mul) == (want["head_depth"], want["head_width"], 4)
    assert (causal.dropout, causal.label_drop_prob) == (0.1, 0.1)
    with torch.device("meta"):      # shapes only: no memory, no init cost
        n_mar = sum(p.numel() for p in MAR(mar).parameters())
        n_causal = sum(p.numel() for p in MARCausal(causal).parameters())
    assert n_mar == pytest.approx(want["params"], rel=0.005), f"MAR-{size}: {n_mar / 1e6:.1f}M"
    assert n_causal == pytest.approx(n_mar, rel=0.01), "the causal variant must be the same size"


def _ids(n: int) -> set[str]:
    return {f"{i:06d}" for i in range(n)}


def _check_full_plan(plan: fi.Plan, cfg: dict, n: dict[str, int]) -> None:
    """The whole DAG is planned: nothing pending on the checkpoint, per-shard rules once per shard."""
    assert "<TBD>" not in plan.text and "will be updated after completion" not in plan.text, plan.text[-3000:]
    assert "shards" not in plan.counts, "the shards checkpoint is done and must not be planned again"
    assert Counter(job.rule for job in plan.jobs) == plan.counts, "job listing and job stats disagree"
    assert {"tokens", "kmeans", "train_stage1", "all"} <= set(plan.counts), plan.counts
    per_shard = fi.shards_per_rule(plan)
    assert set(per_shard["tokens"]) == set(cfg["tokens"]["splits"])
    for rule, splits in per_shard.items():
        for split, ids in splits.items():
            if rule == "features":  # only the shards that feed k-means
                assert split == cfg["kmeans"]["split"] and ids == _ids(min(cfg["kmeans"]["shards"], n[split]))
            else:
                assert ids == _ids(n[split]), f"{rule} over {split}: {len(ids)} jobs for {n[split]} shards"
        assert plan.counts[rule] == sum(len(ids) for ids in splits.values())
    rows = cfg["generators"]
    latent = [row for row in ("mar", "mar_causal") if row in rows]
    assert plan.counts["score"] == len(rows), f"one score per row of {rows}"
    if latent:   # KL latents of the MAR rows' training split; each MAR row trained, sampled, decoded once
        assert set(per_shard["kl_latents"]) == {split for row in latent for split in cfg[row]["train"]["splits"]}
        assert all(plan.counts[f"{job}_{row}"] == 1 for row in latent for job in ("train", "sample")), plan.counts
        assert plan.counts["render_latent"] == len(latent)
    else:
        assert "kl_latents" not in plan.counts and "render_latent" not in plan.counts


def _expected_after_new_shard(plan: fi.Plan, n_train: int) -> Counter:
    """What one more train shard should schedule, read off the plan before it: the jobs the last
    train shard had in every per-shard rule that covers all of train, and everything downstream."""
    last = f"{n_train - 1:06d}"
    full = {rule for rule, splits in fi.shards_per_rule(plan).items() if splits.get("train") == _ids(n_train)}
    seeds = [job for job in plan.jobs if job.rule in full and job.shard == ("train", last)]
    assert seeds, "no per-shard rule covers the train split"
    return Counter(job.rule for job in fi.downstream(plan, seeds))


def plan_imagenet(tmp_path, names, n_train: int, n_val: int, incremental=PAPER, thorough: bool = True) -> dict:
    """The whole scenario on one shared fake tree and shards folder; returns timings per config.

    thorough: also check the fresh-tree plan and the "nothing to do" plan of the placeholders, and
    run the shards stage through its Snakemake rule (the fast test calls the same function in-process
    and relies on the exact after-new-shard plan, which fails anyway if the placeholders were off).
    """
    data, work = tmp_path / "ILSVRC2012", tmp_path / "work"
    work.mkdir()
    fi.make_fake_imagenet(data, n_train, n_val)
    configs = {name: fi.fake_config(fi.REPO / "configs" / f"{name}.yaml", tmp_path / f"{name}.yaml", data, n_train)
               for name in names}
    cfgs = {name: load_config(path) for name, path in configs.items()}
    first = configs[names[0]]
    for path in configs.values():
        fi.placeholder_weights(work, path)

    if thorough:
        fresh = fi.dry_run(work, first)
        assert fresh.counts == Counter({"shards": 1, "all": 1}), fresh.counts
    shard_s = fi.run_shards(work, first, via_snakemake=thorough)
    n = {"train": n_train, "val": n_val}
    for split, count in n.items():
        assert len(list((work / "shards" / "imagenet").glob(f"{split}-*.tar"))) == count

    timings, plans = {}, {}
    for name in names:
        plan = fi.dry_run(work, configs[name])
        _check_full_plan(plan, cfgs[name], n)
        plans[name] = plan
        timings[name] = {"shards_s": round(shard_s, 2), "plan_s": round(plan.seconds, 2),
                         "plan_cpu_s": round(plan.cpu_s, 2), "jobs": sum(plan.counts.values()),
                         "counts": dict(plan.counts)}
        print(f"[{name}] {n_train} train + {n_val} val shards: planned {timings[name]['jobs']} jobs in "
              f"{plan.seconds:.2f} s wall, {plan.cpu_s:.2f} s CPU (Snakemake start-up included): {dict(plan.counts)}")
        if name in incremental:
            fi.make_placeholder_outputs(work, plan)
        if name in incremental and thorough:
            done = fi.dry_run(work, configs[name], "--quiet", "rules")
            assert done.nothing_to_do, f"placeholders should look like a finished run:\n{done.text[-3000:]}"

    if not incremental:
        return timings
    fi.add_train_image(data)
    fi.run_shards(work, first, force=True, via_snakemake=thorough)
    new = f"{n_train:06d}"
    assert (work / "shards" / "imagenet" / f"train-{new}.tar").is_file()
    for name in incremental:
        expected = _expected_after_new_shard(plans[name], n_train)
        after = fi.dry_run(work, configs[name])
        timings[name]["plan_after_new_shard_s"] = round(after.seconds, 2)
        timings[name]["plan_after_new_shard_cpu_s"] = round(after.cpu_s, 2)
        timings[name]["after_new_shard"] = dict(after.counts)
        print(f"[{name}] one more train shard: planned {dict(after.counts)} in {after.seconds:.2f} s wall, "
              f"{after.cpu_s:.2f} s CPU")
        assert after.counts == expected, f"expected {dict(expected)}, planned {dict(after.counts)}"
        assert {job.shard for job in after.jobs if job.shard} == {("train", new)}
        assert after.counts["tokens"] == 1, "the new shard's tokens, nothing else's"
        assert after.counts["train_stage1"] == plans[name].counts["train_stage1"], "every stage-1 model retrains"
        assert "kmeans" not in after.counts and "features" not in after.counts, "k-means shards are unchanged"
    return timings


def test_small_fake_imagenet_plans_whole_dag_and_one_new_shard(tmp_path):
    plan_imagenet(tmp_path, PAPER + tuple(MAR_CONFIGS), n_train=20, n_val=3, incremental=("imagenet_base",),
                  thorough=False)


@pytest.mark.slow
def test_imagenet_scale_dag_plans_in_time(tmp_path):
    timings = plan_imagenet(tmp_path, PAPER, n_train=fi.IMAGENET_TRAIN_SHARDS, n_val=fi.IMAGENET_VAL_SHARDS)
    print(yaml.safe_dump(timings, sort_keys=False))
    for name, t in timings.items():
        for key in ("plan", "plan_after_new_shard"):
            assert t[f"{key}_cpu_s"] < PLAN_CPU_LIMIT_S, f"{name}: {key} took {t[f'{key}_cpu_s']} s CPU"
            assert t[f"{key}_s"] < PLAN_WALL_LIMIT_S, f"{name}: {key} took {t[f'{key}_s']} s wall"
