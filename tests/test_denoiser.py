"""Krea2Denoiser: CFG batching, guidance conventions, cached per-run pieces."""

from __future__ import annotations

import pytest
import torch

from krea2kit.denoiser import Krea2Denoiser, krea_guidance
from krea2kit.models.dit import SingleStreamDiT, TextFeatures, patchify, unpatchify
from support.presets import TINY_DIT


def _model(seed=0) -> SingleStreamDiT:
    g = torch.Generator().manual_seed(seed)
    m = SingleStreamDiT(TINY_DIT).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.3 if (p.ndim == 1 or name.endswith("modulation.lin")) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m


def _texts(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = 9
    txt = torch.randn(2, L, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :4] = True
    mask[0, -2:] = True
    mask[1, :7] = True
    mask[1, -1:] = True
    # the negative prompt "" : only the assistant suffix is valid, padded like the prompt
    untxt = torch.randn(1, L, cfg.txtlayers, cfg.txtdim, generator=g)
    unmask = torch.zeros(1, L, dtype=torch.bool)
    unmask[0, -3:] = True
    x = torch.randn(2, cfg.channels, 8, 12, generator=g)
    return txt, mask, untxt, unmask, x


def _official_step(model, x, sigma, txt, mask, untxt, unmask, g):
    """What the official sampler does: two separate full forwards, then cond + g (cond - uncond)."""
    b = x.shape[0]
    t = torch.full((b,), sigma)
    img = patchify(x)
    with torch.no_grad():
        cond = model(img, t, txt, mask, (4, 6))
        if g <= 0:
            return unpatchify(cond, (4, 6))
        uncond = model(img, t, untxt.expand(b, -1, -1, -1), unmask.expand(b, -1), (4, 6))
    return unpatchify(cond + g * (cond - uncond), (4, 6))


def test_batched_cfg_equals_two_separate_passes():
    model = _model()
    txt, mask, untxt, unmask, x = _texts(model.config)
    # the compact layout (no padding), so the bit-exact check below can call the model directly
    batched = Krea2Denoiser(model, txt, mask, uncond_txt=untxt, uncond_mask=unmask, guidance=3.5, latent_hw=(8, 12),
                            layout="compact")
    separate = Krea2Denoiser(model, txt, mask, uncond_txt=untxt, uncond_mask=unmask, guidance=3.5, batch_cfg=False,
                             layout="compact")
    assert batched.cfg
    img = patchify(x)
    for sigma in (1.0, 0.6546, 0.05):
        a, b = batched(x, sigma), separate(x, sigma)
        assert a.shape == x.shape
        # Bit-identical to two separate passes over the same token layout (the uncond text
        # padded, masked, to the cond length as in the batch).
        both = TextFeatures.cat([batched.cond, batched.uncond.expand(2)])
        t = torch.full((2,), sigma)
        with torch.no_grad():
            cond = model(img, t, grid_hw=(4, 6), txt_features=TextFeatures(both.tokens[:2], both.mask[:2]))
            uncond = model(img, t, grid_hw=(4, 6), txt_features=TextFeatures(both.tokens[2:], both.mask[2:]))
        assert torch.equal(a, unpatchify(cond + 3.5 * (cond - uncond), (4, 6)))
        # Two passes at their own text lengths (batch_cfg=False) and the official sampler's two
        # full padded passes: equal up to fp32 summation order over masked keys, amplified by
        # the guidance (4.5 cond - 3.5 uncond). Measured: 5.7e-6 on |v| <= 7, i.e. 8e-7 relative.
        ref = _official_step(model, x, sigma, txt, mask, untxt, unmask, 3.5)
        scale = ref.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-6 * scale
        assert (a - ref).abs().max().item() <= 1.5e-6 * scale


def test_standard_scale_is_krea_g_plus_one_bit_identical():
    model = _model(2)
    txt, mask, untxt, unmask, x = _texts(model.config)
    for g in (3.5, 4.5, 1.3, 0.7, 6.1):
        krea = Krea2Denoiser(model, txt, mask, uncond_txt=untxt, uncond_mask=unmask, guidance=g)
        std = Krea2Denoiser(model, txt, mask, uncond_txt=untxt, uncond_mask=unmask, guidance=g + 1,
                            convention="standard")
        assert torch.equal(krea(x, 0.5), std(x, 0.5))
    # Turbo: g = 0 is standard cfg 1.0, and needs no negative prompt
    # (compact: the same tokens as the direct model call below, so bit-identical)
    a = Krea2Denoiser(model, txt, mask, guidance=0.0, layout="compact")
    b = Krea2Denoiser(model, txt, mask, guidance=1.0, convention="standard", layout="compact")
    assert not a.cfg and not b.cfg
    assert torch.equal(a(x, 0.9567), b(x, 0.9567))
    assert torch.equal(a(x, 0.9567), _official_step(model, x, 0.9567, txt, mask, None, None, 0.0))


def test_no_guidance_and_batch_broadcast():
    model = _model(3)
    txt, mask, untxt, unmask, x = _texts(model.config)
    # one prompt, two images: the text is broadcast
    den = Krea2Denoiser(model, txt[:1], mask[:1], uncond_txt=untxt, uncond_mask=unmask, guidance=2.0)
    v = den(x, torch.tensor(0.4))
    ref = _official_step(model, x, 0.4, txt[:1].expand(2, -1, -1, -1), mask[:1].expand(2, -1), untxt, unmask, 2.0)
    assert (v - ref).abs().max().item() <= 1e-5
    assert len(den._ropes) == 1  # one table for the whole run


def test_computes_in_model_dtype_like_official_sampler():
    model = _model(4).to(torch.bfloat16)
    txt, mask, untxt, unmask, x = _texts(model.config)
    den = Krea2Denoiser(model, txt, mask, uncond_txt=untxt, uncond_mask=unmask, guidance=3.5)
    xb = x.to(torch.bfloat16)
    v = den(xb, 0.9567)
    assert v.dtype == torch.bfloat16
    # official: t = torch.full(..., dtype=img.dtype); both branches in bf16; combined in bf16
    t = torch.full((2,), 0.9567, dtype=torch.bfloat16)
    with torch.no_grad():
        cond = model(patchify(xb), t, txt, mask, (4, 6))
        uncond = model(patchify(xb), t, untxt.expand(2, -1, -1, -1), unmask.expand(2, -1), (4, 6))
    ref = unpatchify(cond + 3.5 * (cond - uncond), (4, 6))
    assert (v.float() - ref.float()).abs().max().item() <= 0.1  # bf16: batching changes kernel shapes
    assert den(x, 0.9567).dtype == torch.float32  # returned in x's dtype


def test_errors():
    model = _model(5)
    txt, mask, untxt, unmask, x = _texts(model.config)
    with pytest.raises(ValueError, match="uncond_txt"):
        Krea2Denoiser(model, txt, mask, guidance=1.0)
    with pytest.raises(ValueError, match="convention"):
        krea_guidance(2.0, "comfy")  # type: ignore[arg-type]
    den = Krea2Denoiser(model, txt, mask)
    with pytest.raises(ValueError, match="multiple of the patch"):
        den(torch.randn(2, 16, 7, 12), 0.5)
    assert krea_guidance(4.5, "standard") == 3.5
