"""Trainable adapters against their oracles, and their round trip through krea2kit's LoRA loader.

* LoRA: PEFT's ``lora.Linear`` (``base(x) + (alpha / r) · B(A(x))``) with the same factors;
* LoKr: LyCORIS ``LokrModule.bypass_forward`` with the same factors, and LyCORIS'
  ``factorization`` for the Kronecker split;
* the adapters as krea2kit's internal form (``AdapterSet.lora_file``), attached by
  :func:`krea2kit.lora.apply.attach_adapters` to a fresh copy, give the trained model's
  forward (fp32); every parameter is randomised first so nothing passes by being zero.
"""

from __future__ import annotations

import copy

import pytest
import torch

from krea2kit.models.dit import SingleStreamDiT, patchify
from krea2kit.train.adapters import (AdapterConfig, AdapterSet, LokrAdapter, LoraAdapter, factorization,
                                     select_targets)
from support.presets import TINY_DIT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: OpenMP spinning only slows them


def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = SingleStreamDiT(TINY_DIT)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return m.eval().requires_grad_(False)


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(2, 5, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    lat = torch.randn(2, cfg.channels, 2 * cfg.patch, 3 * cfg.patch, generator=g)
    return lat, txt, mask, torch.tensor([0.3, 0.8])


def _run(m, inputs):
    lat, txt, mask, t = inputs
    p = m.config.patch
    with torch.no_grad():
        return m(patchify(lat, p), t, txt, mask, (lat.shape[2] // p, lat.shape[3] // p))


def _randomise(module, seed=5, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_matches_peft_linear():
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(48, 40)
    _randomise(base, 1)
    cfg = LoraConfig(r=6, lora_alpha=9)
    ref = PeftLinear(copy.deepcopy(base), "default", config=cfg, r=6, lora_alpha=9)
    ours = LoraAdapter(48, 40, rank=6, alpha=9)
    _randomise(ours, 2)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.down)
        ref.lora_B["default"].weight.copy_(ours.up)
    x = torch.randn(7, 48)
    with torch.no_grad():
        err = (base(x) + ours(x) - ref(x)).abs().max().item()
    assert err <= 1e-6, err


def test_lora_init_is_zero_delta_and_nonzero_down():
    ad = LoraAdapter(32, 16, rank=4, alpha=4, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(ad.up) == 0 and torch.count_nonzero(ad.down) == ad.down.numel()
    # PEFT's default init bound for lora_A: kaiming_uniform(a=sqrt(5)) -> 1/sqrt(in)
    assert ad.down.abs().max().item() <= 32 ** -0.5 + 1e-7


@pytest.mark.parametrize("dim", [1, 7, 64, 127, 128, 192, 250, 360, 512, 768, 1024, 6144])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16])
def test_factorization_matches_lycoris(dim, factor):
    lyc = pytest.importorskip("lycoris.functional")
    assert factorization(dim, factor) == tuple(lyc.factorization(dim, factor))


@pytest.mark.parametrize("kw", [dict(rank=2, alpha=3, factor=-1),      # w2 factored, scale alpha/r
                                dict(rank=4, alpha=2, factor=8),
                                dict(rank=64, alpha=7, factor=-1)])    # both full: scale 1
def test_lokr_matches_lycoris_bypass(kw):
    pytest.importorskip("lycoris")
    from lycoris.modules.lokr import LokrModule

    IN, OUT = 64, 128
    lin = torch.nn.Linear(IN, OUT, bias=False)
    _randomise(lin, 3)
    ref = LokrModule("m", lin, lora_dim=kw["rank"], alpha=kw["alpha"], factor=kw["factor"])
    ours = LokrAdapter(IN, OUT, kw["rank"], kw["alpha"], factor=kw["factor"])
    _randomise(ours, 4)
    assert ours.scale == pytest.approx(float(ref.scale))
    with torch.no_grad():
        ref.lokr_w1.copy_(ours.w1)
        if ours.decomposed:
            ref.lokr_w2_a.copy_(ours.w2_a)
            ref.lokr_w2_b.copy_(ours.w2_b)
        else:
            ref.lokr_w2.copy_(ours.w2)
        x = torch.randn(5, 3, IN)
        err = (lin(x) + ours(x) - ref.bypass_forward(x)).abs().max().item()
    assert err <= 1e-6, err


def test_lokr_init_zero_delta():
    ad = LokrAdapter(64, 128, rank=2, alpha=2, generator=torch.Generator().manual_seed(0))
    assert ad.decomposed and torch.count_nonzero(ad.dense()) == 0


def test_targets_presets_on_tiny():
    m = _tiny()
    every = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert select_targets(m, ["all"]) == every
    att = select_targets(m, ["attention"])
    assert att and all(n.startswith("blocks.") and n.split(".")[-1] in {"wq", "wk", "wv", "gate", "wo"}
                       and ".attn." in n for n in att)
    assert len(att) == 5 * TINY_DIT.layers
    assert select_targets(m, ["blocks.0.attn.wq", "first"]) == ["first", "blocks.0.attn.wq"]


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_step0_equals_base_and_roundtrip_through_loader(kind):
    from krea2kit.lora.apply import attach_adapters

    base = _tiny(0)
    inputs = _inputs(base.config)
    expect_base = _run(base, inputs)
    trained = copy.deepcopy(base)
    ads = AdapterSet(trained, AdapterConfig(kind=kind, rank=4, alpha=2.0, targets=("all",)), seed=3)
    assert torch.equal(_run(trained, inputs), expect_base)  # zero-initialised: step 0 is the base
    _randomise(ads, 9, std=0.05)
    got = _run(trained, inputs)
    assert (got - expect_base).abs().max().item() > 1e-3
    # off switch and sign
    ads.multiplier = 0.0
    assert torch.equal(_run(trained, inputs), expect_base)
    ads.multiplier = 1.0
    lora = ads.lora_file(name="t")
    fresh = copy.deepcopy(base)
    with attach_adapters(fresh, [lora]):
        again = _run(fresh, inputs)
    err = (again - got).abs().max().item()
    assert err <= 1e-5, err
    ads.detach()
    assert torch.equal(_run(trained, inputs), expect_base)


def test_gradients_reach_only_adapters():
    m = _tiny(0)
    ads = AdapterSet(m, AdapterConfig(kind="lora", rank=2, alpha=2, targets=("attention",)), seed=0)
    lat, txt, mask, t = _inputs(m.config)
    p = m.config.patch
    out = m(patchify(lat, p), t, txt, mask, (lat.shape[2] // p, lat.shape[3] // p))
    out.square().mean().backward()
    assert all(q.grad is None for q in m.parameters())
    ups = [ad.up.grad for _, ad in ads.items()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in ups)
