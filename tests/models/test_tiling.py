"""Generic spatial tiling, padding and the VAE round trip (krea2kit.models.tiling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from krea2kit.models.contract import LatentContract
from krea2kit.models.tiling import (
    crop_to,
    needs_tiling,
    pad_to_multiple,
    pil_to_tensor,
    psnr,
    roundtrip,
    tensor_to_pil,
    tile_starts,
    tiled_apply,
    to_rgb,
)




def test_tile_starts_cover_and_overlap():
    for size in (1, 7, 8, 9, 31, 32, 33, 100, 257):
        for tile, overlap in ((8, 2), (16, 4), (32, 8), (10, 9)):
            starts = tile_starts(size, tile, overlap)
            assert starts[0] == 0
            assert min(size, starts[-1] + tile) == size  # reaches the end
            assert starts[-1] + min(tile, size) == size or len(starts) == 1
            for a, b in zip(starts, starts[1:]):
                assert a < b and a + tile - b >= overlap  # consecutive tiles overlap enough
    assert tile_starts(64, 16, 0, align=8) == [0, 16, 32, 48]
    assert all(s % 8 == 0 for s in tile_starts(200, 64, 16, align=8))
    with pytest.raises(ValueError):
        tile_starts(100, 8, 8)


def _upsample_pointwise(x: torch.Tensor) -> torch.Tensor:
    # A "decoder" with no spatial context: 1x1 mixing then nearest x8.
    w = torch.arange(12, dtype=torch.float32).view(3, 4, 1, 1) / 10 - 0.5
    return F.interpolate(F.conv2d(x, w), scale_factor=8, mode="nearest")


def _pool_pointwise(x: torch.Tensor) -> torch.Tensor:
    # An "encoder" whose 8x8 cells are independent: mean pool then 1x1 mixing.
    w = torch.linspace(-1, 1, 12).view(4, 3, 1, 1)
    return F.conv2d(F.avg_pool2d(x, 8), w)


def test_pointwise_decode_is_exact():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 21, 30, generator=g)
    want = _upsample_pointwise(z)
    got = tiled_apply(_upsample_pointwise, z, tile=8, overlap=3, scale=8, out_channels=3)
    assert got.shape == want.shape == (2, 3, 168, 240)
    # Blend weights are normalised, so identical tile outputs blend to themselves.
    assert (got - want).abs().max().item() <= 1e-6


def test_pointwise_encode_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 136, 200, generator=g)
    want = _pool_pointwise(x)
    got = tiled_apply(_pool_pointwise, x, tile=64, overlap=16, scale=1 / 8, out_channels=4)
    assert got.shape == want.shape == (1, 4, 17, 25)
    assert (got - want).abs().max().item() <= 1e-6


def test_local_conv_error_only_near_seams():
    """A 3x3 conv sees zero padding at tile borders; the ramp keeps the error small."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 4, 3, 3, generator=g) / 6

    def fn(x):
        return F.interpolate(F.conv2d(x, w, padding=1), scale_factor=8, mode="nearest")

    z = torch.randn(1, 4, 40, 40, generator=g)
    want = fn(z)
    got = tiled_apply(fn, z, tile=16, overlap=8, scale=8, out_channels=3)
    err = (got - want).abs()
    # Only the outermost latent row/column of a tile is wrong, and it gets a ramp weight
    # of at most 1/16 (first of 8 overlap cells; max output 3.6) -> measured max 0.29, mean 0.008.
    assert err.max().item() < 0.25 * want.abs().max().item()
    assert err.mean().item() < 0.02 * want.abs().mean().item() + 0.01
    # Away from every tile seam (columns/rows 0..7 latents) the result is exact.
    assert (got[..., :8 * 7, :8 * 7] - want[..., :8 * 7, :8 * 7]).abs().max().item() <= 1e-6


def test_single_tile_calls_fn_once():
    calls = []

    def fn(x):
        calls.append(x.shape)
        return _upsample_pointwise(x)

    z = torch.randn(1, 4, 8, 8)
    out = tiled_apply(fn, z, tile=16, overlap=4, scale=8, out_channels=3)
    assert len(calls) == 1 and out.shape == (1, 3, 64, 64)


def test_tiled_apply_bad_arguments():
    z = torch.randn(1, 4, 20, 20)
    with pytest.raises(ValueError):
        tiled_apply(_upsample_pointwise, z, tile=8, overlap=8, scale=8, out_channels=3)
    with pytest.raises(ValueError):  # tile outputs of the wrong channel count
        tiled_apply(_upsample_pointwise, z, tile=8, overlap=2, scale=8, out_channels=5)
    with pytest.raises(ValueError):  # encode tiles must be whole latent cells
        tiled_apply(_pool_pointwise, torch.randn(1, 3, 64, 64), tile=36, overlap=12, scale=1 / 8, out_channels=4)
    with pytest.raises(ValueError):
        tiled_apply(_pool_pointwise, torch.randn(3, 64, 64), tile=32, overlap=8, scale=1 / 8, out_channels=4)


def test_needs_tiling():
    assert not needs_tiling(1024, 1024, 1536 * 1536)
    assert needs_tiling(2048, 2048, 1536 * 1536)
    assert not needs_tiling(4096, 4096, None)
    assert not needs_tiling(4096, 4096, 0)


def test_pad_and_crop():
    x = torch.randn(1, 3, 37, 21)
    p, size = pad_to_multiple(x, 8)
    assert p.shape == (1, 3, 40, 24) and size == (37, 21)
    assert torch.equal(crop_to(p, size), x)
    assert torch.equal(p[..., 39, :21], x[..., 36, :])  # edge replication
    q, _ = pad_to_multiple(torch.randn(1, 3, 16, 32), 8)
    assert q.shape == (1, 3, 16, 32)


def test_to_rgb_notes():
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(rgb) == (rgb, None)
    out, note = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and "RGBA" in note
    out, note = to_rgb(Image.new("L", (4, 4), 9))
    assert out.getpixel((1, 1)) == (9, 9, 9) and "L" in note
    out, note = to_rgb(Image.new("CMYK", (4, 4)))
    assert out.mode == "RGB" and note


def test_pil_tensor_roundtrip_and_psnr():
    g = torch.Generator().manual_seed(3)
    arr = (torch.rand(5, 7, 3, generator=g) * 255).byte().numpy()
    img = Image.fromarray(arr, "RGB")
    t = pil_to_tensor(img)
    assert t.shape == (1, 3, 5, 7) and -1 <= t.min() and t.max() <= 1
    back = tensor_to_pil(t)
    assert (np.asarray(back) == arr).all()
    assert psnr(img, back) == math.inf
    darker = tensor_to_pil(t - 2 / 255)  # every value off by one level (clamped at 0)
    assert 45 < psnr(img, darker) < 49  # 20*log10(255) ~ 48.1 dB for a 1-level error
    with pytest.raises(ValueError):
        tensor_to_pil(t, rounding="floor")


class _BoxVAE:
    """A 'VAE' with encode = 8x8 mean pool, decode = nearest upsample."""

    contract = LatentContract(channels=3, factor=8)

    def __init__(self):
        self.calls = []

    def encode(self, x, **kw):
        assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0
        self.calls.append(("encode", kw))
        return F.avg_pool2d(x, 8)

    def decode(self, z, **kw):
        self.calls.append(("decode", kw))
        return F.interpolate(z, scale_factor=8, mode="nearest")


def test_roundtrip_generic_vae_odd_size():
    vae = _BoxVAE()
    img = Image.new("RGB", (37, 19), (10, 200, 90))
    out, score = roundtrip(vae, img, tile=None)
    assert out.size == (37, 19)
    assert score == math.inf  # a flat image survives pooling (edge padding keeps it flat)
    assert vae.calls == [("encode", {"tile": None}), ("decode", {"tile": None})]
    noisy = Image.effect_noise((37, 19), 60).convert("RGB")
    _, s2 = roundtrip(vae, noisy)
    assert 0 < s2 < 40


def test_roundtrip_qwen_vae_png_modes():
    from support.presets import QWEN_VAES
    from support.random_models import random_qwen_vae

    vae = random_qwen_vae(QWEN_VAES["tiny"], seed=0)
    for mode in ("RGBA", "L", "P"):
        img = Image.new(mode, (20, 13))
        out, score = roundtrip(vae, img)
        assert out.size == (20, 13) and out.mode == "RGB" and not math.isnan(score)
