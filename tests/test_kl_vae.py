"""KL autoencoder (MAR's LDM AutoencoderKL, `models.kl_vae`) and its checkpoint loader."""
from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.models.kl_vae import load_kl_vae
from pipeline.models.kl_vae import (MAR_LATENT_SCALE, KLAutoencoder, assign_kl_state,
                                    kl_state_problems, preset)

# Checked against LTH14/mar models/vae.py, AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)):
# same 312 keys and shapes, same parameter count, bit-identical encode/decode with shared weights.
KL16_KEYS = 312
KL16_PARAMS = 66_456_019
KL16_KEY_SHAPES_SHA256 = "ce7b23e0731a646558a63ec8c67e341b765217b4b09c20248f52b41b9eb7890c"


@pytest.fixture(scope="module")
def kl16():
    torch.manual_seed(0)
    return KLAutoencoder(preset("kl16")).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return KLAutoencoder(preset("tiny")).eval()


def _key_shapes(model) -> str:
    return "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())


def test_kl16_keys_and_parameter_count(kl16):
    sd = kl16.state_dict()
    assert len(sd) == KL16_KEYS
    assert sum(p.numel() for p in kl16.parameters()) == KL16_PARAMS
    assert hashlib.sha256(_key_shapes(kl16).encode()).hexdigest() == KL16_KEY_SHAPES_SHA256
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)      # double_z: 2 x 16
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1)
    assert shapes["post_quant_conv.weight"] == (16, 16, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)  # attention at 16 px
    assert shapes["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert "encoder.down.4.downsample.conv.weight" not in shapes
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)  # num_res_blocks + 1
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert not [k for k in shapes if k.startswith("decoder.up.") and ".attn." in k]  # MAR: none
    assert not [k for k in shapes if "temb" in k or k.startswith("loss.")]
    assert MAR_LATENT_SCALE == 0.2325


def test_kl16_latent_grid_at_256(kl16):
    with torch.no_grad():
        mean, logvar = kl16.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert mean.shape == logvar.shape == (1, 16, 16, 16)
    assert kl16.grid_size == 16 and kl16.latent_channels == 16
    assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0


def test_tiny_shapes_and_round_trip(tiny):
    cfg = tiny.config
    x = torch.rand(3, 3, cfg.resolution, cfg.resolution) * 2 - 1
    with torch.no_grad():
        mean, logvar = tiny.encode(x)
        assert mean.shape == logvar.shape == (3, cfg.embed_dim, tiny.grid_size, tiny.grid_size)
        assert tiny.grid_size == 7
        assert tiny.decode(mean).shape == x.shape
        recon, m2, lv2 = tiny(x, sample_posterior=False)
    assert recon.shape == x.shape
    assert torch.equal(m2, mean) and torch.equal(lv2, logvar)
    assert torch.allclose(recon, tiny.decode(mean))


def test_logvar_is_clamped(tiny):
    with torch.no_grad():
        tiny_copy = KLAutoencoder(tiny.config)
        tiny_copy.load_state_dict(tiny.state_dict())
        c = tiny.config.embed_dim
        tiny_copy.quant_conv.bias[c:] = 1000.0
        _, logvar = tiny_copy.encode(torch.zeros(1, 3, 28, 28))
    assert torch.all(logvar == 20.0)


def test_sample_latent_deterministic_and_statistics(tiny):
    with torch.no_grad():
        mean, logvar = tiny.encode(torch.rand(1, 3, 28, 28) * 2 - 1)
    logvar = logvar.clamp(-4, 2) + torch.linspace(-1, 1, logvar.numel()).reshape(logvar.shape)
    a = KLAutoencoder.sample_latent(mean, logvar, torch.Generator().manual_seed(7))
    b = KLAutoencoder.sample_latent(mean, logvar, torch.Generator().manual_seed(7))
    c = KLAutoencoder.sample_latent(mean, logvar, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = 4000
    draws = KLAutoencoder.sample_latent(mean.expand(n, -1, -1, -1), logvar.expand(n, -1, -1, -1),
                                        torch.Generator().manual_seed(0))
    std = torch.exp(0.5 * logvar[0])
    z = (draws.mean(0) - mean[0]) / (std / n ** 0.5)          # ~ N(0, 1) per latent
    assert float(z.abs().max()) < 5.0 and abs(float(z.mean())) < 0.3
    ratio = draws.std(0) / std                                 # ~ 1 +- 1/sqrt(2n)
    assert float((ratio - 1).abs().max()) < 0.06


def test_kl16_file_round_trip(kl16, tmp_path):
    path = tmp_path / "kl16.ckpt"
    sd = kl16.state_dict()
    loss = {"loss.discriminator.main.0.weight": torch.zeros(2)}  # LDM training keys are dropped
    torch.save({"model": {**sd, **loss}}, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_kl_vae(path)
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1  # fully convolutional: a small image is enough here
    with torch.no_grad():
        a, b = kl16.encode(x), loaded.encode(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(kl16.decode(a[0]), loaded.decode(b[0]))


def _tiny_file(tiny, tmp_path, edit):
    sd = dict(tiny.state_dict())
    edit(sd)
    path = tmp_path / "tiny.ckpt"
    torch.save({"model": sd}, path)
    return path


def test_renamed_key_is_named(tiny, tmp_path):
    def rename(sd):
        sd["decoder.mid.attn_1.query.weight"] = sd.pop("decoder.mid.attn_1.q.weight")
    path = _tiny_file(tiny, tmp_path, rename)
    with pytest.raises(ValueError) as e:
        load_kl_vae(path, preset="tiny")
    assert str(e.value) == (f"KL-VAE checkpoint {path} (preset 'tiny') does not match the KL "
                            f"autoencoder: missing keys: decoder.mid.attn_1.q.weight | "
                            f"unexpected keys: decoder.mid.attn_1.query.weight")


def test_missing_key_and_wrong_shape_are_named(tiny, tmp_path):
    path = _tiny_file(tiny, tmp_path, lambda sd: sd.pop("post_quant_conv.bias"))
    with pytest.raises(ValueError) as e:
        load_kl_vae(path, preset="tiny")
    assert str(e.value) == (f"KL-VAE checkpoint {path} (preset 'tiny') does not match the KL "
                            f"autoencoder: missing keys: post_quant_conv.bias")

    def reshape(sd):
        sd["quant_conv.weight"] = torch.zeros(4, 8, 1, 1)
    path = _tiny_file(tiny, tmp_path, reshape)
    with pytest.raises(ValueError) as e:
        load_kl_vae(path, preset="tiny")
    assert str(e.value) == (f"KL-VAE checkpoint {path} (preset 'tiny') does not match the KL "
                            f"autoencoder: wrong shapes: quant_conv.weight (4, 8, 1, 1) "
                            f"(expected (8, 8, 1, 1))")


def test_wrong_preset_and_bad_files(tiny, tmp_path):
    path = _tiny_file(tiny, tmp_path, lambda sd: None)
    with pytest.raises(ValueError, match=r"KL-VAE checkpoint .*tiny\.ckpt \(preset 'kl16'\).*wrong shapes"):
        load_kl_vae(path)  # the kl16 preset
    assert load_kl_vae(path, preset="tiny").grid_size == 7
    lst = tmp_path / "list.ckpt"
    torch.save([1, 2], lst)
    with pytest.raises(ValueError, match=r"holds list, not a state dict"):
        load_kl_vae(lst, preset="tiny")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_kl_vae(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="unknown KL-VAE preset"):
        load_kl_vae(path, preset="kl8")


def test_assign_in_memory(tiny):
    sd = tiny.state_dict()
    assert kl_state_problems(tiny, sd) == []
    other = assign_kl_state(KLAutoencoder(tiny.config), sd)
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match=r"^KL autoencoder state dict does not match the KL "
                                         r"autoencoder: unexpected keys: extra$"):
        assign_kl_state(KLAutoencoder(tiny.config), {**sd, "extra": torch.zeros(1)})
