"""Quantizing a full-precision text encoder while loading it (``model.text_encoder_weights_dtype``):
the decoder layers' projections hold what comfy-kitchen makes of the file's weights, the
embedding table and norms stay as stored, the prompt embeddings stay close to the
full-precision encoder's, the memory estimate counts the quantized size, and the CLI records
the storage in each image and reproduces the image from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("comfy_kitchen")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import krea2kit  # noqa: E402
from krea2kit import memory  # noqa: E402
from krea2kit.conditioning import load_text_encoder  # noqa: E402
from krea2kit.errors import WeightsError  # noqa: E402
from krea2kit.models.quant.linear import QuantLinear  # noqa: E402
from krea2kit.models.quant.load import resident_nbytes  # noqa: E402
from krea2kit.models.text_encoder import load_text_tower, quantized_on_load  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from community_files import write_comfy_text_encoder  # noqa: E402

NANO_TE_DIR = Path(krea2kit.__file__).parent / "nano" / "weights" / "text_encoder"
NANO_TE = NANO_TE_DIR / "model.safetensors"
TAPS = list(range(1, 13))  # the nano encoder's taps (its krea2kit.json): every layer
PREFIX = "model.language_model."
PROMPTS = ["a red ball", "a lighthouse at dusk, oil painting", "two cats on a sofa, photo, 35mm"]
#: Relative error (Frobenius) of the tapped hidden states of PROMPTS against the fp32 encoder.
#: Measured on the nano encoder (CPU, fp32 compute, torch 2.13, comfy-kitchen eager): fp8 0.015
#: (largest element difference 0.34 where |h| reaches 16.8), int8 0.0029 (0.080); twice that allowed.
TOLERANCE = {"fp8": 0.03, "int8": 0.006}


@pytest.mark.parametrize("weights_dtype", ["fp8", "int8"])
def test_quantized_tower_stores_what_comfy_kitchen_makes(weights_dtype):
    from comfy_kitchen.tensor import QuantizedTensor

    state = load_file(str(NANO_TE))
    tower = load_text_tower(NANO_TE, taps=TAPS, dtype=torch.float32, weights_dtype=weights_dtype).tower
    assert tower.storage_layout == ("fp8_scaled" if weights_dtype == "fp8" else "int8") + " (quantized on load)"
    n = 0
    for name, tensor in tower.state_dict().items():
        module = name.rpartition(".")[0]
        if name.endswith((".qweight", ".weight_scale")):
            continue
        # the embedding table and every norm: the file's values, full precision
        assert not quantized_on_load(module) and torch.equal(tensor, state[PREFIX + name].float()), name
    for name, mod in tower.named_modules():
        if not quantized_on_load(name):
            assert not isinstance(mod, QuantLinear), name
            continue
        assert isinstance(mod, QuantLinear), name
        w = state[PREFIX + name + ".weight"]
        if weights_dtype == "fp8":
            qt = QuantizedTensor.from_float(w, "TensorCoreFP8Layout", scale="recalculate")
        else:  # the nano widths are not whole 256-groups: plain per-row int8, as the transformer does
            assert not mod.codec.convrot and w.shape[1] % 256
            qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True)
        assert torch.equal(mod._buffers["qweight"], qt._qdata), name
        assert torch.equal(mod._buffers["weight_scale"], qt._params.scale.float()), name
        n += 1
    assert n == 7 * len(TAPS)  # q, k, v, o, gate, up, down in every layer
    full = load_text_tower(NANO_TE, taps=TAPS, dtype=torch.float32).tower
    assert resident_nbytes(tower) < 0.35 * resident_nbytes(full)


@pytest.mark.parametrize("weights_dtype", ["fp8", "int8"])
def test_prompt_embeddings_stay_close_to_the_full_precision_encoder(weights_dtype):
    full = load_text_encoder(NANO_TE_DIR, taps=TAPS, dtype=torch.float32)
    quant = load_text_encoder(NANO_TE_DIR, taps=TAPS, dtype=torch.float32, weights_dtype=weights_dtype)
    full.exact_layout = quant.exact_layout = False  # the nano presets' compact layout
    (a, mask_a), (b, mask_b) = full.encode(PROMPTS), quant.encode(PROMPTS)
    assert torch.equal(mask_a, mask_b) and a.shape == b.shape
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < TOLERANCE[weights_dtype], rel
    # the prompt cache is keyed by the identity: a quantized encoder never reads full-precision entries
    assert quant.identity != full.identity and "(quantized on load)" in quant.identity
    assert quant.cache_key(PROMPTS[0]) != full.cache_key(PROMPTS[0])


def test_an_already_quantized_text_encoder_is_refused(tmp_path):
    path = tmp_path / "qwen3vl_nano_fp8_scaled.safetensors"
    write_comfy_text_encoder(NANO_TE, path)
    with pytest.raises(WeightsError, match="already quantized") as info:
        load_text_tower(path, taps=TAPS, weights_dtype="fp8")
    assert info.value.file == str(path)


def test_without_comfy_kitchen_one_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy_kitchen.tensor", None)  # import fails as if not installed
    with pytest.raises(WeightsError, match="needs comfy-kitchen") as info:
        load_text_tower(NANO_TE, taps=TAPS, weights_dtype="int8")
    assert "krea2kit[quant]" in info.value.hint and info.value.file == str(NANO_TE)


@pytest.mark.parametrize("weights_dtype", ["fp8", "int8"])
def test_the_estimate_counts_what_loading_holds(weights_dtype):
    from krea2kit.api import Session, load_recipe

    session = Session()
    plan = session.plan(load_recipe(None, overrides=[f"model.text_encoder_weights_dtype={weights_dtype}"]),
                        prompts=["a cat"])
    part, _, _ = memory._text_encoder_weights(plan, str(NANO_TE_DIR), 4)
    tower = load_text_tower(NANO_TE, taps=TAPS, dtype=torch.float32, weights_dtype=weights_dtype).tower
    assert part.nbytes == resident_nbytes(tower) and part.note == f"{weights_dtype} on load"


@pytest.mark.slow
def test_peak_host_memory_stays_near_the_quantized_size(tmp_path):
    import os

    from safetensors.torch import save_file

    from krea2kit.models.text_encoder import Qwen3TextConfig, Qwen3TextTower

    def synthetic_tower(layers: int) -> Path:
        """A synthetic Qwen3 tower (25 MB of bf16 a layer, 97 % of it in the projections)."""
        cfg = Qwen3TextConfig(vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=128, mrope_section=(24, 20, 20))
        with torch.device("meta"):
            shapes = Qwen3TextTower(cfg).state_dict()
        g = torch.Generator().manual_seed(0)
        state = {PREFIX + k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in shapes.items()}
        path = tmp_path / f"text-bf16-{layers}.safetensors"
        save_file(state, str(path))
        return path

    from rss_probe import marginal_cost

    small, large = synthetic_tower(3), synthetic_tower(9)
    extra = os.path.getsize(large) - os.path.getsize(small)  # 150 MB of bf16 projections
    for mode in ("text-fp8", "text-int8"):
        resident, grew = marginal_cost(small, large, mode)
        # What six more layers cost: a process-wide fixed cost (allocator arenas, kernel set-up,
        # which differ between installs) cancels. Measured (CPU, torch 2.13): resident 0.51x the
        # bf16 bytes added, peak growth about the same: tensors are quantized a block of rows at a
        # time, so no layer's temporaries add up (0.51x fp8, 0.48x int8). A bf16 load: 1.0x.
        assert resident < 0.55 * extra, (mode, resident / extra)
        assert grew < 0.75 * extra, (mode, grew / extra)


# -- the CLI ---------------------------------------------------------------------------------

def test_dry_run_estimate_shrinks(cli_inproc):
    def text_encoder_bytes(*sets: str) -> int:
        args = [a for s in sets for a in ("--set", s)]
        res = cli_inproc("run", "--dry-run", "--json", "--prompt", "a cat", *args)
        assert res.code == 0, res.stderr
        return json.loads(res.stdout.splitlines()[0])["memory"]["parts"]["text encoder weights"]

    nano_full, nano_fp8 = text_encoder_bytes(), text_encoder_bytes("model.text_encoder_weights_dtype=fp8")
    assert nano_fp8 < 0.35 * nano_full  # from the nano file's header
    turbo = "model.preset=krea2-turbo"
    full, fp8 = text_encoder_bytes(turbo, "model.dtype=bfloat16"), text_encoder_bytes(
        turbo, "model.dtype=bfloat16", "model.text_encoder_weights_dtype=fp8")
    # Qwen3-VL-4B's 35 tapped layers in bf16: 7.84 GB; fp8 projections: 4.31 GB (the embedding stays bf16)
    assert round(full / 1e9, 2) == 7.84 and round(fp8 / 1e9, 2) == 4.31


def test_cli_renders_records_the_storage_and_reproduces_from_the_image(cli_inproc, tmp_path):
    res = cli_inproc("run", "--prompt", "a red ball", "--json", "--set", "model.text_encoder_weights_dtype=fp8",
                     "--set", "output.dir=out")
    assert res.code == 0, res.stderr
    first = tmp_path / json.loads(res.stdout.splitlines()[0])["path"]
    with Image.open(first) as im:
        meta = json.loads(im.info["krea2kit"])
        pixels = im.convert("RGB").tobytes()
    identity = meta["weights"]["text_encoder"]["identity"]
    assert identity.endswith(" storage=fp8_scaled (quantized on load) compute=dequantize-per-layer")
    assert meta["recipe"]["model"]["text_encoder_weights_dtype"] == "fp8"
    again = cli_inproc("run", str(first), "--json", "--set", "output.dir=again")
    assert again.code == 0, again.stderr
    with Image.open(tmp_path / json.loads(again.stdout.splitlines()[0])["path"]) as im2:
        assert im2.convert("RGB").tobytes() == pixels  # the image's recipe carries the key
        assert json.loads(im2.info["krea2kit"])["weights"]["text_encoder"]["identity"] == identity


@pytest.mark.parametrize("weights_dtype", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantizing_a_block_of_rows_at_a_time_equals_the_whole_tensor(monkeypatch, weights_dtype, dtype):
    from comfy_kitchen.tensor import QuantizedTensor

    from krea2kit.models.quant import onload
    from krea2kit.models.quant.comfy import ComfyCodec

    monkeypatch.setattr(onload, "CHUNK_ELEMENTS", 5 * 512)  # 5 rows a call, a ragged last block
    weight = (torch.randn(37, 512, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    weight[20, 7] = 0.9  # the fp8 scale's amax sits in a middle block
    codec = ComfyCodec(onload._codec_conf(weights_dtype, 512))
    got = onload._quantize(codec, weight)
    whole = QuantizedTensor.from_float(
        weight, codec.layout_cls,
        **({"per_channel": True, "convrot": codec.convrot, "convrot_groupsize": codec.convrot_groupsize}
           if weights_dtype == "int8" else {"scale": "recalculate"}))
    if dtype == torch.bfloat16 or weights_dtype == "fp8":  # what files hold: bit for bit
        assert torch.equal(got["qweight"].view(torch.uint8), whole._qdata.view(torch.uint8))
        assert torch.equal(got["weight_scale"], whole._params.scale.float())
    else:  # the fp32 ConvRot matmul rounds by the row count (BLAS blocking): an ulp, whole or not
        torch.testing.assert_close(got["weight_scale"], whole._params.scale.float(), rtol=1e-6, atol=0)
        assert (got["qweight"].int() - whole._qdata.int()).abs().max() <= 1


def test_prompt_cache_keys_follow_the_quant_compute_path():
    from krea2kit.models.quant.linear import quant_compute

    full = load_text_encoder(NANO_TE_DIR, taps=TAPS, dtype=torch.float32)
    quantized = load_text_encoder(NANO_TE_DIR, taps=TAPS, dtype=torch.float32, weights_dtype="int8")
    with quant_compute("dequantize"):
        dequantize = quantized.cache_key("a cat"), full.cache_key("a cat")
    with quant_compute("scaled-mm"):  # other bits: never served the other path's embeddings
        scaled = quantized.cache_key("a cat"), full.cache_key("a cat")
    assert dequantize[0] != scaled[0] and dequantize[0] != dequantize[1]
    assert dequantize[1] == scaled[1]  # a full-precision tower has one path: its cache stays shared
