"""Oracle: PEFT itself wrapping krea2kit's transformer (native module names, as ai-toolkit trains),
saved with ``save_pretrained`` (``base_model.model.<native>`` keys + adapter_config.json), then
loaded by krea2kit: same outputs as PEFT's own forward. Plain LoRA (with alpha / rsLoRA /
alpha_pattern) and DoRA (``lora_magnitude_vector``, per output row) at strength 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from krea2kit.lora.formats import load_lora  # noqa: E402
from krea2kit.lora.apply import attach_adapters  # noqa: E402

from conftest import run, tiny_dit, tiny_inputs  # noqa: E402

TARGETS = ["first", "wq", "wk", "wv", "gate", "wo", "up", "down", "projector", "last.linear", "tmlp.0", "tmlp.2",
           "tproj.1", "txtmlp.1", "txtmlp.3"]  # "gate" also hits mlp.gate: all 56 Linears of tiny


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"blocks.1.attn.wq": 2}),
    dict(r=4, lora_alpha=4, use_dora=True),
])
def test_peft_wrapped_native_model_matches(tmp_path, kw):
    from peft import LoraConfig, get_peft_model

    base = tiny_dit(7)
    inputs = tiny_inputs(base.config, seed=8)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, **kw))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))
    pm.eval()
    expect = run(pm.base_model.model, inputs)
    pm.save_pretrained(tmp_path / "adapter")
    lora = load_lora(tmp_path / "adapter")
    assert lora.layout == "native" and lora.key_prefix == "base_model.model." and len(lora) == 56
    assert lora.has_dora() == bool(kw.get("use_dora"))
    with attach_adapters(base, [lora]):
        got = run(base, inputs)
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured 0 (LoRA), 2.6e-6 (DoRA)
    assert (expect - run(base, inputs)).abs().max().item() > 1e-2
