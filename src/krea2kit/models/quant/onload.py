"""Quantize a full-precision file while loading it: the transformer (``model.weights_dtype``)
and the Qwen3-VL text tower (``model.text_encoder_weights_dtype``), ``"fp8"`` or ``"int8"``.

Tensors are read one at a time with plain file reads (no memory map, so file pages never
count in the process's resident size), each quantizable Linear is quantized by comfy-kitchen
as ComfyUI re-quantizes weights (fp8: per-tensor scale ``amax / 448``; int8: per-row scales with
the ConvRot group rotation where the width allows, as Comfy-Org's ``int8_convrot`` files),
and the full-precision tensor is dropped before the next is read. Peak host memory is the
quantized model plus one full-precision tensor. What every community quantizer keeps in
full precision stays so (:data:`krea2kit.models.quant.KEEP_FULL_PRECISION`, norms, modulations).
In the text tower only the decoder layers' Linears are quantized (q/k/v/o, gate/up/down); the
embedding table and the norms stay at the compute dtype, as a ComfyUI fp8 text-encoder file
holds them once loaded (that file stores the table in fp8 too, but krea2kit, like ComfyUI's
non-Linear ops, dequantizes the table whole at load: quantizing it would save nothing resident).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from krea2kit.errors import WeightsError
from krea2kit.models.quant import keeps_full_precision
from krea2kit.models.quant.linear import QuantLinear

#: recipe value -> ComfyUI layer format written / computed.
WEIGHTS_DTYPES = {
    "fp8": {"format": "float8_e4m3fn"},
    "int8": {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256},
}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def stream_tensors(ckpt, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` from safetensors files by ``pread`` in file order: no memory map."""
    wanted = set(keys)
    for f in ckpt.files():
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            entries = sorted((v["data_offsets"][0], k) for k, v in header.items() if k in wanted)
            for begin, k in entries:
                info = header[k]
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise WeightsError(f"{k} is stored as {info['dtype']}; quantizing on load needs a bf16/fp16/fp32 file",
                                       file=str(f), key=k)
                size = info["data_offsets"][1] - begin
                buf = bytearray(size)
                fh.seek(8 + n + begin)
                if fh.readinto(buf) != size:
                    raise WeightsError("truncated tensor data", file=str(f), key=k)
                t = torch.frombuffer(buf, dtype=dtype) if size else torch.empty(0, dtype=dtype)
                yield k, t.reshape(info["shape"])


def _codec_conf(weights_dtype: str, in_features: int) -> dict:
    conf = dict(WEIGHTS_DTYPES[weights_dtype])
    if conf.get("convrot") and in_features % conf["convrot_groupsize"]:
        conf = {"format": "int8_tensorwise"}  # the rotation needs whole groups: plain per-row int8
    return conf


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the system (glibc): the per-tensor temporaries come in many
    sizes and would otherwise stay mapped, so the peak would grow with the model."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# Rows quantized per call: bounds the float temporaries (abs, scaled copy, rotation) to a few MB
# whatever the tensor's size (a 151k x 2560 embedding would otherwise take 1.5 GB of fp32 copies).
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(weight: torch.Tensor) -> Iterator[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[-1]))
    for start in range(0, weight.shape[0], rows):
        yield slice(start, start + rows)


def _quantize(codec, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """ComfyUI's quantization of one (out, in) weight, a block of rows at a time. Both formats
    are row-separable, so the result is bit-identical to quantizing the whole tensor: int8 has a
    scale per row (the ConvRot rotation mixes columns within a row); fp8 has one scale, the
    tensor's amax / 448, taken exactly over all chunks first."""
    from comfy_kitchen.tensor import QuantizedTensor

    if codec.format == "int8_tensorwise":
        kwargs = {"per_channel": True, "convrot": codec.convrot, "convrot_groupsize": codec.convrot_groupsize}
    else:
        # in the weight's own dtype, as comfy-kitchen divides (a bf16 scale, then widened)
        amax = torch.stack([weight[rows].abs().amax() for rows in _row_chunks(weight)]).amax()
        kwargs = {"scale": amax / torch.finfo(torch.float8_e4m3fn).max}
    qdata, scales = None, []
    for rows in _row_chunks(weight):
        qt = QuantizedTensor.from_float(weight[rows], codec.layout_cls, **kwargs)
        if qdata is None:
            qdata = torch.empty(weight.shape, dtype=qt._qdata.dtype)
        qdata[rows] = qt._qdata
        scales.append(qt._params.scale.float())
    if qdata is None:  # no rows at all
        qt = QuantizedTensor.from_float(weight, codec.layout_cls, **kwargs)
        return {"qweight": qt._qdata.contiguous(), "weight_scale": qt._params.scale.float().contiguous()}
    scale = torch.cat(scales) if codec.format == "int8_tensorwise" else scales[0]
    return {"qweight": qdata, "weight_scale": scale.contiguous()}


def _require_quantizer(file: str, weights_dtype: str) -> None:
    """comfy-kitchen makes the storage: without it, one message naming the extra."""
    from krea2kit.models.quant.comfy import EXTRA_HINT

    try:
        from comfy_kitchen.tensor import QuantizedTensor  # noqa: F401
    except ImportError:
        raise WeightsError(f"quantizing to {weights_dtype} while loading needs comfy-kitchen, which is not installed",
                           file=file, hint=EXTRA_HINT) from None


def _swap_in_quant_linears(model: nn.Module, quantize, weights_dtype: str, compute) -> dict[str, QuantLinear]:
    """Replace each Linear of ``model`` (on meta) whose name ``quantize(name)`` accepts by an
    empty meta :class:`QuantLinear` in ``weights_dtype``'s ComfyUI format."""
    from krea2kit.models.quant.comfy import ComfyCodec

    quant: dict[str, QuantLinear] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and quantize(name):
            codec = ComfyCodec(_codec_conf(weights_dtype, mod.in_features))
            new = QuantLinear(mod.in_features, mod.out_features, mod.bias is not None, codec, compute, device="meta")
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            quant[name] = new
    return quant


def _store_quantized(model: nn.Module, module: str, qmod: QuantLinear, tensor: torch.Tensor, *, file: str, key: str,
                     device) -> None:
    """Quantize one full-precision (out, in) weight into ``qmod``'s storage buffers."""
    from krea2kit.models.weights import set_tensor

    if tuple(tensor.shape) != (qmod.out_features, qmod.in_features):
        raise WeightsError(f"shape mismatch for {key}: {tuple(tensor.shape)}, the model expects "
                           f"{(qmod.out_features, qmod.in_features)}", file=file, key=key)
    for buf, t in _quantize(qmod.codec, tensor).items():
        set_tensor(model, f"{module}.{buf}", t.to(device))


def _storage_layout(quant: dict[str, QuantLinear]) -> str:
    """What the images record: the layouts made, e.g. ``fp8_scaled (quantized on load)``."""
    return "+".join(sorted({q.storage_layout for q in quant.values()})) + " (quantized on load)"


def load_dit_quantizing(path: str | os.PathLike, weights_dtype: str, *, config=None, dtype=None, device="cpu",
                        keep_norms_fp32: bool = True):
    """A transformer from a bf16/fp16/fp32 file (native, ComfyUI or diffusers layout), its
    Linears quantized to ``weights_dtype`` ("fp8" or "int8") while streaming."""
    from krea2kit.models.dit import build_meta
    from krea2kit.models.dit_loader import detect_layout, diffusers_to_native, dit_config_from_checkpoint
    from krea2kit.models.weights import mismatch_message, open_checkpoint, set_tensor
    from krea2kit.models.quant.detect import detect_quantization

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(WEIGHTS_DTYPES)}, not {weights_dtype!r}")
    p = Path(path).expanduser()
    ckpt = open_checkpoint(p, what="transformer weights")
    _require_quantizer(str(p), weights_dtype)
    if detect_quantization(ckpt) is not None:
        raise WeightsError("this file is already quantized", file=str(p),
                           hint="load it as it is (leave out the weights dtype), or point at the bf16 file")
    layout, prefix = detect_layout(ckpt.keys())
    cfg = config or dit_config_from_checkpoint(ckpt)
    compute = dtype or torch.bfloat16

    def key_map(k: str) -> str | None:
        if not k.startswith(prefix):
            return None
        rest = k[len(prefix):]
        if layout == "diffusers":
            try:
                return diffusers_to_native(rest)
            except KeyError:
                return "<unknown>." + k
        return rest

    model = build_meta(cfg)
    quant = _swap_in_quant_linears(model, lambda name: not keeps_full_precision(name), weights_dtype, compute)
    expected = dict(model.state_dict(keep_vars=True))
    names = {f"{n}.weight": f"{n}.qweight" for n in quant}
    plan = {}
    for k in ckpt.keys():
        mk = key_map(k)
        if mk is not None:
            plan[k] = names.get(mk, mk)
    unexpected = [k for k, mk in plan.items() if mk not in expected]
    covered = set(plan.values()) | {f"{n}.weight_scale" for n in quant}
    missing = [mk for mk in expected if mk not in covered]
    if missing or unexpected:
        raise WeightsError(mismatch_message("transformer weights", missing, unexpected), file=str(p))

    for k, tensor in stream_tensors(ckpt, plan):
        mk = plan[k]
        module, _, leaf = mk.rpartition(".")
        if leaf == "qweight":
            _store_quantized(model, module, quant[module], tensor, file=str(p), key=k, device=device)
            del tensor
            _give_back_freed_memory()
            continue
        if layout == "diffusers" and leaf == "lin" and module.endswith(".mod"):
            tensor = tensor.reshape(-1)  # scale_shift_table (6, F) -> mod.lin (6F,)
        if tuple(tensor.shape) != tuple(expected[mk].shape):
            raise WeightsError(f"shape mismatch for {k}: the file has {tuple(tensor.shape)}, the model expects "
                               f"{tuple(expected[mk].shape)}", file=str(p), key=k)
        if tensor.is_floating_point():
            if module in quant:  # a quantized layer's bias computes with it
                tensor = tensor.to(compute)
            elif dtype is not None:
                tensor = tensor.to(torch.float32 if keep_norms_fp32 and leaf == "scale" else dtype)
        set_tensor(model, mk, tensor.to(device=device, copy=True))  # never a view of the read buffer
    model.eval().requires_grad_(False)
    model.storage_layout = _storage_layout(quant)
    return model


def fill_text_tower_quantizing(tower: nn.Module, ckpt, weights_dtype: str, *, key_map, ignore, dtype,
                               device="cpu", quantize) -> nn.Module:
    """The Qwen3-VL text tower (built on meta) from a bf16/fp16/fp32 file, the Linears that
    ``quantize(module_name)`` accepts quantized to ``weights_dtype`` while streaming.

    key_map / ignore: as for :func:`krea2kit.models.weights.assign_weights` (file key -> tower
        key or ``None``; file keys expected but never read: the vision tower, deeper layers).
    dtype: the compute dtype of the quantized layers and the dtype every other floating
        tensor (embedding, norms) is cast to.
    """
    from krea2kit.models.weights import guess_checkpoint_kind, mismatch_message, set_tensor

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(WEIGHTS_DTYPES)}, not {weights_dtype!r}")
    file = str(ckpt.path)
    _require_quantizer(file, weights_dtype)
    quant = _swap_in_quant_linears(tower, quantize, weights_dtype, dtype)
    expected = dict(tower.state_dict(keep_vars=True))
    names = {f"{n}.weight": f"{n}.qweight" for n in quant}
    plan: dict[str, str] = {}
    unexpected: list[str] = []
    for k in ckpt.keys():
        if ignore(k):
            continue
        mk = key_map(k)
        if mk is None:
            continue
        mk = names.get(mk, mk)
        if mk in expected:
            plan[k] = mk
        else:
            unexpected.append(k)
    covered = set(plan.values()) | {f"{n}.weight_scale" for n in quant}
    missing = [mk for mk in expected if mk not in covered]
    if missing or unexpected:
        raise WeightsError(mismatch_message("text-encoder weights", missing, unexpected), file=file,
                           hint=f"this file looks like {guess_checkpoint_kind(ckpt.keys())}")
    for k, mk in plan.items():  # every shape before the first tensor is read
        module, _, leaf = mk.rpartition(".")
        want = (quant[module].out_features, quant[module].in_features) if leaf == "qweight" else expected[mk].shape
        if tuple(ckpt.infos[k].shape) != tuple(want):
            raise WeightsError(f"shape mismatch for {k}: the file has {tuple(ckpt.infos[k].shape)}, the model "
                               f"expects {tuple(want)}", file=file, key=k,
                               hint="the checkpoint and the model config disagree; check the config.json")
    for k, tensor in stream_tensors(ckpt, plan):
        mk = plan[k]
        module, _, leaf = mk.rpartition(".")
        if leaf == "qweight":
            _store_quantized(tower, module, quant[module], tensor, file=file, key=k, device=device)
            del tensor
            _give_back_freed_memory()
            continue
        cast = dtype if tensor.is_floating_point() else tensor.dtype
        set_tensor(tower, mk, tensor.to(device=device, dtype=cast, copy=True))  # never a view of the read buffer
    tower.eval().requires_grad_(False)
    tower.storage_layout = _storage_layout(quant)
    return tower
