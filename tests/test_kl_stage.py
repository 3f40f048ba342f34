"""KL tokenizer stage (MAR's continuous latents, `pipeline.kl`): train the tiny KL autoencoder briefly on
Fashion-MNIST shards, save / load it (ours and MAR's official layout), store posterior moments for the
DiGIT token shard's crops, decode latents."""
import copy
import json
import re

import numpy as np
import pytest
import torch

from conftest import make_fmnist_shards
from pipeline.config import ConfigError, load_config
from pipeline.data import (ViewSpec, crop_view, cut_views, index_shard, load_resized_images, original_size,
                           read_image, to_tensor, view_params)
from pipeline.errors import StageFailed
from pipeline.kl import (FORMAT, LAYOUT, decode_latents, encode_moments, evaluate_kl, kl_latents_shard,
                         kl_latents_stage, load_configured_kl, load_kl, save_kl, train_kl, train_kl_stage)
from pipeline.models.kl_vae import LOGVAR_RANGE, MAR_LATENT_SCALE, KLAutoencoder, preset
from pipeline.vq import to_model_pixels

SPEC = ViewSpec(resize=32, crop=28, image_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
ENCODER = {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3}
MODEL = {"ch_mult": (1, 1, 1)}   # the demo's cheaper tiny (32 channels at every level): 28 px -> 7x7x4
KL_CFG = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, "max_images": 160, "max_test_images": 80,
          "model": MODEL}
C = 4


def kl_section(**over) -> dict:
    """The config's `kl` section (as the schema fills it in) for the tiny test model."""
    train = {"epochs": 1, "batch_size": 16, "lr": 0.003, "kl_weight": 1e-4, "loss": "l1", "seed": 0,
             "max_images": 16, "max_shards": 1, "max_test_images": 8, "min_test_psnr": None}
    return {"checkpoint": None, "preset": "tiny", "model": dict(MODEL), "device": "cpu", "batch_size": 64,
            "train": train, **over}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist_dir):
    return make_fmnist_shards(tmp_path_factory.mktemp("shards"), "kl", fmnist_dir, limit=160, per_shard=80)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    torch.set_num_threads(1)   # tiny convolutions: a second thread mostly waits (and on a busy machine, spins)
    path = tmp_path_factory.mktemp("kl") / "kl.pt"
    train = sorted(shards.glob("train-*.tar"))
    test = sorted(shards.glob("test-*.tar"))
    meta = train_kl(train, test, path, SPEC, KL_CFG, progress=False)
    return path, meta, train, test


@pytest.fixture()
def token_json(shards, tmp_path):
    """A DiGIT token shard's sidecar for train-000000: keys, labels and 2 views' crops (seed 5)."""
    tar = shards / "train-000000.tar"
    samples = index_shard(tar)
    w, h = read_image(tar, samples[0]).size
    crops = [[list(view_params(5, s.key, v, w, h, SPEC)) for v in range(2)] for s in samples]
    path = tmp_path / "tokens" / "train-000000.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"keys": [s.key for s in samples], "labels": [s.label for s in samples],
                                "crops": crops, "views": 2, "seed": 5}))
    return tar, path, samples, crops


def _views(tars, view=0, seed=0):
    images, keys, _ = load_resized_images(tars, SPEC)
    return cut_views(images, keys, view, seed, SPEC, original_size(tars))


# ---------------------------------------------------------------- training

def test_training_metadata_psnr_and_latent_scale(trained):
    path, meta, train, test = trained
    assert meta["test_psnr"] == meta["test_eval"]["psnr"] and meta["test_images"] == 80
    assert meta["train_images"] == 160 and len(meta["history"]) == 2
    assert meta["grid"] == [7, 7] and meta["channels"] == C
    assert meta["history"][0]["steps"] == 10 and meta["history"][1]["kl_per_dim"] > 0
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format"] == FORMAT and sidecar["test_psnr"] == meta["test_psnr"]
    assert sidecar["latent_scale"] == meta["latent_scale"] and len(sidecar["sha256"]) == 64
    assert sidecar["config"]["ch_mult"] == [1, 1, 1] and sidecar["history"] == meta["history"]
    # The latent scale is 1 / std of the posterior means over the training images' centre views.
    model, _ = load_kl(path, "tiny")
    mean, _ = encode_moments(model, _views(train))
    assert meta["latent_scale"] == pytest.approx(1.0 / mean.double().std(unbiased=False).item(), rel=1e-4)
    torch.manual_seed(0)
    untrained = evaluate_kl(KLAutoencoder(preset("tiny", **MODEL)), _views(test)[:80])["psnr"]
    # Measured on CPU with exactly this config (20 steps): trained 10.89 dB, untrained 7.92 dB (seeds
    # 1, 2: 7.73 / 7.54 dB; an untrained decoder paints mid-grey over mostly black crops). The demo's 250
    # steps on 8000 images reach 19.8 dB. Margins ~1.5 dB under the measured gain absorb CPU/BLAS
    # nondeterminism.
    assert meta["test_psnr"] > untrained + 1.5, (meta["test_psnr"], untrained)
    assert meta["test_psnr"] > 9.5
    assert meta["test_psnr_sampled"] <= meta["test_psnr"] + 0.5


def test_psnr_floor_fails_the_stage(shards, tmp_path):
    config = {"encoder": ENCODER, "kl": kl_section()}
    config["kl"]["train"]["min_test_psnr"] = 99.0
    out = tmp_path / "kl.pt"
    with pytest.raises(StageFailed, match=r"^KL test PSNR \d+\.\d\d dB < kl\.train\.min_test_psnr 99\.0$"):
        train_kl_stage(config, [shards / "train-000000.tar"], [shards / "test-000000.tar"], out, progress=False)
    assert json.loads(out.with_suffix(".json").read_text())["train_images"] == 16   # written, then judged
    config["kl"]["train"]["min_test_psnr"] = 1.0
    meta = train_kl_stage(config, [shards / "train-000000.tar"], [shards / "test-000000.tar"], out, progress=False)
    assert meta["test_images"] == 8 and meta["train_config"]["kl_weight"] == 1e-4


def test_nothing_to_train_with_a_null_train_section(shards, tmp_path):
    config = {"encoder": ENCODER, "kl": kl_section(train=None, checkpoint="kl16.ckpt")}
    with pytest.raises(ConfigError, match=re.escape("config key 'kl.train' is null: nothing to train")):
        train_kl_stage(config, [shards / "train-000000.tar"], [shards / "test-000000.tar"], tmp_path / "kl.pt")
    assert not (tmp_path / "kl.pt").exists()


def test_train_refuses_a_resolution_other_than_the_crop(shards, tmp_path):
    with pytest.raises(ValueError, match="KL autoencoder resolution 32 != view crop 28"):
        train_kl([shards / "train-000000.tar"], [shards / "test-000000.tar"], tmp_path / "kl.pt", SPEC,
                 {**KL_CFG, "model": {**MODEL, "resolution": 32}}, progress=False)


# ---------------------------------------------------------------- files

def test_save_load_round_trip(trained, tmp_path):
    path, meta, _, test = trained
    model, meta2 = load_kl(path)   # the preset names only MAR's layout; ours carries its config
    assert meta2["latent_scale"] == meta["latent_scale"] and meta2["test_psnr"] == meta["test_psnr"]
    assert model.config == preset("tiny", **MODEL) and not model.training
    views = _views(test)[:8]
    again, _, where = load_configured_kl(kl_section(), path)
    assert where == path
    for a, b in zip(encode_moments(model, views), encode_moments(again, views)):
        assert torch.equal(a, b)
    copy_path = tmp_path / "copy.pt"
    save_kl(copy_path, model, meta2)
    third, meta3 = load_kl(copy_path)
    assert all(torch.equal(v, third.state_dict()[k]) for k, v in model.state_dict().items())
    assert meta3 == meta2
    # A digit-kl file must hold exactly the configured architecture.
    with pytest.raises(ValueError, match=re.escape(f"{path}: stored config")):
        load_configured_kl(kl_section(model={}), path)


def test_official_mar_layout(tmp_path):
    torch.manual_seed(1)
    ref = KLAutoencoder(preset("tiny")).eval()
    ckpt = tmp_path / "kl16.ckpt"
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)   # LDM's loss module: dropped
    torch.save({"model": state}, ckpt)
    model, meta = load_kl(ckpt, "tiny")
    plain = json.loads(json.dumps(preset("tiny").to_dict()))   # lists, as the sidecars hold it
    assert meta == {"format": "mar-kl16", "latent_scale": MAR_LATENT_SCALE, "config": plain}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.state_dict().items())
    model2, meta2, _ = load_configured_kl(kl_section(checkpoint=str(ckpt), model={}))
    assert meta2["latent_scale"] == 0.2325 and torch.equal(model2.decoder.conv_out.weight, ref.decoder.conv_out.weight)
    # The wrong architecture for MAR's layout names the file and the keys.
    with pytest.raises(ValueError, match=re.escape(f"KL-VAE checkpoint {ckpt} (architecture")) as err:
        load_configured_kl(kl_section(checkpoint=str(ckpt)))   # ch_mult (1, 1, 1): other shapes
    assert "wrong shapes" in str(err.value)


def test_unusable_files_name_themselves(trained, tmp_path):
    path, _, _, _ = trained
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(cut))):
        load_kl(cut)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: empty file")):
        load_kl(empty)
    obj = torch.load(path, weights_only=True)
    vq = tmp_path / "vq.pt"
    torch.save({**obj, "format": "digit-vq-v1"}, vq)
    with pytest.raises(ValueError, match=re.escape(f"{vq}: a 'digit-vq-v1' file, not a KL autoencoder")):
        load_kl(vq)
    missing = tmp_path / "missing_key.pt"
    torch.save({**obj, "state_dict": {k: v for k, v in obj["state_dict"].items() if k != "quant_conv.bias"}}, missing)
    with pytest.raises(ValueError, match=re.escape(f"{missing}: {FORMAT} weights does not match the KL autoencoder: "
                                                   "missing keys: quant_conv.bias")):
        load_kl(missing)
    bad_cfg = tmp_path / "bad_config.pt"
    torch.save({**obj, "config": {**obj["config"], "colour": 3}}, bad_cfg)
    with pytest.raises(ValueError, match=re.escape(f"{bad_cfg}: {FORMAT} checkpoint with an unusable config")):
        load_kl(bad_cfg)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere.pt"))):
        load_kl(tmp_path / "nowhere.pt")


def test_null_checkpoint_without_a_trained_file():
    with pytest.raises(ValueError, match=r"'kl\.checkpoint' is null .* set kl\.train to train the tiny one"):
        load_configured_kl(kl_section())


# ---------------------------------------------------------------- latents of a shard

def test_latents_align_with_the_token_crops(trained, token_json, tmp_path):
    path, meta, _, _ = trained
    tar, tok, samples, crops = token_json
    config = {"encoder": ENCODER, "kl": kl_section()}
    out = tmp_path / "kl" / "train-000000.npy"
    side = kl_latents_stage(config, tar, tok, out, kl_path=str(path), progress=False)
    moments = np.load(out, mmap_mode="r")
    assert isinstance(moments, np.memmap) and moments.dtype == np.float16 and moments.shape == (80, 2, 7, 7, 2 * C)
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored == side
    assert side["stage"] == "kl_latents" and side["layout"] == LAYOUT == "N,V,h,w,2C (posterior mean, log-variance)"
    assert side["shape"] == [80, 2, 7, 7, 8] and side["dtype"] == "float16" and side["grid"] == [7, 7]
    assert side["channels"] == C and side["codebook_size"] is None and side["views"] == 2 and side["seed"] == 5
    assert side["keys"] == [s.key for s in samples] and side["labels"] == [s.label for s in samples]
    assert side["crops"] == crops and side["latent_scale"] == meta["latent_scale"]
    assert side["kl_config"]["ch_mult"] == [1, 1, 1] and side["kl_checkpoint"] == str(path)
    assert side["kl_checkpoint_sha256"] == json.loads(path.with_suffix(".json").read_text())["sha256"]
    assert side["digit_tokens"] == str(tok) and side["shard"] == str(tar) and len(side["shard_sha256"]) == 64
    assert side["preprocessing"]["crop"] == 28 and side["seconds"] >= 0
    # One view recomputed independently: image 3, view 1 (a random crop, maybe flipped).
    model, _ = load_kl(path)
    view = to_tensor(crop_view(read_image(tar, samples[3]), tuple(crops[3][1]), SPEC))
    with torch.no_grad():
        mean, logvar = model.encode(to_model_pixels(view[None]))
    got = torch.from_numpy(np.array(moments[3, 1], dtype=np.float32)).permute(2, 0, 1)   # (2C, h, w)
    assert torch.allclose(got[:C], mean[0], rtol=1e-3, atol=1e-4)
    assert torch.allclose(got[C:], logvar[0], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got[:C], torch.from_numpy(np.array(moments[3, 0, ..., :C], np.float32)).permute(2, 0, 1))
    # Every centre view equals encoding the centre crops cut from the decoded images.
    images, keys, _ = load_resized_images([tar], SPEC)
    centre_mean, centre_logvar = encode_moments(model, cut_views(images, keys, 0, 5, SPEC, original_size([tar])))
    # (float16 rounding: relative error <= 2**-11; other batch sizes may round the last float32 bit apart)
    stored0 = np.asarray(moments[:, 0], dtype=np.float32)
    np.testing.assert_allclose(stored0[..., :C], centre_mean.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(stored0[..., C:], centre_logvar.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-4)


def test_latents_refuse_misaligned_token_json(trained, token_json, tmp_path):
    path, meta, _, _ = trained
    tar, tok, samples, crops = token_json
    model, _ = load_kl(path)
    run = lambda: kl_latents_shard(tar, tok, tmp_path / "bad.npy", model, SPEC, latent_scale=1.0, progress=False)
    good = json.loads(tok.read_text())
    tok.write_text(json.dumps({**good, "keys": good["keys"][:5] + good["keys"][6:] + good["keys"][5:6]}))
    with pytest.raises(ValueError, match=re.escape(f"{tar}: shard keys do not match {tok} (80 vs 80 keys, "
                                                   "first mismatch at 5)")):
        run()
    tok.write_text(json.dumps({**good, "crops": [[c[:2] for c in row] for row in crops]}))
    with pytest.raises(ValueError, match=re.escape(f"{tok}: crops have shape (80, 2, 2), expected (80, V, 3)")):
        run()
    tok.write_text(json.dumps({**good, "crops": crops[:79]}))
    with pytest.raises(ValueError, match=re.escape(f"{tok}: crops have shape (79, 2, 3), expected (80, V, 3)")):
        run()
    far = copy.deepcopy(crops)
    far[7][1] = [5, 0, 0]   # resized 32x32: a 28-px crop starts at 0..4
    tok.write_text(json.dumps({**good, "crops": far}))
    with pytest.raises(ValueError, match=re.escape(f"{tok}: crop [5, 0, 0] of key {samples[7].key} view 1 does not fit "
                                                   "a 28-px crop of the 32x32 resized image")):
        run()
    tok.write_text(json.dumps(good))
    huge = copy.deepcopy(model)
    with torch.no_grad():
        huge.quant_conv.bias[:C] += 1e5   # means beyond float16's 65504
    with pytest.raises(ValueError, match=re.escape(f"{tar}: posterior means of images 0..79 overflow float16")):
        kl_latents_shard(tar, tok, tmp_path / "bad.npy", huge, SPEC, latent_scale=1.0, progress=False)
    assert not (tmp_path / "bad.npy").exists()


def test_logvar_is_clamped_before_float16(token_json, tmp_path):
    tar, tok, _, _ = token_json
    torch.manual_seed(0)
    model = KLAutoencoder(preset("tiny", **MODEL)).eval()
    with torch.no_grad():
        model.quant_conv.bias[C:] -= 1e6   # log-variances far below LDM's clamp
    kl_latents_shard(tar, tok, tmp_path / "lv.npy", model, SPEC, latent_scale=2.0, progress=False)
    moments = np.load(tmp_path / "lv.npy")
    assert np.isfinite(moments).all() and (moments[..., C:] == LOGVAR_RANGE[0]).all()
    assert json.loads((tmp_path / "lv.json").read_text())["kl_checkpoint"] is None


# ---------------------------------------------------------------- decoding

def test_decode_latents(trained):
    path, _, _, test = trained
    model, _ = load_kl(path)
    views = _views(test)[:10]
    mean, _ = encode_moments(model, views)
    z = mean.permute(0, 2, 3, 1).numpy()   # (n, h, w, C)
    images = decode_latents(model, z, batch_size=4)
    assert images.shape == (10, 28, 28, 3) and images.dtype == np.uint8
    with torch.no_grad():
        direct = ((model.decode(mean).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(images, direct.numpy())
    np.testing.assert_array_equal(decode_latents(model, torch.from_numpy(z).reshape(10, 49, C)), images)
    mse = ((images.astype(np.float64) - views.permute(0, 2, 3, 1).numpy()) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / mse) > 9.5   # the trained decoder reconstructs
    with pytest.raises(ValueError, match=re.escape("latents of shape (10, 7, 7, 3): expected (n, 7, 7, 4) or "
                                                   "(n, 49, 4)")):
        decode_latents(model, z[..., :3])
    assert decode_latents(model, np.zeros((0, 7, 7, C), np.float32)).shape == (0, 28, 28, 3)


# ---------------------------------------------------------------- slow: the demo's settings

@pytest.mark.slow
def test_demo_settings_reach_the_floor(repo, fmnist_dir, tmp_path):
    """The tiny KL autoencoder with the default config's settings on real Fashion-MNIST (8000 training
    images, one epoch) clears kl.train.min_test_psnr on 2000 test images."""
    torch.set_num_threads(2)
    config = load_config(repo / "configs" / "default.yaml")
    kl = config["kl"]
    assert kl["train"] is not None and kl["train"]["min_test_psnr"] is not None
    root = make_fmnist_shards(tmp_path, "fm", fmnist_dir, limit=10000, per_shard=10000)   # the demo's first shards
    train = sorted(root.glob("train-*.tar"))[: kl["train"]["max_shards"]]
    test = sorted(root.glob("test-*.tar"))
    meta = train_kl_stage(config, train, test, tmp_path / "kl.pt", progress=False)
    print(json.dumps({k: meta[k] for k in ("test_psnr", "test_psnr_sampled", "latent_scale", "channels",
                                           "seconds")}))
    assert meta["test_psnr"] >= kl["train"]["min_test_psnr"] and meta["test_images"] == 2000
    assert 0.05 < meta["latent_scale"] < 20
