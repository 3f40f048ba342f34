"""Token-stability table (DiGIT Table 1) on real Fashion-MNIST views with real tiny models.

The DiGIT side is a seeded random timm ViT saved in the tiny encoder's format (loaded through
`encoder_loading.load_configured_encoder`, as the pipeline does) with k-means centroids fitted on its patch
features; the VQ side is the tiny VQGAN architecture (random weights) whose codebook is fitted by
k-means to its own encoder outputs on the same images, saved and reloaded with `vq.load_vq`.
Untrained networks keep the test fast; what is checked is the measurement, not the models.
"""
import json
import math

import numpy as np
import pytest
import timm
import torch

from conftest import make_fmnist_shards
from pipeline.config import validate_config
from pipeline.data import ViewSpec, centre_views, encoder_input
from pipeline.encoder_loading import load_configured_encoder, save_timm_encoder
from pipeline.io import file_sha256
from pipeline.kmeans import train_kmeans
from pipeline.metrics.stability import (SNRS_DB, add_noise, digit_tokenizer, format_table, image_noise,
                                        measured_snr_db, stability_table, vq_tokenizer)
from pipeline.models.vqgan import VQGAN, preset
from pipeline.stability import stability_stage
from pipeline.tiny_encoder import BASE_MODEL, model_kwargs
from pipeline.tokens import load_tokens, tokenize_shard
from pipeline.vq import encode_uint8, load_vq, save_vq, to_model_pixels

ENC = {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3, "layer": 3,
       "device": "cpu", "train": {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}}
N_TABLE = 100


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fmnist_dir):
    # One thread: these models are tiny, and on a busy 2-core machine two threads ran the VQGAN 5-10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stab")
    shards = make_fmnist_shards(root, "st", fmnist_dir, limit=400, per_shard=400, splits=["test"])
    tar = shards / "test-000000.tar"
    config = validate_config({"encoder": ENC, "vq": {"preset": "tiny", "model": {"ch_mult": [1, 1, 1], "n_embed": 64}}})
    spec = ViewSpec.from_config(config["encoder"])

    torch.manual_seed(0)
    kwargs = model_kwargs(config["encoder"]["train"], spec, num_classes=10)
    enc_path = root / "encoder.pt"
    save_timm_encoder(enc_path, BASE_MODEL, kwargs, timm.create_model(BASE_MODEL, pretrained=False, **kwargs).state_dict(),
                      {"note": "random weights (test)"})
    encoder = load_configured_encoder(config, str(enc_path))

    images, _ = centre_views([tar], spec, 0)
    with torch.no_grad():
        feats = encoder(encoder_input(images[:N_TABLE], spec)).reshape(-1, encoder.embed_dim).numpy()
    centroids, _ = train_kmeans(feats, k=32, niter=10, seed=0, use_gpu=False)
    cent_path = root / "centroids.npy"
    np.save(cent_path, centroids)

    torch.manual_seed(0)
    vq = VQGAN(preset("tiny", ch_mult=(1, 1, 1), n_embed=64)).eval()
    with torch.no_grad():
        lat = vq._latent(to_model_pixels(images[:N_TABLE])).permute(0, 2, 3, 1).reshape(-1, 32).numpy()
        codebook, _ = train_kmeans(lat, k=64, niter=10, seed=0, use_gpu=False)
        vq.quantize.embedding.weight.copy_(torch.from_numpy(codebook))
    vq_path = root / "vq.pt"
    save_vq(vq_path, vq, {"note": "random encoder, k-means codebook (test)"})

    out_json = root / "stability.json"
    result = stability_stage(config, enc_path, cent_path, vq_path, [tar], out_json, n_images=N_TABLE, seed=0,
                             batch_size=64, progress=False)
    yield {"tar": tar, "config": config, "spec": spec, "encoder": encoder, "centroids": centroids,
            "vq_path": vq_path, "enc_path": enc_path, "cent_path": cent_path, "images": images,
            "out_json": out_json, "result": result, "root": root}
    torch.set_num_threads(threads)


def _by(rows, name, metric):
    return [r[metric] for r in rows if r["tokenizer"] == name]


def test_table_has_paper_columns_and_valid_values(setup):
    saved = json.loads(setup["out_json"].read_text())
    rows = saved["rows"]
    assert saved["snr_db"] == [float(s) for s in SNRS_DB] == [30.0, 25.0, 20.0, 15.0, 10.0, 5.0, 1.0, 0.01]
    assert [(r["tokenizer"], r["snr_db"]) for r in rows] == [(t, float(s)) for t in ("digit", "vq") for s in SNRS_DB]
    for r in rows:
        assert 0.0 <= r["change_rate"] <= 1.0, r
        assert -1.0 <= r["cosine"] <= 1.0, r
        assert r["positions"] == N_TABLE * 49 and r["images"] == N_TABLE
        assert abs(r["measured_snr_db"] - r["snr_db"]) < 0.5, r
    # Provenance.
    assert saved["n_images"] == N_TABLE and saved["seed"] == 0 and saved["images"]["view"] == 0
    tk = saved["tokenizers"]
    assert tk["digit"]["encoder_sha256"] == file_sha256(setup["enc_path"])
    assert tk["digit"]["centroids_sha256"] == file_sha256(setup["cent_path"])
    assert tk["vq"]["checkpoint_sha256"] == file_sha256(setup["vq_path"])
    assert tk["digit"]["codebook_size"] == 32 and tk["vq"]["codebook_size"] == 64
    assert tk["digit"]["grid"] == tk["vq"]["grid"] == [7, 7]
    assert "10^(snr_db / 10)" in saved["noise"]["noise"] and saved["paper_table1"]["snr_db"] == list(SNRS_DB)
    # The text table: paper layout (SNRs as columns; change rows, then cos-sim rows).
    table = format_table(rows)
    assert table == saved["table"]
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert [c.strip() for c in lines[0].strip("|").split("|")][1:] == ["30", "25", "20", "15", "10", "5", "1", "0.01"]
    assert lines[2].startswith("| DiGIT token change") and lines[3].startswith("| VQ token change")
    assert lines[4].startswith("| DiGIT token cos-sim") and lines[5].startswith("| VQ token cos-sim")
    first = [float(c) for c in lines[2].strip("|").split("|")[1:]]
    assert first == [round(v, 3) for v in _by(rows, "digit", "change_rate")]


def test_more_noise_changes_more_tokens(setup):
    rows = setup["result"]["rows"]
    for name in ("digit", "vq"):
        change, cos = _by(rows, name, "change_rate"), _by(rows, name, "cosine")
        assert change[0] < change[-1], (name, change)
        assert cos[0] > cos[-1], (name, cos)
        # Same noise field scaled up column by column: the curves are (nearly) monotone.
        assert all(b >= a - 0.02 for a, b in zip(change, change[1:])), (name, change)
        assert all(b <= a + 0.02 for a, b in zip(cos, cos[1:])), (name, cos)
        assert change[-1] > 0.1, (name, change)  # 0.01 dB noise really perturbs the tokens


def test_clean_tokens_are_the_pipelines_tokens(setup, tmp_path):
    """With no noise the table's tokenizers give the tokens stage's view-0 tokens and the VQ stage's ids."""
    spec, tar = setup["spec"], setup["tar"]
    npy = tmp_path / "tok.npy"
    tokenize_shard(tar, npy, setup["encoder"], setup["centroids"], spec, views=1, batch_size=200, progress=False,
                   device="cpu")
    grids, _ = load_tokens(npy)
    images = setup["images"]
    x = to_model_pixels(images)
    ids, emb = digit_tokenizer(setup["encoder"], setup["centroids"], spec).tokenize(x)
    assert ids.shape == (len(images), 7, 7) and emb.shape == (len(images), 7, 7, 32)
    assert (ids.numpy() == grids[:, 0]).mean() > 0.999
    np.testing.assert_array_equal(emb.numpy(), setup["centroids"][ids.numpy()])
    vq, _ = load_vq(setup["vq_path"])
    vids, vemb = vq_tokenizer(vq).tokenize(x[:50])
    assert torch.equal(vids, encode_uint8(vq, images[:50]))
    assert torch.equal(vemb, vq.quantize.embedding.weight[vids])


def test_deterministic_per_seed(setup):
    images = setup["images"][:24]
    vq, _ = load_vq(setup["vq_path"])
    toks = {"digit": digit_tokenizer(setup["encoder"], setup["centroids"], setup["spec"]), "vq": vq_tokenizer(vq)}
    snrs = (20, 5, 0.01)
    a = stability_table(images, toks, snrs=snrs, seed=0, batch_size=8)
    b = stability_table(images, toks, snrs=snrs, seed=0, batch_size=8)
    assert a == b
    # The noise of an image depends on (seed, image index) only, not on the batching.
    c = stability_table(images, toks, snrs=snrs, seed=0, batch_size=24)
    for ra, rc in zip(a, c):
        assert ra["measured_snr_db"] == pytest.approx(rc["measured_snr_db"], abs=1e-9)
        assert ra["change_rate"] == pytest.approx(rc["change_rate"], abs=0.01)
    d = stability_table(images, toks, snrs=snrs, seed=1, batch_size=8)
    assert [r["change_rate"] for r in a] != [r["change_rate"] for r in d]
    z = image_noise((3, 28, 28), 0, range(10))
    torch.testing.assert_close(image_noise((3, 28, 28), 0, [7])[0], z[7], rtol=0, atol=0)
    assert not torch.equal(image_noise((3, 28, 28), 1, [7])[0], z[7])


def test_snr_definition(setup):
    """Measured SNR of the added noise (signal and noise power in the [-1, 1] pixel space, pooled over
    400 real images) matches the requested SNR."""
    x = to_model_pixels(setup["images"])
    assert len(x) == 400
    z = image_noise(x.shape[1:], 0, range(len(x)))
    gen = torch.Generator().manual_seed(3)
    for snr in SNRS_DB:
        for noisy in (add_noise(x, snr, noise=z), add_noise(x, snr, generator=gen)):
            assert noisy.dtype == torch.float32 and noisy.shape == x.shape
            noise = noisy - x
            # Independent re-computation: 10 log10(P_signal / P_noise), means over all values.
            measured = 10 * math.log10(float(x.double().pow(2).mean()) / float(noise.double().pow(2).mean()))
            assert abs(measured - snr) < 0.5, (snr, measured)
            assert measured_snr_db(x, noisy) == pytest.approx(measured, abs=1e-6)
            # Per image too (2352 values each): the median image is within 0.5 dB.
            per = 10 * torch.log10(x.double().pow(2).flatten(1).mean(1) / noise.double().pow(2).flatten(1).mean(1))
            assert abs(float(per.median()) - snr) < 0.5, (snr, float(per.median()))
            # Zero-mean noise, not clamped (at low SNR values leave [-1, 1]).
            assert abs(float(noise.mean())) < 0.05 * float(noise.std())
        if snr <= 1:
            assert float(noisy.abs().max()) > 1.0
    with pytest.raises(TypeError):
        add_noise(setup["images"][:2], 10)
