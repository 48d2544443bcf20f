"""LoKr / LoHa / DoRA deltas equal the ``lycoris-lora`` package's reconstruction.

Oracles: ``lycoris.functional.{lokr,loha}.diff_weight`` (ΔW from the stored factors and the
alpha / rank scale) and the LyCORIS modules' ``bypass_forward`` (``W x + ΔW x``), fed with the
tensors the modules save (``custom_state_dict``). Every parameter is randomised.
Note: in lycoris-lora 4.1.3 the modules' ``get_diff_weight`` applies ``scale`` twice
(``get_weight`` already scales), unlike their own bypass path and ComfyUI; it is not used here.
"""

from __future__ import annotations

import pytest
import torch

lycoris = pytest.importorskip("lycoris")
from lycoris.functional import loha as floha  # noqa: E402
from lycoris.functional import lokr as flokr  # noqa: E402
from lycoris.functional.general import weight_decompose  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

from krea2kit.lora.formats import parse_lora_state_dict  # noqa: E402

OUT, IN = 128, 64  # stands in for a Krea 2 Linear; loaded under blocks.0.mlp.gate's names


def _randomised(module):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if getattr(module, "dora_scale", None) is not None:
            module.dora_scale.copy_(torch.rand(module.dora_scale.shape, generator=g) + 0.5)
    return module


def _parse(sd: dict, prefix: str = "lycoris_transformer_blocks_0_ff_gate"):
    lora = parse_lora_state_dict({f"{prefix}.{k}": v for k, v in sd.items()})
    return lora.deltas["blocks.0.mlp.gate"]


@pytest.mark.parametrize("kw", [
    dict(lora_dim=4, alpha=2, factor=8),                          # w1 full, w2 factored
    dict(lora_dim=4, alpha=3, factor=4, decompose_both=True),
    dict(lora_dim=100000, alpha=7, factor=8),                     # full-matrix mode: scale 1
])
def test_lokr_module_bypass_matches(kw):
    lin = torch.nn.Linear(IN, OUT, bias=False)
    mod = _randomised(LokrModule("m", lin, **kw))
    sd = mod.custom_state_dict()
    for prefix in ("lycoris_transformer_blocks_0_ff_gate", "diffusion_model.blocks.0.mlp.gate",
                   "lora_unet_blocks_0_mlp_gate"):
        d = _parse(sd, prefix)
        assert d.kind == "lokr"
        x = torch.randn(5, IN)
        with torch.no_grad():
            expect = mod.bypass_forward(x)
        err = (lin(x) + x @ d.dense().T - expect).abs().max().item()
        assert err <= 1e-6, err  # measured ~6e-8


def test_lokr_functional_with_both_sides_factored():
    g = torch.Generator().manual_seed(12)
    w1a, w1b = torch.randn(8, 3, generator=g), torch.randn(3, 4, generator=g)
    w2a, w2b = torch.randn(16, 3, generator=g), torch.randn(3, 16, generator=g)
    alpha = 1.5
    sd = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(alpha)}
    d = _parse(sd)
    ref = flokr.diff_weight(None, w1a, w1b, None, w2a, w2b, None, gamma=alpha)
    err = (d.dense() - ref).abs().max().item()
    assert err <= 1e-6, err  # measured 0


def test_lokr_tucker_core_on_a_linear():
    g = torch.Generator().manual_seed(13)
    w1 = torch.randn(8, 4, generator=g)
    w2a, t2, w2b = torch.randn(16, 3, generator=g), torch.randn(3, 3, generator=g), torch.randn(3, 16, generator=g)
    d = _parse({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "lokr_t2": t2, "alpha": torch.tensor(3.0)})
    torch.testing.assert_close(d.dense(), torch.kron(w1, w2a @ t2 @ w2b))  # alpha/r = 3/3


def test_loha_module_and_functional_match():
    lin = torch.nn.Linear(IN, OUT, bias=False)
    mod = _randomised(LohaModule("m", lin, lora_dim=4, alpha=2))
    sd = mod.custom_state_dict()
    d = _parse(sd)
    assert d.kind == "loha" and d.scale == 0.5
    ref = floha.diff_weight(sd["hada_w1_b"], sd["hada_w1_a"], sd["hada_w2_b"], sd["hada_w2_a"], None, None,
                            gamma=torch.tensor(0.5))
    assert (d.dense() - ref).abs().max().item() <= 1e-7
    x = torch.randn(5, IN)
    with torch.no_grad():
        expect = mod.bypass_forward(x)
    err = (lin(x) + x @ d.dense().T - expect).abs().max().item()
    assert err <= 1e-6, err  # measured 0


@pytest.mark.parametrize("cls,wd_on_out", [(LokrModule, True), (LokrModule, False), (LohaModule, True), (LohaModule, False)])
def test_dora_scale_matches_lycoris_weight_decompose(cls, wd_on_out):
    lin = torch.nn.Linear(IN, OUT, bias=False)
    kw = dict(factor=8) if cls is LokrModule else {}
    mod = _randomised(cls("m", lin, lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=wd_on_out, **kw))
    sd = mod.custom_state_dict()
    d = _parse(sd)
    assert d.magnitude_axis == ("out" if wd_on_out else "in")
    w = lin.weight.detach()
    expect = weight_decompose(w + d.dense(), sd["dora_scale"], 1.0, wd_on_out)
    got = w + d.effective_delta(w)
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured ~1e-7 (LyCORIS adds eps to the norm)
