"""VQGAN (pipeline/models/vqgan.py): taming/MAGE state-dict compatibility, checked against an
independent functional forward pass written here from the state dict alone."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.vqgan import VQGAN, VQGANConfig, preset
from pipeline.vqgan_loading import load_taming_checkpoint

SMALL = dict(embed_dim=32, n_embed=64, ch=32, ch_mult=(1, 2), num_res_blocks=1,
             attn_resolutions=(16,), resolution=32, z_channels=32)


# ------------------------------------------------------------------ expected taming key names

def _res_keys(p, c_in, c_out, maskgit):
    keys = [f"{p}.norm1.weight", f"{p}.norm1.bias", f"{p}.conv1.weight",
            f"{p}.norm2.weight", f"{p}.norm2.bias", f"{p}.conv2.weight"]
    if not maskgit:
        keys += [f"{p}.conv1.bias", f"{p}.conv2.bias"]
    if c_in != c_out:
        keys += [f"{p}.nin_shortcut.weight"] + ([] if maskgit else [f"{p}.nin_shortcut.bias"])
    return keys


def _attn_keys(p):
    return [f"{p}.{n}.{t}" for n in ("norm", "q", "k", "v", "proj_out") for t in ("weight", "bias")]


def expected_keys(c: VQGANConfig) -> set[str]:
    mg = c.variant == "maskgit"
    keys = ["encoder.conv_in.weight"] + ([] if mg else ["encoder.conv_in.bias"])
    res, ch_in = c.resolution, c.ch
    for i, m in enumerate(c.ch_mult):
        for j in range(c.num_res_blocks):
            keys += _res_keys(f"encoder.down.{i}.block.{j}", ch_in, c.ch * m, mg)
            ch_in = c.ch * m
            if not mg and res in c.attn_resolutions:
                keys += _attn_keys(f"encoder.down.{i}.attn.{j}")
        if i != len(c.ch_mult) - 1:
            if not mg:
                keys += [f"encoder.down.{i}.downsample.conv.weight", f"encoder.down.{i}.downsample.conv.bias"]
            res //= 2
    for part in ("encoder", "decoder"):
        keys += _res_keys(f"{part}.mid.block_1", 1, 1, mg) + _res_keys(f"{part}.mid.block_2", 1, 1, mg)
        if not mg:
            keys += _attn_keys(f"{part}.mid.attn_1")
        keys += [f"{part}.norm_out.weight", f"{part}.norm_out.bias",
                 f"{part}.conv_out.weight", f"{part}.conv_out.bias"]
    keys += ["decoder.conv_in.weight", "decoder.conv_in.bias"]
    ch_in = c.ch * c.ch_mult[-1]
    for i in reversed(range(len(c.ch_mult))):
        for j in range(c.num_res_blocks + (0 if mg else 1)):
            keys += _res_keys(f"decoder.up.{i}.block.{j}", ch_in, c.ch * c.ch_mult[i], mg)
            ch_in = c.ch * c.ch_mult[i]
            if not mg and res in c.attn_resolutions:
                keys += _attn_keys(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            keys += [f"decoder.up.{i}.upsample.conv.weight", f"decoder.up.{i}.upsample.conv.bias"]
            res *= 2
    keys += ["quantize.embedding.weight"]
    if not mg:
        keys += ["quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"]
    return set(keys)


# ------------------------------------------------------------------ independent functional model

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, stride=1):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd.get(p + ".bias"), stride=stride,
                    padding=0 if stride == 2 else w.shape[-1] // 2)


def _res(sd, p, x, mg):
    h = _conv(sd, p + ".conv1", F.silu(_gn(sd, p + ".norm1", x)))
    h = _conv(sd, p + ".conv2", F.silu(_gn(sd, p + ".norm2", h)))
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", h if mg else x)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, p + ".norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, -1) for n in "qkv")
    a = torch.einsum("bci,bcj->bij", q, k) / c ** 0.5
    out = torch.einsum("bij,bcj->bci", a.softmax(-1), v).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out)


def _stage(sd, p, x, mg):
    j = 0
    while f"{p}.block.{j}.conv1.weight" in sd:
        x = _res(sd, f"{p}.block.{j}", x, mg)
        if f"{p}.attn.{j}.q.weight" in sd:
            x = _attn(sd, f"{p}.attn.{j}", x)
        j += 1
    return x


def _mid(sd, p, x, mg):
    x = _res(sd, p + ".block_1", x, mg)
    if p + ".attn_1.q.weight" in sd:
        x = _attn(sd, p + ".attn_1", x)
    return _res(sd, p + ".block_2", x, mg)


def reference(sd, x, n_levels, mg):
    """x in [-1,1] -> (indices, reconstruction in [-1,1]) from the raw state dict."""
    h = _conv(sd, "encoder.conv_in", (x + 1) / 2 if mg else x)
    for i in range(n_levels):
        h = _stage(sd, f"encoder.down.{i}", h, mg)
        if i != n_levels - 1:
            h = F.avg_pool2d(h, 2) if mg else _conv(sd, f"encoder.down.{i}.downsample.conv",
                                                    F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _mid(sd, "encoder.mid", h, mg)
    z = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)))
    if not mg:
        z = _conv(sd, "quant_conv", z)
    e = sd["quantize.embedding.weight"]
    zf = z.permute(0, 2, 3, 1)
    idx = ((zf[..., None, :] - e) ** 2).sum(-1).argmin(-1)            # (B,h,w)
    h = e[idx].permute(0, 3, 1, 2)
    if not mg:
        h = _conv(sd, "post_quant_conv", h)
    h = _mid(sd, "decoder.mid", _conv(sd, "decoder.conv_in", h), mg)
    for i in reversed(range(n_levels)):
        h = _stage(sd, f"decoder.up.{i}", h, mg)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    y = _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)))
    return idx, (y * 2 - 1 if mg else y)


def random_taming_sd(cfg: VQGANConfig, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in VQGAN(cfg).state_dict().items():
        if k.endswith("norm.weight") or ".norm" in k and k.endswith(".weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k == "quantize.embedding.weight":
            sd[k] = torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel() if v.dim() > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) / fan_in ** 0.5 * (1.0 if v.dim() > 1 else 0.1)
    return sd


def save_ckpt(path, sd):
    junk = {"loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(2)}
    torch.save({"state_dict": {**sd, **junk}, "global_step": 7}, path)


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("variant", ["taming", "maskgit"])
def test_loaded_checkpoint_matches_functional_reference(tmp_path, variant):
    torch.manual_seed(0)
    cfg = VQGANConfig(**SMALL, variant=variant)
    sd = random_taming_sd(cfg)
    assert set(sd) == expected_keys(cfg)
    path = tmp_path / "vq.ckpt"
    save_ckpt(path, sd)
    model = load_taming_checkpoint(path, cfg)
    assert not model.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_idx, ref_img = reference(sd, x, len(cfg.ch_mult), variant == "maskgit")
        z_q, idx = model.encode(x)
        img = model.decode_indices(idx)
        recon, loss, idx2 = model(x)
    assert idx.dtype == torch.long and idx.shape == (2, 16, 16)
    assert len(idx.unique()) > 4  # the quantizer is not degenerate
    assert torch.equal(idx, ref_idx) and torch.equal(idx2, ref_idx)
    assert z_q.shape == (2, 32, 16, 16)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, ref_img, atol=1e-5, rtol=1e-5)
    assert loss.ndim == 0 and loss > 0
    # flat (B, h*w) ids decode to the same images
    torch.testing.assert_close(model.decode_indices(idx.flatten(1)), img, atol=0, rtol=0)


@pytest.mark.parametrize("name, n_keys, params_m", [("taming_f16_1024", 343, (65, 80)),
                                                    ("mage_vqgan", 168, (45, 65))])
def test_big_presets_key_set_on_meta(name, n_keys, params_m):
    cfg = preset(name)
    assert (cfg.n_embed, cfg.embed_dim, cfg.ch, cfg.ch_mult, cfg.resolution) == (1024, 256, 128, (1, 1, 2, 2, 4), 256)
    with torch.device("meta"):
        model = VQGAN(cfg)
    keys = set(model.state_dict())
    assert keys == expected_keys(cfg)
    assert len(keys) == n_keys
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert params_m[0] < n < params_m[1], n
    assert model.grid_size == 16 and model.codebook_size == 1024
    if name == "mage_vqgan":  # MaskGIT-converted: no attention, no quant convs, bias-free res convs
        assert not any(".attn" in k or "quant_conv" in k or "downsample" in k for k in keys)


def test_tiny_preset_28_to_7():
    model = VQGAN(preset("tiny"))
    assert model.grid_size == 7
    x = torch.rand(3, 3, 28, 28) * 2 - 1
    recon, loss, idx = model(x)
    assert idx.shape == (3, 7, 7) and recon.shape == x.shape
    assert int(idx.max()) < model.codebook_size


def test_straight_through_gradients_reach_encoder():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**SMALL))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, loss, _ = model(x)
    # reconstruction term alone must reach the encoder (straight-through), not only the VQ loss
    recon.pow(2).mean().backward()
    g = model.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0
    model.zero_grad()
    _, loss, _ = model(x)
    loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_loader_errors(tmp_path):
    cfg = VQGANConfig(**SMALL)
    sd = random_taming_sd(cfg)

    with pytest.raises(FileNotFoundError, match="nothing is downloaded") as ei:
        load_taming_checkpoint(tmp_path / "absent.ckpt", cfg)
    assert "absent.ckpt" in str(ei.value)

    good = tmp_path / "good.ckpt"
    save_ckpt(good, sd)
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="trunc.ckpt"):
        load_taming_checkpoint(trunc, cfg)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_taming_checkpoint(garbage, cfg)

    renamed = dict(sd)
    renamed["encoder.conv_inn.weight"] = renamed.pop("encoder.conv_in.weight")
    torch.save(renamed, tmp_path / "renamed.pth")  # bare state dict form
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight.*encoder\.conv_inn\.weight"):
        load_taming_checkpoint(tmp_path / "renamed.pth", cfg)

    reshaped = dict(sd)
    reshaped["quantize.embedding.weight"] = torch.randn(65, 32)
    torch.save({"state_dict": reshaped}, tmp_path / "reshaped.ckpt")
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight \(65, 32\)"):
        load_taming_checkpoint(tmp_path / "reshaped.ckpt", cfg)

    # a taming checkpoint loaded with the MAGE (maskgit) config names the extra keys
    with pytest.raises(ValueError, match=r"unexpected keys.*attn_1.*variant='taming'"):
        load_taming_checkpoint(good, VQGANConfig(**SMALL, variant="maskgit"))

    # bare state dict form loads
    torch.save(sd, tmp_path / "bare.pth")
    assert load_taming_checkpoint(tmp_path / "bare.pth", cfg).codebook_size == 64


def test_decode_indices_rejects_out_of_range():
    model = VQGAN(VQGANConfig(**SMALL))
    with pytest.raises(ValueError, match="token ids"):
        model.decode_indices(torch.full((1, 16, 16), 64))
