"""Issue 12: every consumer checks the provenance of what it consumes.

Real smoke-sized artifacts made with the real stages (Fashion-MNIST shards, a random tiny encoder
in the tiny encoder's format, features -> kmeans -> tokens, a random tiny VQGAN -> VQ tokens, tiny
GPTs trained for two steps, samples), then one artifact swapped for another of the right shape:
the consumer stops with a message naming both files and both hashes.
"""
import shutil

import numpy as np
import pytest
import timm
import torch

from conftest import make_fmnist_shards
from pipeline.config import validate_config
from pipeline.data import ViewSpec
from pipeline.encoder_loading import save_timm_encoder
from pipeline.features import features_stage
from pipeline.io import file_sha256, read_json
from pipeline.kmeans import kmeans_stage
from pipeline.models.vqgan import VQGAN, preset
from pipeline.render import render_stage
from pipeline.sample import sample_stage
from pipeline.tiny_encoder import BASE_MODEL, model_kwargs
from pipeline.tokens import tokens_stage
from pipeline.train import train_stage1
from pipeline.vq import load_vq, save_vq, vq_tokenize_shard

ENC = {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3, "layer": 3,
       "device": "cpu", "batch_size": 64, "num_workers": 0,
       "train": {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}}
KMEANS = {"k": 16, "niter": 5, "sample": 2000, "device": "cpu"}
TRAIN = dict(preset="tiny", model=dict(n_layer=1, n_head=2, n_embd=16), conditional=False, class_dropout=0.0,
             steps=2, batch_size=8, grad_accum=1, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
             betas=[0.9, 0.95], grad_clip=1.0, label_smoothing=0.0, ema=None, compile=False, precision="fp32",
             seed=0, log_every=1, checkpoint_every=100, device="cpu")
SAMPLE = dict(n_per_class=1, n=4, temperature=1.0, top_k=None, top_p=None, cfg_scale=1.0, seed=0, batch_size=4,
              chunk=4)
RENDER = {"temperature": 1.0, "top_k": None, "top_p": 0.8, "seed": 0, "batch_size": 4, "chunk": 4}
CENTROIDS_HINT = "the centroids were replaced or half-written; rerun the kmeans stage"
SHARDS_HINT = "all shards of one training run must come from the same tokenizer; retokenize or remove the odd one"


def config(layer: int = 3, kmeans_seed: int = 0) -> dict:
    return validate_config({"encoder": {**ENC, "layer": layer}, "kmeans": {**KMEANS, "seed": kmeans_seed},
                            "tokens": {"views": 1}})


def vq_file(path, seed: int):
    torch.manual_seed(seed)
    save_vq(path, VQGAN(preset("tiny", ch_mult=(1, 1, 1), n_embed=8)), {"note": f"random weights, seed {seed}"})
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist_dir):
    """Two shards, an encoder, two centroid sets (A: kmeans seed 0, B: seed 1), DiGIT tokens of shard 0
    with A and of shard 1 with both, and VQ tokens of shard 0 from vq_a.pt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prov")
    shards = make_fmnist_shards(root, "pv", fmnist_dir, limit=120, per_shard=60, splits=["train"])
    tars = sorted(shards.glob("train-*.tar"))
    cfg = config()
    torch.manual_seed(0)
    kwargs = model_kwargs(cfg["encoder"]["train"], ViewSpec.from_config(cfg["encoder"]), num_classes=10)
    enc = root / "encoder.pt"
    save_timm_encoder(enc, BASE_MODEL, kwargs, timm.create_model(BASE_MODEL, pretrained=False, **kwargs).state_dict(),
                      {"note": "random weights (test)"})
    store = root / "features" / "train-000000.zarr"
    features_stage(cfg, tars[0], store, encoder_path=str(enc), progress=False)
    kmeans_stage(cfg, [store], root / "kmeans_a")
    kmeans_stage(config(kmeans_seed=1), [store], root / "kmeans_b")
    tokens = {}
    for name, tar in (("a0", tars[0]), ("a1", tars[1]), ("b1", tars[1])):
        tokens[name] = root / f"tokens_{name[0]}" / tar.name.replace(".tar", ".npy")
        tokens_stage(cfg, tar, root / f"kmeans_{name[0]}" / "centroids.npy", tokens[name], encoder_path=str(enc),
                     progress=False)
    vq_a, vq_b = vq_file(root / "vq_a.pt", 0), vq_file(root / "vq_b.pt", 1)
    model = load_vq(vq_a)[0]
    vq_tokens = root / "vq_tokens" / "train-000000.npy"
    vq_tokenize_shard(tars[0], tokens["a0"].with_suffix(".json"), vq_tokens, model,
                      ViewSpec.from_config(cfg["encoder"]), progress=False, vq_checkpoint=vq_a)
    yield {"root": root, "tars": tars, "cfg": cfg, "enc": enc, "tokens": tokens, "vq_a": vq_a, "vq_b": vq_b,
           "vq_tokens": vq_tokens, "centroids_a": root / "kmeans_a" / "centroids.npy",
           "centroids_b": root / "kmeans_b" / "centroids.npy"}
    torch.set_num_threads(threads)


def train(out, token_files, context_files=None):
    train_stage1(TRAIN, [str(f) for f in token_files], str(out), progress=False,
                 context_files=[str(f) for f in context_files] if context_files else None)
    return out / "final.pt"


def samples_of(checkpoint, out):
    sample_stage(str(checkpoint), str(out), SAMPLE, device="cpu", progress=False)
    return out


def test_matching_artifacts_pass_and_record_their_tokenizer(run, tmp_path):
    """The whole chain on matching artifacts: tokens record the centroids, the checkpoint and the
    samples record the tokenizer, rendering through stage 2 and directly both run."""
    meta = read_json(run["tokens"]["a0"].with_suffix(".json"))
    assert meta["centroids_sha256"] == file_sha256(run["centroids_a"])
    assert meta["encoder"]["block_index"] == 0 and meta["encoder"]["weights_sha256"] == file_sha256(run["enc"])
    digit = samples_of(train(tmp_path / "digit", [run["tokens"]["a0"], run["tokens"]["a1"]]), tmp_path / "s_digit")
    assert read_json(digit / "samples.json")["tokenizer"]["centroids_sha256"] == {
        "file": str(run["tokens"]["a0"]), "value": file_sha256(run["centroids_a"])}
    stage2 = train(tmp_path / "stage2", [run["vq_tokens"]], [run["tokens"]["a0"]])
    ck = torch.load(stage2, weights_only=True)
    assert [f["tokenizer"].get("vq_checkpoint_sha256") for f in ck["token_files"]] == [file_sha256(run["vq_a"]), None]
    render_stage(str(digit), str(run["vq_a"]), None, RENDER, stage2_checkpoint=str(stage2), device="cpu",
                 progress=False)
    vq = samples_of(train(tmp_path / "vq", [run["vq_tokens"]]), tmp_path / "s_vq")
    render_stage(str(vq), str(run["vq_a"]), None, {}, device="cpu", progress=False)
    for folder in (digit, vq):
        with np.load(folder / "images.npz") as z:
            assert z["images"].shape == (4, 28, 28, 3)


def test_replaced_centroids_stop_the_tokens_stage(run, tmp_path):
    km = tmp_path / "kmeans"
    shutil.copytree(run["centroids_a"].parent, km)
    recorded = file_sha256(km / "centroids.npy")
    np.save(km / "centroids.npy", np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32))
    now = file_sha256(km / "centroids.npy")
    with pytest.raises(ValueError) as err:
        tokens_stage(run["cfg"], run["tars"][0], km / "centroids.npy", tmp_path / "t.npy", encoder_path=str(run["enc"]),
                     progress=False)
    assert str(err.value) == (f"{km / 'centroids.npy'} has sha256 {now}, but {km / 'centroids.json'} records "
                              f"{recorded}: {CENTROIDS_HINT}")
    assert not (tmp_path / "t.npy").exists()


def test_bare_centroids_are_refused_by_the_stage(run, tmp_path):
    bare = tmp_path / "centroids.npy"
    shutil.copyfile(run["centroids_a"], bare)
    with pytest.raises(ValueError) as err:
        tokens_stage(run["cfg"], run["tars"][0], bare, tmp_path / "t.npy", encoder_path=str(run["enc"]), progress=False)
    assert str(err.value) == (f"{bare} has no centroids.json next to it: nothing records which features these "
                              f"centroids were fitted on; rerun the kmeans stage")


def test_centroids_of_another_encoder_layer_stop_the_tokens_stage(run, tmp_path):
    """The centroids' features came from block 0 (layer 3 of 3); the configured layer 2 is block 1."""
    with pytest.raises(ValueError) as err:
        tokens_stage(config(layer=2), run["tars"][0], run["centroids_a"], tmp_path / "t.npy",
                     encoder_path=str(run["enc"]), progress=False)
    assert str(err.value) == (
        f"{run['enc']} has encoder block index 1, but {run['centroids_a'].with_suffix('.json')} records 0: "
        f"the centroids were fitted on another encoder's features; rerun features and kmeans with this encoder, "
        f"or use the encoder they were made with")


def test_shards_of_two_centroid_sets_stop_training(run, tmp_path):
    a0, b1 = run["tokens"]["a0"], run["tokens"]["b1"]
    with pytest.raises(ValueError) as err:
        train(tmp_path / "mixed", [a0, b1])
    assert str(err.value) == (f"{b1} has centroids sha256 {file_sha256(run['centroids_b'])}, but {a0} records "
                              f"{file_sha256(run['centroids_a'])}: {SHARDS_HINT}")
    assert not (tmp_path / "mixed" / "last.pt").exists()


def test_render_with_another_vq_file_stops(run, tmp_path):
    vq_a, vq_b = file_sha256(run["vq_a"]), file_sha256(run["vq_b"])
    ck = train(tmp_path / "vq", [run["vq_tokens"]])
    folder = samples_of(ck, tmp_path / "s_vq")
    with pytest.raises(ValueError) as err:
        render_stage(str(folder), str(run["vq_b"]), None, {}, device="cpu", progress=False)
    assert str(err.value) == (f"{run['vq_b']} has sha256 {vq_b}, but {run['vq_tokens']} records {vq_a}: the model "
                              f"whose samples these are ({ck}) was trained on tokens of another VQ checkpoint; "
                              f"decode with that one")
    # through stage 2: its VQ tokens came from vq_a.pt
    stage2 = train(tmp_path / "stage2", [run["vq_tokens"]], [run["tokens"]["a0"]])
    digit = samples_of(train(tmp_path / "digit", [run["tokens"]["a0"]]), tmp_path / "s_digit")
    with pytest.raises(ValueError) as err:
        render_stage(str(digit), str(run["vq_b"]), None, RENDER, stage2_checkpoint=str(stage2), device="cpu",
                     progress=False)
    assert str(err.value) == (f"{run['vq_b']} has sha256 {vq_b}, but {run['vq_tokens']} records {vq_a}: stage 2 "
                              f"({stage2}) was trained on VQ tokens of another VQ checkpoint; decode with that one, "
                              f"or retrain stage 2 on tokens of this one")
    assert not (digit / "images.npz").exists()


def test_stage2_context_of_other_centroids_stops_rendering(run, tmp_path):
    """Stage 2 learnt its context from tokens of centroids A; the stage-1 model sampled tokens of B."""
    stage2 = train(tmp_path / "stage2", [run["vq_tokens"]], [run["tokens"]["a0"]])
    b1 = run["tokens"]["b1"]
    digit = samples_of(train(tmp_path / "digit_b", [b1]), tmp_path / "s_digit_b")
    with pytest.raises(ValueError) as err:
        render_stage(str(digit), str(run["vq_a"]), None, RENDER, stage2_checkpoint=str(stage2), device="cpu",
                     progress=False)
    assert str(err.value) == (
        f"{stage2} (context shard {run['tokens']['a0']}) has centroids sha256 {file_sha256(run['centroids_a'])}, "
        f"but {digit / 'samples.json'} (shard {b1} of its stage-1 model) records {file_sha256(run['centroids_b'])}: "
        f"stage 2 was trained on DiGIT tokens of another tokenizer than the stage-1 model whose samples it renders; "
        f"train both on the same tokens")


def test_replaced_vq_file_stops_rendering(run, tmp_path):
    """vq.json records the VQ file's sha256: a file swapped under the same name is refused."""
    vq = tmp_path / "vq_a.pt"
    shutil.copyfile(run["vq_a"], vq)
    shutil.copyfile(run["vq_a"].with_suffix(".json"), vq.with_suffix(".json"))
    shutil.copyfile(run["vq_b"], vq)
    folder = samples_of(train(tmp_path / "vq", [run["vq_tokens"]]), tmp_path / "s_vq")
    with pytest.raises(ValueError) as err:
        render_stage(str(folder), str(vq), None, {}, device="cpu", progress=False)
    assert str(err.value) == (f"{vq} has sha256 {file_sha256(run['vq_b'])}, but {vq.with_suffix('.json')} records "
                              f"{file_sha256(run['vq_a'])}: the VQ checkpoint was replaced or half-written; rerun the "
                              f"train-vq stage")
