"""How quantized layers compute (``model.quant_compute``): the fp8 ``torch._scaled_mm`` and int8
``torch._int_mm`` paths against the dequantize path and comfy-kitchen, the choice per device
(capabilities faked), and the path recorded in each image's metadata.

torch 2.13 runs ``_scaled_mm`` and ``_int_mm`` on the CPU, so both fast paths are checked here
on random weights; the CUDA checks run where a GPU is present."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("comfy_kitchen")

from krea2kit.errors import Krea2kitError  # noqa: E402
from krea2kit.models.quant import linear  # noqa: E402
from krea2kit.models.quant.comfy import ComfyCodec  # noqa: E402
from krea2kit.models.quant.linear import (DEQUANTIZE, FP8_MM, INT8_MM, QuantLinear, quant_compute,  # noqa: E402
                                          select_path)
from krea2kit.models.quant.onload import _codec_conf, _quantize  # noqa: E402

FP8 = {"format": "float8_e4m3fn"}
INT8_CONVROT = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
INT8_ROWS = {"format": "int8_tensorwise"}


def _layer(conf: dict, out_f: int, in_f: int, *, dtype=torch.float32, seed: int = 0, bias: bool = True) -> QuantLinear:
    """A QuantLinear holding a random (out, in) weight quantized as on load (comfy-kitchen)."""
    g = torch.Generator().manual_seed(seed)
    codec = ComfyCodec(conf)
    layer = QuantLinear(in_f, out_f, bias, codec, dtype)
    weight = torch.randn(out_f, in_f, generator=g) * 0.05
    for name, t in _quantize(codec, weight).items():
        layer._buffers[name] = t
    if bias:
        layer.bias.data = torch.randn(out_f, generator=g).to(dtype)
    return layer


def _inputs(*shape: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 0, :] *= 20  # one token far larger than the others: per-token scales must keep the rest
    return x.to(dtype)


def _run(layer: QuantLinear, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, set[str]]:
    with quant_compute(mode) as used:
        return layer(x), used


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- the fast paths on this machine's CPU ----------------------------------------------------

needs_cpu_fp8 = pytest.mark.skipif(not linear.cpu_runs("fp8"), reason="this torch has no CPU _scaled_mm")
needs_cpu_int8 = pytest.mark.skipif(not linear.cpu_runs("int8"), reason="this torch has no CPU _int_mm")


@needs_cpu_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", [(256, 512), (96, 160)])
def test_fp8_scaled_mm_is_close_to_the_dequantize_path(dtype, out_f, in_f):
    layer = _layer(FP8, out_f, in_f, dtype=dtype)
    x = _inputs(2, 33, in_f, dtype=dtype)
    fast, used = _run(layer, x, "scaled-mm")
    slow, used_slow = _run(layer, x, "dequantize")
    assert used == {FP8_MM} and used_slow == {DEQUANTIZE}
    assert fast.dtype == x.dtype and fast.shape == slow.shape
    # The activations are rounded to fp8 e4m3 (3 mantissa bits) on top of the weights. Measured
    # (CPU, torch 2.13): 2.5-2.6 % relative error (fp32 compute), 2.5-2.7 % (bf16); the same
    # weights' fp8 rounding alone costs about as much against the full-precision layer.
    assert _rel(fast - layer.bias, slow - layer.bias) < 0.04


@needs_cpu_fp8
def test_fp8_scaled_mm_applies_one_scale_per_token_and_the_weight_scale():
    """Against the arithmetic written out: each token quantized with amax / 448, the fp8
    product accumulated exactly, both scales applied (float64 reference)."""
    layer = _layer(FP8, 64, 128, bias=False)
    x = _inputs(9, 128)
    fast, _ = _run(layer, x, "scaled-mm")
    x_scale = x.abs().amax(dim=-1, keepdim=True) / 448.0
    xq = (x / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * x_scale.double()
    w = layer._buffers["qweight"].double() * layer._buffers["weight_scale"].double()
    ref = xq @ w.T
    assert _rel(fast, ref) < 1e-5  # fp32 accumulation and output only (measured 1.8e-7)
    # One scale for the whole call would push the ordinary tokens of a call holding a token
    # 10^5 times larger into fp8's subnormals; per token they keep their 3 mantissa bits.
    x[0] *= 1e5 / 20
    fast, _ = _run(layer, x, "scaled-mm")
    amax = x.abs().amax()
    one_scale = (x / (amax / 448.0)).clamp(-448, 448).to(torch.float8_e4m3fn).double() * (amax.double() / 448.0)
    exact = x[1:].double() @ w.T
    per_token, per_call = _rel(fast[1:], exact), _rel((one_scale @ w.T)[1:], exact)
    # measured: 2.4 % per token, 39 % with one scale for the call
    assert per_token < 0.04 and per_call > 4 * per_token, (per_token, per_call)


@needs_cpu_int8
@pytest.mark.parametrize("conf,in_f", [(INT8_CONVROT, 512), (INT8_ROWS, 96)])
def test_int8_int_mm_is_comfyuis_int8_linear_and_close_to_dequantize(conf, in_f):
    from comfy_kitchen.tensor import QuantizedTensor, get_layout_class

    layer = _layer(conf, 128, in_f)
    x = _inputs(3, 17, in_f)
    fast, used = _run(layer, x, "scaled-mm")
    slow, _ = _run(layer, x, "dequantize")
    assert used == {INT8_MM}
    # ComfyUI computes an int8 layer as F.linear on a comfy-kitchen QuantizedTensor: bit for bit
    params = get_layout_class("TensorWiseINT8Layout").Params(
        scale=layer._buffers["weight_scale"], orig_dtype=torch.float32, orig_shape=(128, in_f),
        convrot=layer.codec.convrot, convrot_groupsize=layer.codec.convrot_groupsize)
    oracle = torch.nn.functional.linear(x, QuantizedTensor(layer._buffers["qweight"], "TensorWiseINT8Layout", params),
                                        layer.bias)
    assert torch.equal(fast, oracle)
    # per-token int8 activations: measured 0.75 % (ConvRot, 512 wide) and 0.64 % (per-row, 96)
    assert _rel(fast - layer.bias, slow - layer.bias) < 0.012


@needs_cpu_fp8
@needs_cpu_int8
@pytest.mark.parametrize("conf", [FP8, INT8_CONVROT])
def test_token_blocks_change_nothing_and_the_input_is_left_alone(monkeypatch, conf):
    """The fast paths run the sequence in token blocks (bounded temporaries): per-token scales
    make any blocking give the same result up to the summation order of the float GEMMs (fp8's
    product, int8's ConvRot rotation), which depends on the number of rows: measured 5e-8
    relative. Their in-place arithmetic never reaches the input."""
    layer = _layer(conf, 64, 256)
    x = _inputs(3, 50, 256)
    before = x.clone()
    whole, _ = _run(layer, x, "scaled-mm")
    assert torch.equal(x, before)
    monkeypatch.setattr(linear, "ROW_BLOCK_ELEMENTS", 256 * 7)  # blocks of 7 tokens, the last one short
    assert list(layer._row_blocks(150))[-1] == slice(147, 150)
    blocked, _ = _run(layer, x, "scaled-mm")
    assert torch.equal(x, before)
    assert _rel(blocked, whole) < 1e-6


@needs_cpu_fp8
@needs_cpu_int8
@pytest.mark.parametrize("weights_dtype", ["fp8", "int8"])
def test_runtime_loras_ride_on_the_matmul_paths(tmp_path, weights_dtype):
    """A runtime LoRA hooks the quantized layer's output whatever path computed it: on the
    nano Turbo quantized on load, LoRA on the matmul path is as close to LoRA on the
    dequantize path as the bare models are, and detaching restores the output exactly."""
    from pathlib import Path

    from safetensors.torch import save_file

    import krea2kit
    from krea2kit.lora.apply import attach_adapters
    from krea2kit.lora.formats import load_lora
    from krea2kit.models.quant.onload import load_dit_quantizing

    model = load_dit_quantizing(Path(krea2kit.__file__).parent / "nano" / "weights" / "turbo" / "model.safetensors",
                                weights_dtype, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    lora = {}
    for name, (o, i) in {"blocks.0.attn.wq": (192, 192), "blocks.1.mlp.down": (192, 512)}.items():
        key = "lora_unet_" + name.replace(".", "_")
        lora[key + ".lora_down.weight"] = torch.randn(4, i, generator=g) * 0.3
        lora[key + ".lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.3
        lora[key + ".alpha"] = torch.tensor(4.0)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 16, cfg.in_features, generator=g)
    txt = torch.randn(1, 7, cfg.txtlayers, cfg.txtdim, generator=g)

    def velocity(mode: str) -> tuple[torch.Tensor, set[str]]:
        with torch.no_grad(), quant_compute(mode) as used:
            return model(img, torch.tensor([0.6]), txt, None, (4, 4)), used

    plain_fast, used = velocity("scaled-mm")
    plain_slow, _ = velocity("dequantize")
    assert used == {FP8_MM if weights_dtype == "fp8" else INT8_MM}
    with attach_adapters(model, [(load_lora(tmp_path / "lora.safetensors"), 0.8)]):
        lora_fast, _ = velocity("scaled-mm")
        lora_slow, _ = velocity("dequantize")
    # With the LoRA the two paths stay as close as without it. Measured: 2.0 % with the LoRA,
    # 2.2 % without (fp8); 0.71 % and 0.69 % (int8). The LoRA moves the output by ~100 %.
    assert _rel(lora_fast, lora_slow) < 1.5 * _rel(plain_fast, plain_slow) + 1e-3
    assert _rel(lora_fast - plain_fast, plain_fast) > 0.5
    assert torch.equal(velocity("scaled-mm")[0], plain_fast)  # detached


def test_layouts_without_a_matmul_and_the_dequantize_mode_dequantize():
    layer = _layer(FP8, 64, 64)
    x = _inputs(5, 64)
    out, used = _run(layer, x, "dequantize")
    assert used == {DEQUANTIZE}
    assert torch.equal(out, torch.nn.functional.linear(x, layer.dequantized(), layer.bias))
    mx = ComfyCodec({"format": "mxfp8"})
    assert select_path(mx, 64, 64, device_type="cpu", capability=None, mode="scaled-mm") == DEQUANTIZE
    assert select_path(mx, 64, 64, device_type="cuda", capability=(10, 0), mode="auto") == DEQUANTIZE


def test_a_matmul_torch_refuses_falls_back_under_auto_and_is_named_when_forced(monkeypatch):
    layer = _layer(FP8, 64, 64)
    x = _inputs(4, 64)
    monkeypatch.setattr(linear, "select_path", lambda *a, **k: FP8_MM)

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    out, used = _run(layer, x, "auto")
    assert used == {DEQUANTIZE}
    assert torch.equal(out, torch.nn.functional.linear(x, layer.dequantized(), layer.bias))
    assert layer.compute_path(x.device, "auto") == DEQUANTIZE  # remembered: not tried again
    with pytest.raises(Krea2kitError) as info:
        _run(layer, x, "scaled-mm")
    assert info.value.key == "model.quant_compute" and "no kernel" in str(info.value)


# -- the choice per device (capabilities faked) ---------------------------------------------

@pytest.mark.parametrize("conf,device,capability,mode,expected", [
    (FP8, "cuda", (9, 0), "auto", FP8_MM),        # Hopper
    (FP8, "cuda", (8, 9), "auto", FP8_MM),        # Ada: the first with fp8 tensor cores
    (FP8, "cuda", (8, 6), "auto", DEQUANTIZE),    # Ampere: no fp8 matmul
    (INT8_CONVROT, "cuda", (8, 6), "auto", INT8_MM),
    (INT8_ROWS, "cuda", (7, 5), "auto", INT8_MM),  # Turing: int8 tensor cores
    (INT8_ROWS, "cuda", (7, 0), "auto", DEQUANTIZE),
    (FP8, "cuda", (9, 0), "dequantize", DEQUANTIZE),
    (FP8, "cpu", None, "auto", DEQUANTIZE),        # CPU: dequantize unless asked (module docstring)
    (INT8_CONVROT, "cpu", None, "auto", DEQUANTIZE),
    (FP8, "mps", None, "auto", DEQUANTIZE),
    (INT8_ROWS, "mps", None, "auto", DEQUANTIZE),
])
def test_select_path(conf, device, capability, mode, expected):
    assert select_path(ComfyCodec(conf), 256, 512, device_type=device, capability=capability, mode=mode) == expected


def test_forcing_the_matmul_where_the_device_has_none_names_the_key():
    with pytest.raises(Krea2kitError) as info:
        select_path(ComfyCodec(FP8), 256, 512, device_type="cuda", capability=(8, 6), mode="scaled-mm")
    assert info.value.key == "model.quant_compute" and "sm_86" in str(info.value) and '"auto"' in info.value.hint
    with pytest.raises(Krea2kitError):
        select_path(ComfyCodec(INT8_ROWS), 256, 512, device_type="mps", capability=None, mode="scaled-mm")


def test_fp8_shapes_cublas_cannot_take_dequantize():
    assert select_path(ComfyCodec(FP8), 100, 512, device_type="cuda", capability=(9, 0), mode="auto") == DEQUANTIZE
    assert select_path(ComfyCodec(FP8), 512, 100, device_type="cuda", capability=(9, 0), mode="scaled-mm") == DEQUANTIZE


@pytest.mark.parametrize("runs", [True, False])
def test_forcing_on_the_cpu_follows_what_torch_runs(monkeypatch, runs):
    monkeypatch.setattr(linear, "cpu_runs", lambda kind: runs)
    if runs:
        assert select_path(ComfyCodec(FP8), 256, 512, device_type="cpu", capability=None, mode="scaled-mm") == FP8_MM
    else:
        with pytest.raises(Krea2kitError):
            select_path(ComfyCodec(FP8), 256, 512, device_type="cpu", capability=None, mode="scaled-mm")


def test_a_layer_decides_per_device_from_its_capability(monkeypatch):
    """QuantLinear asks the device it runs on (block swap moves layers between devices)."""
    seen = []
    monkeypatch.setattr(linear, "cuda_capability", lambda index: seen.append(index) or (8, 6))
    fp8, int8 = _layer(FP8, 256, 512), _layer(_codec_conf("int8", 512), 256, 512)
    cuda = torch.device("cuda", 0)
    assert fp8.compute_path(cuda, "auto") == DEQUANTIZE and int8.compute_path(cuda, "auto") == INT8_MM
    assert fp8.compute_path(torch.device("cpu"), "auto") == DEQUANTIZE
    assert fp8.compute_path(cuda, "auto") == DEQUANTIZE and seen == [0, 0]  # cached per layer and device


def test_capabilities_are_comfy_kitchens():
    from comfy_kitchen.tensor import get_layout_class

    assert linear.MIN_CAPABILITY["fp8"] == tuple(get_layout_class("TensorCoreFP8Layout").MIN_SM_VERSION)
    assert linear.MIN_CAPABILITY["int8"] == tuple(get_layout_class("TensorWiseINT8Layout").MIN_SM_VERSION)


def test_quant_compute_refuses_an_unknown_mode_and_describes_paths():
    with pytest.raises(ValueError):
        with quant_compute("fast"):
            pass
    assert linear.describe_paths({INT8_MM, DEQUANTIZE}) == "dequantize-per-layer+int8-int-mm"
    layer = _layer(FP8, 64, 64)
    layer(_inputs(2, 64))  # outside a quant_compute block: auto, nothing recorded, no error
    assert linear.current_mode() == "auto"
    linear.record_path("plugin-kernel")  # a no-op outside a block
    with quant_compute("dequantize") as used:
        assert linear.current_mode() == "dequantize"
        linear.record_path("plugin-kernel")  # a plugin part's own kernel
        with quant_compute("scaled-mm") as inner:
            assert linear.current_mode() == "scaled-mm"
        assert linear.current_mode() == "dequantize"
    assert used == {"plugin-kernel"} and inner == set()


# -- CUDA -----------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("conf,kind", [(FP8, "fp8"), (INT8_CONVROT, "int8")])
def test_cuda_fast_paths_are_close_to_dequantize(conf, kind):
    cap = torch.cuda.get_device_capability()
    if cap < linear.MIN_CAPABILITY[kind]:
        pytest.skip(f"{kind} matmul needs sm_{''.join(map(str, linear.MIN_CAPABILITY[kind]))}")
    layer = _layer(conf, 1024, 1024, dtype=torch.bfloat16).cuda()
    x = _inputs(2, 300, 1024, dtype=torch.bfloat16).cuda()
    fast, used = _run(layer, x, "auto")
    slow, _ = _run(layer, x, "dequantize")
    assert used <= {FP8_MM, linear.FP8_MM_TENSORWISE, INT8_MM} and used
    assert _rel(fast - layer.bias, slow - layer.bias) < (0.05 if kind == "fp8" else 0.02)


# -- the recipe key, the run and the metadata -----------------------------------------------

def _meta(tmp_path, stdout: str) -> tuple[dict, bytes]:
    from PIL import Image

    with Image.open(tmp_path / json.loads(stdout.splitlines()[0])["path"]) as im:
        return json.loads(im.info["krea2kit"]), im.convert("RGB").tobytes()


@pytest.mark.slow
@needs_cpu_fp8
@needs_cpu_int8
def test_cli_records_the_compute_path_beside_the_storage(cli_inproc, tmp_path):
    import numpy as np

    args = ["run", "--prompt", "a red ball", "--json", "--set", "model.weights_dtype=fp8",
            "--set", "model.text_encoder_weights_dtype=int8"]
    fast = cli_inproc(*args, "--set", "model.quant_compute=scaled-mm", "--set", "output.dir=fast")
    assert fast.code == 0, fast.stderr
    plain = cli_inproc(*args, "--set", "output.dir=plain")  # auto: the CPU dequantizes
    assert plain.code == 0, plain.stderr
    (meta, px), (meta_plain, px_plain) = _meta(tmp_path, fast.stdout), _meta(tmp_path, plain.stdout)
    dit, te = meta["weights"]["dit"], meta["weights"]["text_encoder"]
    assert dit["compute"] == FP8_MM
    assert dit["identity"].endswith("storage=fp8_scaled (quantized on load) compute=fp8-scaled-mm")
    assert te["compute"] == INT8_MM and te["identity"].endswith("(quantized on load) compute=int8-int-mm")
    assert meta["recipe"]["model"]["quant_compute"] == "scaled-mm"
    assert meta_plain["weights"]["dit"]["compute"] == DEQUANTIZE
    assert meta_plain["weights"]["dit"]["identity"].endswith("compute=dequantize-per-layer")
    diff = np.abs(np.frombuffer(px, np.uint8).astype(int) - np.frombuffer(px_plain, np.uint8).astype(int))
    # nano Turbo v2, 128x128, 8 steps, fp8 transformer and int8 text encoder: measured mean 0.17
    # levels between the two paths (activations rounded to fp8 / int8 in every layer), max 29 where
    # a sharp edge moved by a pixel (v1's blobs: max 9, mean 0.09)
    moved = float((diff.reshape(-1, 3).max(-1) > 16).mean())
    assert diff.mean() < 0.5 and moved <= 0.02, (diff.max(), diff.mean(), moved)


def test_a_bad_value_is_refused_naming_the_key(cli_inproc):
    res = cli_inproc("run", "--dry-run", "--prompt", "a cat", "--set", "model.quant_compute=fast")
    assert res.code == 2 and "model.quant_compute" in res.stderr and "Traceback" not in res.stderr


def test_forcing_on_a_device_without_the_matmul_is_refused_before_loading(cli_inproc, monkeypatch):
    import krea2kit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "pick_device", lambda requested: "mps")
    monkeypatch.setattr(pipeline.Pipeline, "part", lambda *a, **k: pytest.fail("a part was loaded"))
    res = cli_inproc("run", "--prompt", "a cat", "--set", "model.quant_compute=scaled-mm")
    assert res.code == 2, res.stderr
    assert "model.quant_compute" in res.stderr and "mps" in res.stderr and "Traceback" not in res.stderr


def test_an_images_recipe_cannot_choose_the_compute_path():
    """The path is the local device's business, as the device is: dropped from an image's recipe."""
    from krea2kit.recipe.trust import untrusted_recipe

    kept, dropped = untrusted_recipe({"prompt": "a cat", "model": {"quant_compute": "scaled-mm", "dtype": "bfloat16"}})
    assert "quant_compute" not in kept.get("model", {}) and kept["model"]["dtype"] == "bfloat16"
    assert "model.quant_compute" in dropped
