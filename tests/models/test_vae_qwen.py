"""Qwen-Image VAE (native 2D) against diffusers 0.42.1 AutoencoderKLQwenImage (3D).

Every weight of the oracle is randomised (RMS-norm gammas, biases, the zero-initialised
projections), the same tensors are loaded into krea2kit from a file, and fp32 outputs are
compared. Measured on this machine (torch 2.13 CPU, 1-2 threads): encode <= 1.0e-6,
decode <= 1.8e-6 max abs error; the tests allow 1e-5.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from krea2kit.errors import WeightsError
from krea2kit.models.contract import LatentContract
from krea2kit.models.vae_qwen import (
    QWEN_LATENTS_MEAN,
    QWEN_LATENTS_STD,
    QwenImageVAE,
    QwenVAEConfig,
    load_qwen_vae,
    wan_to_diffusers_key,
)
from support.presets import QWEN_VAES
from support.random_models import random_qwen_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage  # noqa: E402

TOL = 1e-5




def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: gammas around 1, weights ~ 1/sqrt(fan_in), biases ~ 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / (p[0].numel() ** 0.5))


def _oracle(preset: str, seed: int = 0) -> tuple[QwenVAEConfig, AutoencoderKLQwenImage]:
    cfg = QWEN_VAES[preset]
    ref = AutoencoderKLQwenImage(**cfg.to_diffusers_kwargs()).eval()
    _randomise(ref, seed)
    return cfg, ref


def _save_diffusers_folder(ref: AutoencoderKLQwenImage, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage", **dict(ref.config)}))


def diffusers_to_wan_key(key: str, num_res_blocks: int) -> str:
    """Inverse of the Wan -> diffusers rename, written independently for the test."""
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv."):]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv."):]
    k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    k = k.replace("mid_block.resnets.0.", "middle.0.").replace("mid_block.attentions.0.", "middle.1.")
    k = k.replace("mid_block.resnets.1.", "middle.2.")
    k = k.replace("norm_out.", "head.0.").replace("conv_out.", "head.2.")
    k = k.replace("down_blocks.", "downsamples.")
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", k)
    if m:
        level = int(m.group(1))
        r = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
        k = f"decoder.upsamples.{level * (num_res_blocks + 2) + r}.{m.group(4)}"
    for new, old in (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                     ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")):
        k = re.sub(rf"(\.\d+\.){re.escape(old)}", rf"\g<1>{new}", k)  # only inside numbered blocks
    return k


@pytest.fixture(scope="module", params=["tiny", "tiny-2res"])
def pair(request, tmp_path_factory):
    cfg, ref = _oracle(request.param, seed=1)
    folder = tmp_path_factory.mktemp(request.param) / "vae"
    _save_diffusers_folder(ref, folder)
    vae = load_qwen_vae(folder)
    return cfg, ref, vae, folder


def test_config_presets():
    q = QwenVAEConfig.preset("qwen-image")
    assert (q.base_dim, q.z_dim, q.dim_mult, q.num_res_blocks, q.attn_scales) == (96, 16, (1, 2, 4, 4), 2, ())
    assert q.temperal_downsample == (False, True, True) and q.factor == 8
    assert q.latents_mean == QWEN_LATENTS_MEAN and q.latents_std == QWEN_LATENTS_STD
    with pytest.raises(ValueError, match="qwen-image"):
        QwenVAEConfig.preset("nope")
    with pytest.raises(ValueError):
        QwenVAEConfig(z_dim=4)  # statistics of the wrong length


def test_official_config_matches_diffusers_defaults():
    import inspect

    params = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    q = QwenVAEConfig.preset("qwen-image")
    for name, want in q.to_diffusers_kwargs().items():
        got = params[name].default
        assert list(got) == want if isinstance(want, list) else got == want, name


def test_contract_and_param_count():
    with torch.device("meta"):
        vae = QwenImageVAE(QwenVAEConfig.preset("qwen-image"))
    assert vae.contract == LatentContract(channels=16, factor=8, patch=1, normalization="mean-std")
    # 126,892,531 params in diffusers minus 2,324,544 unused time_conv params, with the
    # 3x3x3 kernels folded to 3x3 (44.6 M effective).
    n = sum(p.numel() for p in vae.parameters())
    assert 44_000_000 < n < 45_000_000


def test_flops_well_under_half_of_the_3d_formulation():
    """Full official config on the meta device (no compute): FLOPs of one 256^2 image."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        ours = QwenImageVAE(QwenVAEConfig.preset("qwen-image"))
        ref = AutoencoderKLQwenImage()
    z = torch.zeros(1, 16, 32, 32, device="meta")
    x = torch.zeros(1, 3, 256, 256, device="meta")

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    dec = flops(lambda: ours.decode_raw(z)) / flops(lambda: ref.decode(z[:, :, None]))
    enc = flops(lambda: ours.encode_raw(x)) / flops(lambda: ref.encode(x[:, :, None]))
    assert dec < 0.42 and enc < 0.40, (dec, enc)  # measured 0.383 (decode), 0.352 (encode)


def test_encode_matches_diffusers(pair):
    cfg, ref, vae, _ = pair
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
    got = vae.encode_raw(x)
    assert got.shape == (2, cfg.z_dim, 6, 8)
    err = (got - want).abs().max().item()
    assert err <= TOL, err  # measured <= 1.0e-6
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
    assert (vae.encode(x) - (want - mean) / std).abs().max().item() <= TOL


def test_decode_matches_diffusers(pair):
    cfg, ref, vae, _ = pair
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, cfg.z_dim, 5, 7, generator=g)
    with torch.no_grad():
        want = ref.decode(lat[:, :, None]).sample[:, :, 0]
    got = vae.decode_raw(lat)
    assert got.shape == (2, 3, 40, 56)
    assert (want.abs() < 0.999).float().mean() > 0.5  # the comparison is not all clamp
    err = (got - want).abs().max().item()
    assert err <= TOL, err  # measured <= 1.8e-6
    # Normalised decode = official Krea: z * std + mean, then the VAE.
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want_n = ref.decode(lat[:, :, None] * std + mean).sample[:, :, 0]
    assert (vae.decode(lat) - want_n).abs().max().item() <= TOL


def test_bf16_close_to_diffusers_bf16(pair):
    cfg, ref, _, folder = pair
    vae = load_qwen_vae(folder, dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(4)
    lat = torch.randn(1, cfg.z_dim, 4, 6, generator=g)
    ref16 = AutoencoderKLQwenImage(**cfg.to_diffusers_kwargs()).eval()
    ref16.load_state_dict(ref.state_dict())
    ref16 = ref16.to(torch.bfloat16)
    with torch.no_grad():
        want = ref16.decode(lat[:, :, None].bfloat16()).sample[:, :, 0].float()
    got = vae.decode_raw(lat).float()
    # bf16 rounding differs between the 3D and 2D convolutions; diffusers' own bf16 vs
    # fp32 gap is ~5e-3 on random weights.
    assert (got - want).abs().max().item() < 5e-2


def test_wan_layout_equals_diffusers_layout(pair, tmp_path):
    cfg, ref, vae, _ = pair
    sd = ref.state_dict()
    wan = {diffusers_to_wan_key(k, cfg.num_res_blocks): v.contiguous() for k, v in sd.items()}
    assert len(wan) == len(sd)
    assert all(wan_to_diffusers_key(diffusers_to_wan_key(k, cfg.num_res_blocks), cfg.num_res_blocks) == k for k in sd)
    # A ComfyUI-style single file with a prefix and no config.json: the architecture is
    # read off the shapes (the statistics are not in the file, so pass the config here).
    path = tmp_path / "qwen_image_vae.safetensors"
    save_file({"first_stage_model." + k: v for k, v in wan.items()}, str(path))
    wvae = load_qwen_vae(path, config=cfg)
    a, b = vae.state_dict(), wvae.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    inferred = load_qwen_vae(path)
    assert inferred.config.dim_mult == cfg.dim_mult and inferred.config.num_res_blocks == cfg.num_res_blocks
    assert inferred.config.base_dim == cfg.base_dim and inferred.config.z_dim == cfg.z_dim


def test_wan_rename_matches_diffusers_converter():
    """Full-size key set: our rename agrees with diffusers' convert_wan_vae_to_diffusers."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        ref = AutoencoderKLQwenImage()
    keys = list(ref.state_dict())
    wan = {diffusers_to_wan_key(k, 2): i for i, k in enumerate(keys)}
    back = convert_wan_vae_to_diffusers(dict(wan))
    assert {v: k for k, v in back.items()} == {i: k for i, k in enumerate(keys)}
    assert {wan_to_diffusers_key(k, 2): i for k, i in wan.items()} == {k: i for i, k in enumerate(keys)}


def test_single_file_without_config_infers_architecture(pair, tmp_path):
    cfg, ref, vae, folder = pair
    path = tmp_path / "vae.safetensors"
    save_file({"vae." + k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    v2 = load_qwen_vae(path, config=cfg)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(v2.encode_raw(x), vae.encode_raw(x))
    inferred = load_qwen_vae(path).config
    assert (inferred.base_dim, inferred.dim_mult, inferred.num_res_blocks, inferred.temperal_downsample) == (
        cfg.base_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.temperal_downsample)


def test_chunked_attention_equals_unchunked(pair):
    cfg, _, vae, _ = pair
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(1, cfg.z_dim, 9, 13, generator=g)  # 117 tokens, chunks of 10 leave a tail
    x = torch.rand(1, 3, 72, 104, generator=g) * 2 - 1
    full_d, full_e = vae.decode_raw(lat), vae.encode_raw(x)
    try:
        vae.set_attention_chunking(query_chunk=10)
        d, e = vae.decode_raw(lat), vae.encode_raw(x)
        vae.set_attention_chunking(query_chunk=None, max_score_bytes=117 * 4 * 16)  # auto: 16 rows
        d2 = vae.decode_raw(lat)
    finally:
        vae.set_attention_chunking(query_chunk=None, max_score_bytes=256 * 1024 * 1024)
    # Chunking changes only the SDPA kernel's blocking; the deep decoder amplifies those
    # float32 roundings (measured <= 1.3e-6 at the output).
    assert (d - full_d).abs().max().item() <= 1e-5
    assert (e - full_e).abs().max().item() <= 1e-5
    assert (d2 - full_d).abs().max().item() <= 1e-5
    # At the block itself the two agree to float32 rounding (measured ~1e-7).
    attn = vae.decoder.mid_block.attentions[0]
    h = torch.randn(2, attn.proj.weight.shape[0], 9, 13, generator=g)
    whole = attn(h)
    attn.query_chunk = 10
    try:
        chunked = attn(h)
    finally:
        attn.query_chunk = None
    assert (chunked - whole).abs().max().item() <= 1e-6


def test_tiled_decode_and_encode_bounded(pair):
    cfg, _, _, _ = pair
    vae = random_qwen_vae(cfg, seed=7)
    g = torch.Generator().manual_seed(6)
    lat = torch.randn(1, cfg.z_dim, 24, 20, generator=g) * 0.5  # 192 x 160 px
    full = vae.decode_raw(lat, tile=None)
    scale = full.abs().mean().item()  # ~0.57
    # tile=128 px: 16-cell tiles, 4-cell overlap -> 2 x 2 tiles; tile=64 px -> 4 x 3 tiles.
    err = {}
    for t in (64, 128):
        tiled = vae.decode_raw(lat, tile=t)
        assert tiled.shape == full.shape
        err[t] = (tiled - full).abs()
    # Tiles never see the rest of the image (the mid-block attention is global), so tiled
    # != untiled; with random weights measured mean abs diff 0.029-0.032 (5% of the
    # output's mean magnitude) at 128 px, 0.12-0.16 at 64 px. Bound: 10%, and shrinking
    # as the tiles grow.
    assert err[128].mean().item() < 0.1 * scale, err[128].mean().item()
    assert err[128].mean().item() < err[64].mean().item()
    # "auto" switches on above the threshold, with the VAE's tile size.
    vae.tile_pixels = 128
    auto = vae.decode_raw(lat, tile="auto", tile_threshold=64 * 64)
    assert torch.equal(auto, vae.decode_raw(lat, tile=128))
    assert not torch.equal(auto, full)
    assert torch.equal(vae.decode_raw(lat, tile="auto", tile_threshold=10**9), full)
    vae.tile_threshold = 100 * 100
    try:
        assert torch.equal(vae.decode_raw(lat), auto)
    finally:
        vae.tile_threshold = None
    assert torch.equal(vae.decode_raw(lat), full)
    x = torch.rand(1, 3, 128, 96, generator=g) * 2 - 1
    e_full = vae.encode_raw(x, tile=None)
    e_tiled = vae.encode_raw(x, tile=96)  # 3 x 2 tiles of 96 px, 24 px overlap
    assert e_tiled.shape == e_full.shape
    # measured mean abs diff 0.009-0.023 vs mean magnitude ~0.5
    assert (e_tiled - e_full).abs().mean().item() < 0.1 * e_full.abs().mean().item()


def test_bad_inputs(pair):
    cfg, _, vae, _ = pair
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError):
        vae.decode(torch.zeros(1, cfg.z_dim + 1, 4, 4))
    with pytest.raises(ValueError):
        vae.decode(torch.zeros(1, cfg.z_dim, 4, 4), tile="sometimes")


def test_roundtrip_odd_size_rgba(pair):
    from PIL import Image

    from krea2kit.models.tiling import roundtrip

    _, _, vae, _ = pair
    img = Image.new("RGBA", (37, 21), (200, 30, 40, 128))
    out, score = roundtrip(vae, img)
    assert out.size == (37, 21) and out.mode == "RGB"
    assert isinstance(score, float)


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_bad_files(pair, tmp_path):
    cfg, ref, _, folder = pair
    # A FLUX.2 VAE (diffusers layout).
    from diffusers import AutoencoderKLFlux2

    flux = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                              norm_num_groups=4, sample_size=32)
    _write(tmp_path / "flux2.safetensors", flux.state_dict())
    with pytest.raises(WeightsError, match="not a Qwen-Image VAE") as ei:
        load_qwen_vae(tmp_path / "flux2.safetensors")
    assert "FLUX.2" in str(ei.value)
    # A transformer.
    _write(tmp_path / "dit.safetensors", {"blocks.0.attn.wq.weight": torch.zeros(4, 4),
                                          "txtfusion.projector.weight": torch.zeros(1, 12)})
    with pytest.raises(WeightsError, match="Krea 2 transformer"):
        load_qwen_vae(tmp_path / "dit.safetensors")
    # Right layout, wrong architecture.
    with pytest.raises(WeightsError, match="shape mismatch|do not match"):
        load_qwen_vae(folder, config=QWEN_VAES["nano"])
    # A truncated file, a missing tensor, a pickle.
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(WeightsError):
        load_qwen_vae(tmp_path / "junk.safetensors")
    sd = dict(ref.state_dict())
    sd.pop("decoder.conv_out.bias")
    _write(tmp_path / "partial.safetensors", sd)
    with pytest.raises(WeightsError, match="missing"):
        load_qwen_vae(tmp_path / "partial.safetensors", config=cfg)
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsError, match="pickle"):
        load_qwen_vae(tmp_path / "vae.ckpt")
    with pytest.raises(WeightsError, match="not found"):
        load_qwen_vae(tmp_path / "nothing.safetensors")


def test_pipeline_root_folder_and_bad_config(pair, tmp_path):
    cfg, ref, vae, _ = pair
    root = tmp_path / "Qwen-Image"
    _save_diffusers_folder(ref, root / "vae")
    (root / "model_index.json").write_text("{}")
    v = load_qwen_vae(root)
    assert v.config == vae.config
    bad = tmp_path / "bad"
    _save_diffusers_folder(ref, bad)
    (bad / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLFlux2"}))
    with pytest.raises(WeightsError, match="AutoencoderKLFlux2"):
        load_qwen_vae(bad)
    (bad / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage", "z_dim": 4,
                                                 "latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}))
    with pytest.raises(WeightsError, match="config.json"):
        load_qwen_vae(bad)


def test_device_and_dtype_follow_the_model(pair):
    cfg, _, vae, _ = pair
    lat = torch.randn(2, cfg.z_dim, 3, 4, dtype=torch.float64)
    out = vae.decode(lat)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 24, 32)
    # Batch slicing (one image at a time) gives the batched result up to conv-kernel
    # blocking (measured 1.8e-6).
    vae.batch_slicing = False
    try:
        assert (vae.decode(lat) - out).abs().max().item() <= 1e-5
    finally:
        vae.batch_slicing = True


def test_channels_last_and_contiguous_layouts_agree(pair):
    cfg, ref, vae, _ = pair
    assert vae.channels_last  # the loader's default
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(8)
    lat = torch.randn(1, cfg.z_dim, 6, 5, generator=g)
    x = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1
    a_d, a_e = vae.decode_raw(lat), vae.encode_raw(x)
    assert a_d.is_contiguous() and a_e.is_contiguous()
    vae.set_channels_last(False)
    try:
        assert vae.decoder.conv_in.weight.is_contiguous()
        b_d, b_e = vae.decode_raw(lat), vae.encode_raw(x)
    finally:
        vae.set_channels_last(True)
    # Same values up to conv summation order (measured <= 1.4e-6 here).
    assert (a_d - b_d).abs().max().item() <= 1e-5
    assert (a_e - b_e).abs().max().item() <= 1e-5
