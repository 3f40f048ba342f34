"""Slow: the whole DAG on the smoke config, then incrementality when a shard is added."""
import json
import shutil
import zipfile

import numpy as np
import pytest
import yaml

from conftest import run_cli, run_snakemake

pytestmark = pytest.mark.slow


def _config(repo, tmp_path, limit):
    cfg = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    cfg["dataset"]["limit"] = limit
    cfg["encoder"]["train"]["max_shards"] = 3   # the tokenizers train on fixed shards: a new shard
    cfg["vq"]["train"]["max_shards"] = 3        # is tokenized, it does not retrain them
    path = tmp_path / f"smoke-{limit}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_full_smoke_dag_and_incremental_shard(repo, tmp_path, fmnist_dir):
    work = tmp_path / "work"
    work.mkdir()
    run_snakemake(workdir=work, configfile=_config(repo, tmp_path, 300))
    res = work / "results" / "smoke"
    tokens = sorted((res / "tokens").glob("*.npy"))
    assert [t.stem for t in tokens] == [f"{s}-{i:06d}" for s in ("test", "train") for i in range(3)]
    grids = np.load(tokens[0])
    assert grids.shape == (100, 2, 7, 7) and grids.dtype == np.uint16
    meta = json.loads((res / "encoder" / "encoder.json").read_text())
    assert 0 <= meta["test_accuracy"] <= 1
    km = json.loads((res / "kmeans" / "centroids.json").read_text())
    assert km["params"]["k"] == 32 and len(km["cluster_sizes"]) == 32
    assert "codebook_size: 32" in run_cli("inspect", tokens[0]).stdout
    samples = json.loads((res / "samples" / "digit" / "samples.json").read_text())
    assert samples["n"] == 20 and np.load(res / "samples" / "digit" / "tokens.npy").shape == (20, 7, 7)
    probe = json.loads((res / "probe" / "digit.json").read_text())
    assert len(probe["per_layer"]) == 2 and probe["n_test"] == 300
    _check_pixels_and_report(res, work)

    again = run_snakemake("-n", workdir=work, configfile=_config(repo, tmp_path, 300))
    assert "Nothing to be done" in again.stdout + again.stderr
    run_snakemake("--report", str(tmp_path / "report.zip"), workdir=work, configfile=_config(repo, tmp_path, 300))
    with zipfile.ZipFile(tmp_path / "report.zip") as z:       # snakemake --report collects our outputs
        names = z.namelist()
    assert any(n.endswith("report.html") for n in names) and any(n.endswith("grid.png") for n in names)
    _check_torchrun_through_the_rule(repo, tmp_path, work, res)

    kinds = ("tokens", "vq_tokens")
    before = {(k, p.name): p.stat().st_mtime_ns for k in kinds for p in (res / k).glob("*.npy")}
    centroids_before = (res / "kmeans" / "centroids.npy").stat().st_mtime_ns
    targets = [f"results/smoke/{k}/{s}-{i:06d}.npy" for k in kinds for s in ("train", "test") for i in range(4)]
    run_snakemake(*targets, workdir=work, configfile=_config(repo, tmp_path, 350))  # adds train/test-000003
    after = {(k, p.name): p.stat().st_mtime_ns for k in kinds for p in (res / k).glob("*.npy")}
    assert set(after) - set(before) == {(k, f"{s}-000003.npy") for k in kinds for s in ("train", "test")}
    assert all(after[key] == before[key] for key in before), "old shards' tokens must not be recomputed"
    assert (res / "kmeans" / "centroids.npy").stat().st_mtime_ns == centroids_before
    assert np.load(res / "tokens" / "train-000003.npy").shape == (50, 2, 7, 7)
    assert np.load(res / "vq_tokens" / "train-000003.npy").shape == (50, 2, 7, 7)


def _check_torchrun_through_the_rule(repo, tmp_path, work, res):
    """train.processes: 2 makes the rule launch torchrun (2 CPU processes, gloo); DDP keeps the global
    batch, so the losses match the single-process run's."""
    single = [json.loads(line)["loss"] for line in (res / "checkpoints" / "digit" / "metrics.jsonl").open()]
    cfg = yaml.safe_load(_config(repo, tmp_path, 300).read_text())
    cfg["train"]["processes"] = 2
    path = tmp_path / "smoke-ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(res / "checkpoints" / "digit")      # no last.pt to resume from: train anew
    proc = run_snakemake("--printshellcmds", "--", "results/smoke/checkpoints/digit/train.json",
                         workdir=work, configfile=path)
    assert "torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2" in proc.stdout + proc.stderr
    assert "world 2" in (res.parent.parent / "results" / "smoke" / "logs" / "train_stage1_digit.log").read_text()
    assert json.loads((res / "checkpoints" / "digit" / "train.json").read_text())["world_size"] == 2
    ddp = [json.loads(line)["loss"] for line in (res / "checkpoints" / "digit" / "metrics.jsonl").open()]
    np.testing.assert_allclose(ddp, single, rtol=1e-3)


def samples_sha(res):
    return json.loads((res / "samples" / "digit" / "samples.json").read_text())["checkpoint_sha256"]


def _check_pixels_and_report(res, work):
    """Issue 5/6 artifacts of the smoke run: VQ tokens aligned with the DiGIT tokens, stage 2 learnt,
    both sample sets decoded to valid images, metrics.json valid with provenance, report.html."""
    from PIL import Image

    from pipeline.evaluate import validate_metrics

    digit_meta = json.loads((res / "tokens" / "train-000000.json").read_text())
    vq_meta = json.loads((res / "vq_tokens" / "train-000000.json").read_text())
    assert vq_meta["keys"] == digit_meta["keys"] and vq_meta["crops"] == digit_meta["crops"]
    assert np.load(res / "vq_tokens" / "train-000000.npy").shape == (100, 2, 7, 7)
    losses = [json.loads(line)["loss"] for line in (res / "checkpoints" / "stage2" / "metrics.jsonl").open()]
    assert losses[-1] < losses[0], losses            # teacher-forced loss on the VQ part goes down
    for model in ("digit", "digit_nar", "vq", "maskgit"):
        with np.load(res / "samples" / model / "images.npz") as z:
            assert z["images"].shape == (20, 28, 28, 3) and z["images"].dtype == np.uint8
            assert z["labels"].tolist() == np.repeat(np.arange(10), 2).tolist()
        assert Image.open(res / "samples" / model / "grid.png").size[0] > 100
        score = json.loads((res / "eval" / f"{model}.json").read_text())
        assert score["fid"] > 0 and 0 <= score["precision"] <= 1 and score["n_samples"] == 20
    metrics = json.loads((work / "reports" / "smoke" / "metrics.json").read_text())
    validate_metrics(metrics)
    ids = {f["id"] for f in metrics["figures"]}
    assert {"fid/digit", "fid/vq", "precision/digit", "recall/vq", "probe_top1/digit", "probe_top1/vq",
            "fid/digit_nar", "fid/maskgit", "final_loss/stage2_nar", "final_loss/maskgit"} <= ids
    for f in metrics["figures"]:
        assert f["provenance"]["config_hash"] == metrics["config_hash"]
    fid_digit = next(f for f in metrics["figures"] if f["id"] == "fid/digit")
    assert fid_digit["n_samples"] == 20 and fid_digit["provenance"]["reference_stats_sha256"]
    assert fid_digit["provenance"]["stage2_checkpoint_sha256"] and fid_digit["provenance"]["feature_network"]
    # the NAR row: the same stage-1 samples, another stage 2 (mask-predict, its iterations recorded)
    by_id = {f["id"]: f for f in metrics["figures"]}
    nar, ar = by_id["fid/digit_nar"]["provenance"], fid_digit["provenance"]
    assert nar["checkpoint_sha256"] == ar["checkpoint_sha256"] and nar["stage2_family"] == "maskgit"
    assert nar["stage2_checkpoint_sha256"] != ar["stage2_checkpoint_sha256"] and ar["stage2_family"] == "gpt"
    assert nar["sampling"]["stage2"]["iterations"] == 4
    mg = by_id["fid/maskgit"]["provenance"]
    assert mg["family"] == "maskgit" and mg["stage2_checkpoint_sha256"] is None and by_id["fid/maskgit"]["n_samples"] == 20
    assert mg["sampling"]["stage1"]["iterations"] == 4
    nar_render = json.loads((res / "samples" / "digit_nar" / "images.json").read_text())
    assert nar_render["samples_checkpoint_sha256"] == samples_sha(res) and "NAR stage 2" in nar_render["route"]
    rows = metrics["tables"]["stability"]["rows"]
    assert {r["tokenizer"] for r in rows} == {"digit", "vq"} and len(rows) == 16
    html = (work / "reports" / "smoke" / "report.html").read_text()
    assert "FID" in html and "data:image/png;base64" in html
    assert "DiGIT + NAR stage 2" in html and "MaskGIT (VQ tokens)" in html and html.count("N=20") >= 4
    shown = run_cli("inspect", res / "checkpoints" / "stage2_nar" / "final.pt").stdout
    assert "family: maskgit" in shown and "mask-predict" in shown and "context grid" in shown
    shown = run_cli("inspect", res / "samples" / "maskgit").stdout
    assert "family: maskgit" in shown and "iterations: 4" in shown
    shown = run_cli("inspect", res / "samples" / "digit_nar").stdout
    assert "rendered sample folder" in shown and "NAR stage 2" in shown
    from test_readme import check_inspect_lines      # the README's inspect examples, on this run
    assert check_inspect_lines(work, "smoke", "fashion_mnist_smoke") >= 10


def test_class_conditioning_on_real_tokens(repo, tmp_path, fmnist_dir):
    """A tiny GPT trained on real smoke tokens produces class-dependent token statistics,
    and CFG scale 1 equals the plain conditional model."""
    import torch

    from pipeline.config import validate_config
    from pipeline.models.sampling import sample
    from pipeline.train import load_model, train_stage1

    work = tmp_path / "work"
    work.mkdir()
    cfg_path = _config(repo, tmp_path, 600)
    run_snakemake("results/smoke/kmeans/centroids.npy", workdir=work, configfile=cfg_path)
    cfg = validate_config(yaml.safe_load(cfg_path.read_text()))
    run_snakemake(*[f"results/smoke/tokens/train-{i:06d}.npy" for i in range(6)], workdir=work, configfile=cfg_path)
    files = sorted(str(p) for p in (work / "results" / "smoke" / "tokens").glob("train-*.npy"))
    train_cfg = {**cfg["train"], "steps": 600, "batch_size": 64, "lr": 0.003, "warmup_steps": 20,
                 "class_dropout": 0.1}
    train_stage1(train_cfg, files, str(tmp_path / "ckpt"), progress=False)
    model, _ = load_model(str(tmp_path / "ckpt" / "final.pt"), ema=False)

    grids = np.concatenate([np.load(f)[:, 0].reshape(-1, 49) for f in files]).astype(np.int64)
    labels = np.concatenate([json.loads(open(f[:-4] + ".json").read())["labels"] for f in files])
    k = model.config.vocab_size
    means = {c: np.bincount(grids[labels == c].ravel(), minlength=k) / (labels == c).sum() / 49 for c in (1, 8)}
    n = 30
    gen_labels = torch.tensor([1] * n + [8] * n)
    seeds = list(range(2 * n))
    toks = sample(model, 2 * n, labels=gen_labels, top_k=None, seeds=seeds).numpy()
    correct = 0
    for row, lab in zip(toks, gen_labels.tolist()):
        hist = np.bincount(row, minlength=k) / 49
        nearest = min(means, key=lambda c: np.abs(hist - means[c]).sum())
        correct += nearest == lab
    print(f"class-nearest accuracy of samples: {correct / (2 * n):.3f}")
    assert correct / (2 * n) > 0.75, correct / (2 * n)  # chance is 0.5

    same = sample(model, 2 * n, labels=gen_labels, top_k=None, seeds=seeds, cfg_scale=1.0).numpy()
    np.testing.assert_array_equal(same, toks)
    guided = sample(model, 2 * n, labels=gen_labels, top_k=None, seeds=seeds, cfg_scale=3.0).numpy()
    assert (guided != toks).any()
