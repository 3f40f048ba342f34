"""The frozen encoder must compute exactly what the official DINOv2/DiGIT code computes.

The reference below is written from the official state dict with plain torch ops (no timm), after
dinov2/models/vision_transformer.py with DiGIT's settings: patch conv, cls token, position
embedding interpolated at run time (bicubic, scale_factor=(16+0.1)/37, no antialias), registers
inserted after the position embedding, pre-norm blocks with LayerScale, stop after the chosen
block, final norm, drop prefix. (Checked once, outside this suite, to equal the official
DinoVisionTransformer.get_intermediate_layers bit for bit.)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.encoder_fixtures import build_random_dinov2, save_hf_checkpoint, save_official_checkpoint
from pipeline.encoder_layouts import (expected_official_shapes, hf_to_official_state_dict, official_to_hf_state_dict,
                                      official_to_timm_state_dict, timm_to_official_state_dict)
from pipeline.encoder_loading import load_encoder, load_timm_encoder_file, save_timm_encoder
from pipeline.io import file_sha256
from pipeline.models.patch_encoder import (dinov2_spec, encoder_info, interpolate_patch_pos_embed,
                                           resolve_block_index)

IMG = 224


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


class Cache:
    """Weights, official files and features built once per module (keeps the file fast)."""

    def __init__(self, root):
        self.root, self._sd, self._path, self._feat, self._enc = root, {}, {}, {}, {}

    def sd(self, arch):
        if arch not in self._sd:
            self._sd[arch] = build_random_dinov2(arch, seed=7)
        return self._sd[arch]

    def path(self, arch):
        if arch not in self._path:
            self._path[arch] = save_official_checkpoint(self.sd(arch), self.root / f"{arch}_pretrain.pth")
        return self._path[arch]

    def remember(self, arch, layer, features):
        self._feat[arch, layer] = features

    def same_weights_as_official(self, enc, arch):
        """True when `enc` holds exactly the tensors loading the official file gives."""
        if arch not in self._enc:
            self._enc[arch] = load_encoder(arch, self.path(arch), compute_sha256=False)
        want, got = self._enc[arch].state_dict(), enc.state_dict()
        return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    def features(self, arch, images, layer=3):
        """Features through the official-layout file (checked against the reference below)."""
        if (arch, layer) not in self._feat:
            with torch.no_grad():
                self._feat[arch, layer] = load_encoder(arch, self.path(arch), layer=layer)(images)
        return self._feat[arch, layer]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(tmp_path_factory.mktemp("weights"))


def reference_features(sd, x, block_index, num_heads, patch=14, offset=0.1):
    """Official DINOv2 forward up to `block_index`, final norm, patch tokens only."""
    B, _, H, W = x.shape
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1)

    pos = sd["pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((H // patch + offset) / M, (W // patch + offset) / M),
        mode="bicubic",
        antialias=False,
    )
    assert grid.shape[-2:] == (h, w)
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)
    t = t + pos

    n_reg = 0
    if "register_tokens" in sd:
        n_reg = sd["register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], dim=1)

    def ln(v, name):
        return F.layer_norm(v, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def lin(v, name):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    hd = dim // num_heads
    for i in range(block_index + 1):
        b = f"blocks.{i}"
        y = ln(t, f"{b}.norm1")
        q, k, v = lin(y, f"{b}.attn.qkv").reshape(B, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, -1, dim)
        t = t + sd[f"{b}.ls1.gamma"] * lin(o, f"{b}.attn.proj")
        y = ln(t, f"{b}.norm2")
        m = lin(F.gelu(lin(y, f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        t = t + sd[f"{b}.ls2.gamma"] * m
    return ln(t, "norm")[:, 1 + n_reg:]


# ----------------------------------------------------------------------------- layer choice


def test_resolve_block_index():
    assert resolve_block_index(3, 12) == 9
    assert resolve_block_index(3, 24) == 21
    assert resolve_block_index(1, 12) == 11
    assert resolve_block_index(12, 12) == 0
    assert resolve_block_index("3", 12) == 9
    assert resolve_block_index("block:5", 12) == 5
    assert resolve_block_index("block:0", 12) == 0
    for bad in (0, -1, 13, "block:12", "block:-1", "block:x", "last", 2.0, True, None):
        with pytest.raises(ValueError):
            resolve_block_index(bad, 12)


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize(
    "arch,layer,block",
    [
        ("dinov2_vits14_reg4", 3, 9),  # registers, DiGIT's layer choice
        ("dinov2_vits14", 3, 9),  # no registers
        ("dinov2_vits14_reg4", "block:4", 4),  # explicit index
        ("dinov2_vitb14_reg4", 3, 9),  # DiGIT-base's encoder
    ],
)
def test_official_checkpoint_matches_reference(cache, images, arch, layer, block):
    path = cache.path(arch)
    assert torch.load(path, weights_only=True)["pos_embed"].shape[1] == 1 + 37 * 37

    enc = load_encoder(arch, path, layer=layer, img_size=IMG)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen: stays in eval mode
    assert len(enc.vit.blocks) == block + 1  # later blocks are not even built
    info = encoder_info(enc)
    assert info["block_index"] == block and info["depth"] == 12 and info["grid"] == [16, 16]
    assert info["checkpoint_format"] == "official"
    assert info["num_prefix_tokens"] == 1 + dinov2_spec(arch).num_registers
    assert info["weights_sha256"] == file_sha256(path)

    with torch.no_grad():
        got = enc(images)
        want = reference_features(cache.sd(arch), images, block, dinov2_spec(arch).num_heads)
    assert got.shape == (2, 256, dinov2_spec(arch).embed_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    cache.remember(arch, layer, got)  # reused as the expected features of the layout tests


def test_only_blocks_up_to_the_chosen_one_run(cache, images):
    arch = "dinov2_vits14_reg4"
    enc = load_encoder(arch, cache.path(arch), layer="block:9", compute_sha256=False)
    ran = []
    for i, blk in enumerate(enc.vit.blocks):
        blk.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        got = enc(images)
    assert ran == list(range(10))
    # "block:9" is DiGIT's layer 3 on a 12-block model; another layer gives other features
    torch.testing.assert_close(got, cache.features(arch, images), atol=0, rtol=0)
    assert (cache.features(arch, images, layer="block:4") - got).abs().max() > 1e-2


def test_timm_default_resampling_differs_from_official():
    """Why we interpolate ourselves: timm's resample (size=, antialias; also what the DINOv2
    torch.hub `_reg` constructors use) is not the math of DiGIT's encoder."""
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 37 * 37, 64, generator=torch.Generator().manual_seed(0))
    ours = interpolate_patch_pos_embed(pos, (16, 16))
    timm_aa = resample_abs_pos_embed(pos, new_size=(16, 16), num_prefix_tokens=0, antialias=True)
    timm_size = resample_abs_pos_embed(pos, new_size=(16, 16), num_prefix_tokens=0, antialias=False)
    assert ours.shape == timm_aa.shape == (1, 256, 64)
    assert (ours - timm_aa).abs().max() > 0.1
    assert (ours - timm_size).abs().max() > 1e-2  # even without antialias: size= vs scale_factor
    # unchanged grid is passed through, as in the official early return
    torch.testing.assert_close(interpolate_patch_pos_embed(pos, (37, 37)), pos, atol=0, rtol=0)


# ----------------------------------------------------------------------------- other layouts


def test_timm_and_hf_layouts_give_the_same_features(tmp_path, cache, images):
    from safetensors.torch import save_file

    arch = "dinov2_vits14_reg4"
    sd = cache.sd(arch)
    timm_sd = official_to_timm_state_dict(sd, arch)  # timm publishes the 37x37 grid too
    assert "reg_token" in timm_sd and timm_sd["pos_embed"].shape == (1, 37 * 37, 384)
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(tmp_path / "timm.safetensors"))
    (tmp_path / "timm_dir").mkdir()
    torch.save(timm_sd, tmp_path / "timm_dir" / "pytorch_model.bin")
    hf_dir = save_hf_checkpoint(sd, tmp_path / "hf", arch)
    assert "embeddings.register_tokens" in official_to_hf_state_dict(sd)

    for source, layout in [
        (tmp_path / "timm.safetensors", "timm"),
        (tmp_path / "timm_dir", "timm"),
        (hf_dir, "hf"),
    ]:
        enc = load_encoder(arch, source)
        assert enc.info.checkpoint_format == layout
        assert cache.same_weights_as_official(enc, arch), source  # identical model, identical features
    with torch.no_grad():
        torch.testing.assert_close(enc(images), cache.features(arch, images), atol=0, rtol=0)


def test_hf_round_trip_without_registers(cache):
    sd = cache.sd("dinov2_vits14")
    back = hf_to_official_state_dict(official_to_hf_state_dict(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_save_official_from_a_timm_model(tmp_path, cache):
    """A timm model (img_size=518) written in the official layout loads to the same encoder."""
    import timm

    arch = "dinov2_vits14_reg4"
    with torch.device("meta"):  # skip timm's random init; the weights are assigned below
        model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=518, num_classes=0)
    model.load_state_dict(official_to_timm_state_dict(cache.sd(arch), arch), assign=True)
    path = save_official_checkpoint(model, tmp_path / "from_timm.pth")
    written = torch.load(path, weights_only=True)
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token"} <= written.keys()
    assert written["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert cache.same_weights_as_official(load_encoder(arch, path), arch)


def test_generic_timm_encoder_round_trip(tmp_path):
    """Our own format for a small timm ViT (what the tiny CPU demo trains and saves)."""
    import timm

    kwargs = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, img_size=32, reg_tokens=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    path = save_timm_encoder(
        tmp_path / "tiny.pt", "vit_tiny_patch16_224", kwargs, vit.state_dict(), extra_meta={"run": "t"}
    )
    assert load_timm_encoder_file(path)["meta"] == {"run": "t"}

    enc = load_encoder("timm:vit_tiny_patch16_224", path, layer=2, img_size=32)
    assert len(enc.vit.blocks) == 3 and enc.info.block_index == 2 and enc.info.depth == 4
    assert enc.info.num_prefix_tokens == 3 and enc.info.grid == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[:3]:
            t = blk(t)
        want = vit.norm(t)[:, 3:]
        torch.testing.assert_close(enc(x), want, atol=1e-6, rtol=0)
        # another image size resamples the stored grid with the official interpolation
        assert load_encoder("timm:vit_tiny_patch16_224", path, layer=1, img_size=48)(
            torch.randn(1, 3, 48, 48)
        ).shape == (1, 36, 64)
    with pytest.raises(ValueError, match="timm:vit_small"):
        load_encoder("timm:vit_small_patch16_224", path)


def test_random_weights_are_seeded():
    a, b, c = (load_encoder("dinov2_vits14", None, layer="block:0", seed=s) for s in (3, 3, 4))
    assert a.info.weights_sha256 is None and a.info.checkpoint_format == "random"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vit.blocks.0.attn.qkv.weight"], sc["vit.blocks.0.attn.qkv.weight"])


# ----------------------------------------------------------------------------- errors


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope" / "dinov2_vitb14_reg4_pretrain.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_encoder("dinov2_vitb14_reg4", path)
    msg = str(err.value)
    assert str(path) in msg and "never downloads" in msg
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in msg
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_encoder("dinov2_vitb14_reg4", tmp_path)  # a directory without weights


def test_wrong_keys_and_shapes(tmp_path, cache):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="foo.weight"):
        load_encoder("dinov2_vits14", tmp_path / "junk.pth")

    sd = dict(cache.sd("dinov2_vits14_reg4"))
    del sd["blocks.3.attn.qkv.weight"]
    sd["blocks.0.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as err:
        load_encoder("dinov2_vits14_reg4", tmp_path / "broken.pth")
    assert "blocks.3.attn.qkv.weight" in str(err.value) and "blocks.0.extra" in str(err.value)

    # a ViT-S checkpoint loaded as ViT-B: shapes named
    with pytest.raises(ValueError, match=r"cls_token \(1, 1, 384\) \(expected \(1, 1, 768\)\)"):
        load_encoder("dinov2_vitb14_reg4", cache.path("dinov2_vits14_reg4"))
    # registers expected but absent
    with pytest.raises(ValueError, match="missing keys: register_tokens"):
        load_encoder("dinov2_vits14_reg4", cache.path("dinov2_vits14"))


def test_bad_arch_and_input():
    with pytest.raises(ValueError, match="dinov2_vitb14_reg4"):
        load_encoder("dinov3_vitb16", None)
    enc = load_encoder("timm:vit_tiny_patch16_224", None, layer=1, img_size=32)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_encoder("dinov2_vits14", None, img_size=100)


def test_giant_swiglu_names_convert():
    """ViT-g (SwiGLU FFN): official w12/w3 <-> timm fc1/fc2 <-> HF weights_in/weights_out."""
    spec = dinov2_spec("dinov2_vitg14")
    shapes = expected_official_shapes(spec)
    assert shapes["blocks.0.mlp.w12.weight"] == (8192, 1536)
    assert shapes["blocks.0.mlp.w3.weight"] == (1536, 4096)
    sd = {"blocks.0.mlp.w12.weight": torch.zeros(1), "blocks.0.mlp.w3.bias": torch.zeros(1),
          "cls_token": torch.zeros(1, 1, 2), "pos_embed": torch.zeros(1, 5, 2)}
    timm_sd = official_to_timm_state_dict(sd, "dinov2_vitg14")
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"} <= timm_sd.keys()
    back = timm_to_official_state_dict(timm_sd, "dinov2_vitg14")
    assert {"blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias"} <= back.keys()
    hf = official_to_hf_state_dict({k: v for k, v in sd.items() if k.startswith("blocks")})
    assert set(hf) == {"encoder.layer.0.mlp.weights_in.weight", "encoder.layer.0.mlp.weights_out.bias"}
