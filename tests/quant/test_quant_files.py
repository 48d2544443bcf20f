"""Quantized community transformer files: each ComfyUI layout and GGUF, written by the
oracle libraries (comfy-kitchen, gguf), loaded by krea2kit's loader, must dequantize to the
oracle's tensors bit for bit, stay quantized in memory, run close to the full-precision
model, carry LoRAs exactly as the dequantized model does, and refuse unknown layouts."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("comfy_kitchen")
gguf = pytest.importorskip("gguf")

from safetensors.torch import load_file, save_file  # noqa: E402

import krea2kit  # noqa: E402
from krea2kit.errors import WeightsError  # noqa: E402
from krea2kit.models.dit_loader import load_dit  # noqa: E402
from krea2kit.models.quant import keeps_full_precision  # noqa: E402
from krea2kit.models.quant.linear import QuantLinear  # noqa: E402
from krea2kit.models.quant.load import resident_nbytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from community_files import (  # noqa: E402
    COMFY_LAYOUTS,
    quantized_modules,
    write_comfy,
    write_comfy_text_encoder,
    write_gguf,
)

NANO_DIT = Path(krea2kit.__file__).parent / "nano" / "weights" / "turbo" / "model.safetensors"
CASES = [(name, "tensor") for name in COMFY_LAYOUTS] + [("fp8_scaled", "header"), ("fp8_scaled", "legacy")]
EXPECTED_NAME = {"fp8_scaled": "fp8_scaled", "int8_convrot": "int8_convrot", "int8": "int8", "mxfp8": "mxfp8",
                 "nvfp4": "nvfp4"}


@pytest.fixture(scope="module")
def nano_state():
    return {k: v.float() for k, v in load_file(str(NANO_DIT)).items()}


@pytest.fixture(scope="module")
def nano_fp32():
    return load_dit(NANO_DIT, dtype=torch.float32)


def _inputs(model, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    gh = gw = 4
    img = torch.randn(1, gh * gw, cfg.in_features, generator=g)
    txt = torch.randn(1, 7, cfg.txtlayers, cfg.txtdim, generator=g)
    return img, torch.tensor([0.6]), txt, (gh, gw)


def _velocity(model, inputs):
    img, t, txt, grid = inputs
    with torch.no_grad():
        return model(img, t, txt, None, grid).float()


@pytest.mark.parametrize("layout,where", CASES)
def test_comfy_layouts_dequantize_exactly_like_comfy_kitchen(tmp_path, nano_state, nano_fp32, layout, where):
    path = tmp_path / f"nano-{layout}.safetensors"
    oracle = write_comfy(nano_state, path, layout, where=where)
    # bf16 (ComfyUI's compute dtype: dequantized in bf16, not fp32-then-cast) on two layouts
    # keeps the suite fast; fp32 on all.
    both = where == "tensor" and layout in ("fp8_scaled", "int8_convrot")
    for dtype in ((torch.bfloat16, torch.float32) if both else (torch.float32,)):
        model = load_dit(path, dtype=dtype)
        want_name = "scaled_fp8" if where == "legacy" else EXPECTED_NAME[layout]
        assert model.storage_layout == want_name
        assert sorted(oracle) == quantized_modules(nano_state)
        for stem, qt in oracle.items():
            mod = model.get_submodule(stem)
            assert isinstance(mod, QuantLinear) and mod.compute_dtype == dtype
            # ComfyUI dequantizes with orig_dtype = its compute dtype: the same call, the same bits.
            want = dataclasses.replace(qt._params, orig_dtype=dtype)
            expected = type(qt)(qt._qdata, qt._layout_cls, want).dequantize()
            got = mod.weight
            assert got.dtype == dtype and torch.equal(got, expected), stem
        # The full-precision islands stay ordinary layers with the file's values.
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and keeps_full_precision(name):
                assert not isinstance(m, QuantLinear), name
                ref = nano_state[name + ".weight"].to(torch.bfloat16).to(dtype)
                assert torch.equal(m.weight, ref), name
    # Quantized storage stays quantized in memory; the velocity stays close to fp32's.
    assert resident_nbytes(model) < 0.45 * resident_nbytes(nano_fp32)
    inputs = _inputs(model)
    ref, out = _velocity(nano_fp32, inputs), _velocity(model, inputs)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < {"nvfp4": 0.25, "mxfp8": 0.08, "fp8_scaled": 0.08}.get(layout, 0.03), rel


@pytest.mark.parametrize("kquant,shape_fix", [("Q4_K", False), ("Q5_K", True), (None, False), (None, True)])
def test_gguf_dequantizes_exactly_like_the_gguf_package(tmp_path, nano_state, nano_fp32, kquant, shape_fix):
    path = tmp_path / "nano.gguf"
    tables = shape_fix  # quantized modulation tables are dequantized once at load
    write_gguf(nano_state, path, kquant=kquant, shape_fix=shape_fix, tables=tables)
    model = load_dit(path, dtype=torch.float32)
    reader = gguf.GGUFReader(str(path))
    quantized = 0
    for t in reader.tensors:
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        module, _, leaf = t.name.rpartition(".")
        mod = model.get_submodule(module)
        if isinstance(mod, QuantLinear):
            quantized += 1
            assert leaf == "weight" and torch.equal(mod.weight, want.reshape(mod.out_features, mod.in_features))
        else:
            got = getattr(mod, leaf)
            assert torch.equal(got.float(), want.reshape(got.shape)), t.name
    assert quantized == len(quantized_modules(nano_state))
    names = {"Q4_K": "gguf-Q4_K+gguf-Q8_0", "Q5_K": "gguf-Q5_K+gguf-Q8_0", None: "gguf-Q8_0"}
    assert model.storage_layout == (names[kquant] if not shape_fix else "gguf-Q5_K" if kquant else "gguf-Q8_0")
    if kquant is None:  # a real quantization of the model (K-quant blocks here are random)
        inputs = _inputs(model)
        ref, out = _velocity(nano_fp32, inputs), _velocity(model, inputs)
        assert ((out - ref).norm() / ref.norm()).item() < 0.02
        assert resident_nbytes(model) < 0.45 * resident_nbytes(nano_fp32)


def test_quant_linear_keeps_its_storage_through_dtype_and_device_moves(tmp_path, nano_state):
    path = tmp_path / "fp8.safetensors"
    write_comfy(nano_state, path, "fp8_scaled")
    model = load_dit(path, dtype=torch.float32)
    mod = model.get_submodule("blocks.0.attn.wq")
    before = mod.dequantized(torch.bfloat16)  # ComfyUI dequantizes in the compute dtype
    stored = {n: mod._buffers[n].clone() for n in mod.storage_names}
    model.to(torch.bfloat16)
    assert mod.compute_dtype == torch.bfloat16
    assert {n: mod._buffers[n].dtype for n in mod.storage_names} == {"qweight": torch.float8_e4m3fn,
                                                                     "weight_scale": torch.float32}
    assert all(torch.equal(mod._buffers[n].reshape(-1).view(torch.uint8), stored[n].reshape(-1).view(torch.uint8))
               for n in stored)
    assert torch.equal(mod.weight, before)
    x = torch.randn(3, mod.in_features)
    assert torch.equal(mod(x), torch.nn.functional.linear(x.to(torch.bfloat16), before).float())


def _bad(tmp_path, nano_state, name, edit, metadata=None):
    out = {"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in nano_state.items()}
    edit(out)
    path = tmp_path / name
    save_file(out, str(path), metadata=metadata)
    with pytest.raises(WeightsError) as err:
        load_dit(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_unknown_quantized_layouts_get_one_clear_error(tmp_path, nano_state):
    wq = "model.diffusion_model.blocks.0.attn.wq"

    def junk_json(sd):
        sd[wq + ".comfy_quant"] = torch.zeros(3, dtype=torch.uint8)

    assert "unreadable layer format" in _bad(tmp_path, nano_state, "a.safetensors", junk_json)

    def svdquant(sd):
        sd[wq + ".comfy_quant"] = torch.tensor(list(b'{"format": "svdquant_w4a4"}'), dtype=torch.uint8)

    msg = _bad(tmp_path, nano_state, "b.safetensors", svdquant)
    assert "'svdquant_w4a4' is not supported" in msg and "float8_e4m3fn" in msg

    def int8_no_format(sd):
        sd[wq + ".weight"] = torch.zeros(192, 192, dtype=torch.int8)
        sd[wq + ".weight_scale"] = torch.ones(192, 1)

    assert "unknown quantized layout" in _bad(tmp_path, nano_state, "c.safetensors", int8_no_format)

    def blockwise_fp8(sd):  # e.g. Hugging Face FP8 checkpoints: 128x128 block scales, no ComfyUI format
        sd[wq + ".weight"] = torch.zeros(192, 192, dtype=torch.float8_e4m3fn)
        sd[wq + ".weight_scale_inv"] = torch.ones(2, 2)

    msg = _bad(tmp_path, nano_state, "e.safetensors", blockwise_fp8)
    assert "unknown quantized layout" in msg and "F8_E4M3" in msg
    msg = _bad(tmp_path, nano_state, "d.safetensors", lambda sd: None,
               metadata={"_quantization_metadata": json.dumps({"layers": {"blocks.99.attn.wq": {"format": "nvfp4"}}})})
    assert "blocks.99.attn.wq" in msg
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(WeightsError, match="cannot read the GGUF file"):
        load_dit(bad_gguf)


def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_base(tmp_path, nano_state):
    from krea2kit.lora.formats import load_lora
    from krea2kit.lora.apply import attach_adapters

    path = tmp_path / "int8.safetensors"
    write_comfy(nano_state, path, "int8_convrot")
    quant = load_dit(path, dtype=torch.float32)
    # The same model in plain Linears holding the quantized model's (dequantized) weights.
    dense = load_dit(NANO_DIT, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in quant.named_modules():
            if isinstance(mod, torch.nn.Linear):
                dense.get_submodule(name).weight.copy_(mod.weight)
                if mod.bias is not None:
                    dense.get_submodule(name).bias.copy_(mod.bias)
        for name, p in quant.named_parameters():
            dense.get_parameter(name).copy_(p)
    assert torch.equal(_velocity(quant, _inputs(quant)), _velocity(dense, _inputs(quant)))
    g = torch.Generator().manual_seed(1)
    lora = {}
    targets = {"blocks.0.attn.wq": (192, 192), "blocks.1.mlp.down": (192, 512), "last.linear": (64, 192),
               "txtfusion.refiner_blocks.0.attn.wo": (64, 64)}
    for name, (o, i) in targets.items():
        key = "lora_unet_" + name.replace(".", "_")
        lora[key + ".lora_down.weight"] = torch.randn(4, i, generator=g) * 0.3
        lora[key + ".lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.3
        lora[key + ".alpha"] = torch.tensor(4.0)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    lf = load_lora(tmp_path / "lora.safetensors")
    inputs = _inputs(quant, seed=3)
    plain = _velocity(quant, inputs)
    with attach_adapters(quant, [(lf, 0.8)]), attach_adapters(dense, [(lf, 0.8)]):
        a, b = _velocity(quant, inputs), _velocity(dense, inputs)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    assert torch.equal(_velocity(quant, inputs), plain)  # detached: the base is untouched


RECIPE = """
seed = 3
prompt = "a red circle on a white background"
[sampler]
steps = 3
[output]
dir = "out"
"""


def _pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int), json.loads(im.info["krea2kit"])


@pytest.mark.slow
def test_cli_renders_community_files_close_to_the_full_precision_render(cli, tmp_path, nano_state):
    (tmp_path / "r.toml").write_text(RECIPE)
    write_comfy(nano_state, tmp_path / "krea2_fp8_scaled.safetensors", "fp8_scaled")
    write_gguf(nano_state, tmp_path / "krea2-Q8_0.gguf", kquant=None)
    te = tmp_path / "te-fp8"  # the nano text encoder folder with its weights in fp8_scaled
    te.mkdir()
    nano_te = NANO_DIT.parents[1] / "text_encoder"
    for f in ("krea2kit.json", "tokenizer.json", "tokenizer_config.json"):
        (te / f).write_bytes((nano_te / f).read_bytes())
    write_comfy_text_encoder(nano_te / "model.safetensors", te / "model.safetensors")
    images = {}
    for name, dit in (("plain", None), ("fp8", "krea2_fp8_scaled.safetensors"), ("q8", "krea2-Q8_0.gguf"),
                      ("te", None)):
        args = ["run", "r.toml", "-q", "--set", f'output.name="{name}"']
        if dit:
            args += ["--set", f'model.weights.dit="{tmp_path / dit}"']
        if name == "te":
            args += ["--set", f'model.weights.text_encoder="{te}"']
        res = cli(*args)
        assert res.code == 0, res.stderr
        images[name] = _pixels(tmp_path / res.stdout.strip())
    plain = images["plain"][0]
    for name, storage in (("fp8", "fp8_scaled"), ("q8", "gguf-Q8_0"), ("te", None)):
        px, meta = images[name]
        diff = abs(px - plain)
        # Measured on the nano Turbo v2, 128x128, 3 steps: fp8_scaled mean 0.32 levels with 0.61 % of
        # the pixels off by more than 16 (an edge moved by a pixel: v2 draws sharp shapes, so one
        # such pixel can differ by 60 levels; v1's blobs kept every pixel within 1), Q8_0 mean 0.11
        # and 0.08 %, the fp8_scaled text encoder mean 0.09 and 0.16 %.
        moved = float((diff.max(-1) > 16).mean())
        print(f"{name}: mean {diff.mean():.3f} levels, max {diff.max()}, {moved:.2%} of pixels off by > 16")
        assert diff.mean() < 0.5 and moved <= 0.02, (name, diff.max(), diff.mean(), moved)
        if storage:
            assert f"storage={storage} " in meta["weights"]["dit"]["identity"] + " "


def test_cli_refuses_an_unknown_quantized_layout_with_exit_4(cli_inproc, tmp_path, nano_state):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = {"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in nano_state.items()}
    out["model.diffusion_model.blocks.0.attn.wq.comfy_quant"] = torch.tensor(list(b'{"format": "awq_w4a16"}'),
                                                                              dtype=torch.uint8)
    save_file(out, str(tmp_path / "odd.safetensors"))
    res = cli_inproc("run", "r.toml", "-q", "--set", f'model.weights.dit="{tmp_path / "odd.safetensors"}"')
    assert res.code == 4
    assert "odd.safetensors" in res.stderr and "'awq_w4a16' is not supported" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize("layout", ["fp8_scaled", "int8_convrot", "nvfp4", "gguf-Q8_0"])
def test_merging_a_lora_into_quantized_layers_dequantizes_adds_and_requantizes(tmp_path, nano_state, layout):
    from comfy_kitchen.tensor import QuantizedTensor

    from krea2kit.lora.formats import load_lora
    from krea2kit.lora.apply import merge_into

    if layout.startswith("gguf"):
        path = tmp_path / "nano.gguf"
        write_gguf(nano_state, path, kquant=None)
    else:
        path = tmp_path / "nano.safetensors"
        write_comfy(nano_state, path, layout)
    model = load_dit(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, 192, generator=g) * 0.2, torch.randn(192, 2, generator=g) * 0.2
    save_file({"lora_unet_blocks_0_attn_wq.lora_down.weight": down, "lora_unet_blocks_0_attn_wq.lora_up.weight": up,
               "lora_unet_blocks_0_attn_wq.alpha": torch.tensor(2.0)}, str(tmp_path / "l.safetensors"))
    mod = model.get_submodule("blocks.0.attn.wq")
    before, stored = mod.weight, mod.storage_state()
    merged_w = before.clone().addmm_(up, down, alpha=0.7)  # as merge_into forms it (alpha / rank = 1)
    with merge_into(model, load_lora(tmp_path / "l.safetensors"), 0.7) as merged:
        assert merged.modules == ["blocks.0.attn.wq"]
        assert isinstance(mod, QuantLinear)  # still quantized storage, re-quantized from the merged weight
        if layout.startswith("gguf"):
            want = torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(merged_w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                gguf.GGMLQuantizationType.Q8_0).copy())
        else:
            conf, layout_cls, kwargs = COMFY_LAYOUTS[layout]
            kwargs = {"scale": "recalculate"} if layout == "fp8_scaled" else kwargs
            want = QuantizedTensor.from_float(merged_w, layout_cls, **kwargs).dequantize()
        assert torch.equal(mod.weight, want)
        assert ((mod.weight - merged_w).abs().max() < (before - merged_w).abs().max())
    # restore puts the stored tensors back bit for bit
    assert all(torch.equal(mod._buffers[n].reshape(-1).view(torch.uint8), stored[n].reshape(-1).view(torch.uint8))
               for n in stored)


def test_plain_fp8_casts_load_as_comfyui_upcasts_them(tmp_path, nano_state):
    # Files cast straight to fp8 (no scale, no format): ComfyUI upcasts the weight as it is.
    qmods = set(quantized_modules(nano_state))
    out = {k: (v.to(torch.float8_e4m3fn) if k[: -len(".weight")] in qmods else v) for k, v in nano_state.items()}
    save_file(out, str(tmp_path / "cast.safetensors"))
    model = load_dit(tmp_path / "cast.safetensors", dtype=torch.bfloat16)
    assert model.storage_layout == "fp8"
    for stem in qmods:
        mod = model.get_submodule(stem)
        assert mod.storage_names == ["qweight"]
        assert torch.equal(mod.weight, out[stem + ".weight"].to(torch.bfloat16)), stem
