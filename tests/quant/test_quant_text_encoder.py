"""ComfyUI-style quantized text encoders (qwen3vl_4b_fp8_scaled): the nano Qwen3-VL tower
written by comfy-kitchen in fp8_scaled, its embedding table fp8 as well, loads with each
quantized Linear dequantizing to comfy-kitchen's tensor and hidden states close to fp32."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("comfy_kitchen")

import krea2kit  # noqa: E402
from krea2kit.models.text_encoder import load_text_tower  # noqa: E402
from krea2kit.models.quant.linear import QuantLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from community_files import write_comfy_text_encoder  # noqa: E402

NANO_TE = Path(krea2kit.__file__).parent / "nano" / "weights" / "text_encoder" / "model.safetensors"
TAPS = [1, 2, 3]


def test_fp8_scaled_text_encoder_loads_quantized_and_matches_comfy_kitchen(tmp_path):
    path = tmp_path / "qwen3vl_nano_fp8_scaled.safetensors"
    oracle = write_comfy_text_encoder(NANO_TE, path)
    loaded = load_text_tower(path, taps=TAPS, dtype=torch.float32)
    tower = loaded.tower
    assert tower.storage_layout == "fp8_scaled"
    prefix = "model.language_model."
    n_quant = 0
    for stem, qt in oracle.items():
        name = stem[len(prefix):]
        try:
            mod = tower.get_submodule(name.rpartition(".")[0] if name.startswith("embed") else name)
        except AttributeError:
            continue  # layers deeper than the taps are not built
        expected = type(qt)(qt._qdata, qt._layout_cls, dataclasses.replace(qt._params, orig_dtype=torch.float32))
        if name.startswith("embed"):  # not a Linear: dequantized once at load
            assert torch.equal(tower.embed_tokens.weight, expected.dequantize())
            continue
        mod = tower.get_submodule(name)
        assert isinstance(mod, QuantLinear)
        assert torch.equal(mod.weight, expected.dequantize()), name
        n_quant += 1
    assert n_quant == 7 * len(TAPS)
    ref = load_text_tower(NANO_TE, taps=TAPS, dtype=torch.float32).tower
    ids = torch.randint(0, 600, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids, taps=TAPS), tower(ids, taps=TAPS)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.1, rel
