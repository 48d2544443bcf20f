"""Writers of tiny transformers in the community quantized layouts, for the tests.

ComfyUI layouts are written by comfy-kitchen itself (``QuantizedTensor.from_float`` and its
``state_dict``, the code ComfyUI saves with) plus the per-layer format as ComfyUI records it
(``comfy_quant`` U8-JSON tensors, or ``_quantization_metadata`` in the header, or the legacy
``scaled_fp8`` marker with ``scale_weight``). GGUF files are written by ``gguf.GGUFWriter``;
Q8_0 blocks by ``gguf.quants.quantize``, K-quant blocks (which the package can read but not
write) as valid random blocks of the documented size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from krea2kit.models.quant import keeps_full_precision

COMFY_PREFIX = "model.diffusion_model."

#: test name -> (ComfyUI format JSON, comfy-kitchen layout, quantize kwargs)
COMFY_LAYOUTS = {
    "fp8_scaled": ({"format": "float8_e4m3fn"}, "TensorCoreFP8Layout", {}),
    "int8_convrot": ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}, "TensorWiseINT8Layout",
                     {"per_channel": True, "convrot": True, "convrot_groupsize": 64}),
    "int8": ({"format": "int8_tensorwise"}, "TensorWiseINT8Layout", {"per_channel": True}),
    "mxfp8": ({"format": "mxfp8"}, "TensorCoreMXFP8Layout", {}),
    "nvfp4": ({"format": "nvfp4"}, "TensorCoreNVFP4Layout", {}),
}


def quantized_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The Linears a community quantizer converts: 2-D weights outside the keep list."""
    return sorted(k[: -len(".weight")] for k, v in state.items()
                  if k.endswith(".weight") and v.ndim == 2 and not keeps_full_precision(k[: -len(".weight")]))


def write_comfy(state: dict[str, torch.Tensor], path: Path, layout: str, *, where: str = "tensor",
                prefix: str = COMFY_PREFIX) -> dict[str, "object"]:
    """Save native-keyed fp32 ``state`` as a ComfyUI quantized file; returns the QuantizedTensor
    of each quantized module (the oracle). ``where``: "tensor" (comfy_quant), "header"
    (_quantization_metadata) or "legacy" (scaled_fp8 marker; fp8 only)."""
    from comfy_kitchen.tensor import QuantizedTensor

    conf, layout_cls, kwargs = COMFY_LAYOUTS[layout]
    qmods = set(quantized_modules(state))
    out: dict[str, torch.Tensor] = {}
    oracle = {}
    layers = {}
    for k, v in state.items():
        stem = k[: -len(".weight")] if k.endswith(".weight") else None
        if stem in qmods:
            qt = QuantizedTensor.from_float(v.float(), layout_cls, **kwargs)
            oracle[stem] = qt
            for sk, sv in qt.state_dict(prefix + stem + ".weight").items():
                if where == "legacy" and sk.endswith(".weight_scale"):
                    sk = sk[: -len(".weight_scale")] + ".scale_weight"
                out[sk] = sv.contiguous()
            if where == "tensor":
                out[prefix + stem + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
            layers[prefix + stem] = conf
        else:
            out[prefix + k] = v.to(torch.bfloat16) if v.ndim == 2 else v.float()
    metadata = {}
    if where == "header":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    if where == "legacy":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(path), metadata=metadata)
    return oracle


def _k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant blocks: finite f16 super-scales, random 6-bit scales and codes."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scales = np.array([0.002, 0.001], dtype=np.float16).view(np.uint8)  # d, dmin
    raw[..., :4] = scales
    return raw.reshape(rows, cols // block * nbytes)


def write_gguf(state: dict[str, torch.Tensor], path: Path, *, kquant: str | None = "Q4_K", seed: int = 0,
               shape_fix: bool = False, tables: bool = False) -> None:
    """Save native-keyed ``state`` as a GGUF file: quantized Linears in Q8_0, and in ``kquant``
    where the row length allows 256-value blocks; the rest F32 (as ComfyUI-GGUF's converter).
    ``shape_fix``: as that converter does for some architectures, store a quantized weight whose
    rows are not whole 256-blocks as (n / 256, 256) with ``comfy.gguf.orig_shape.<name>``.
    ``tables``: also store the modulation tables (``mod.lin``) in Q8_0."""
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    qmods = set(quantized_modules(state))
    writer = gguf.GGUFWriter(str(path), arch="krea2")
    for k, v in state.items():
        arr = v.float().numpy()
        stem = k[: -len(".weight")] if k.endswith(".weight") else None
        if stem in qmods:
            if shape_fix and arr.shape[1] % 256 and arr.size % 256 == 0:
                writer.add_array(f"comfy.gguf.orig_shape.{k}", [int(d) for d in arr.shape])
                arr = arr.reshape(-1, 256)
            rows, cols = arr.shape
            if kquant and cols % 256 == 0:
                qt = Q[kquant]
                data = _k_quant_blocks(rows, cols, qt, rng)
            else:
                qt = Q.Q8_0
                data = quantize(arr, qt)
            writer.add_tensor(k, data, raw_shape=data.shape, raw_dtype=qt)
        elif tables and k.endswith("mod.lin") or tables and k.endswith("modulation.lin"):
            data = quantize(arr, Q.Q8_0)
            writer.add_tensor(k, data, raw_shape=data.shape, raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(k, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_comfy_text_encoder(source: Path, path: Path) -> dict[str, "object"]:
    """The Qwen3-VL tower at ``source`` re-saved as ComfyUI's fp8_scaled text encoders are: every
    projection and the embedding table fp8 with a per-tensor scale and a ``comfy_quant`` format,
    norms bf16. Returns the comfy-kitchen QuantizedTensor of each quantized tensor (the oracle)."""
    from comfy_kitchen.tensor import QuantizedTensor
    from safetensors.torch import load_file

    fmt = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    out, oracle = {}, {}
    for k, v in load_file(str(source)).items():
        stem = k[: -len(".weight")]
        if v.ndim == 2 and ("_proj" in k or "embed_tokens" in k):
            qt = QuantizedTensor.from_float(v.float(), "TensorCoreFP8Layout")
            oracle[stem] = qt
            out.update({sk: sv.contiguous() for sk, sv in qt.state_dict(k).items()})
            out[stem + ".comfy_quant"] = fmt.clone()
        else:
            out[k] = v.to(torch.bfloat16)
    save_file(out, str(path))
    return oracle
