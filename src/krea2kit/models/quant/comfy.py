"""ComfyUI's per-layer quantized formats, dequantized by ``comfy-kitchen`` as ComfyUI does.

ComfyUI (``comfy/ops.py``, ``MixedPrecisionOps.Linear._load_from_state_dict``) wraps each
layer's storage in a comfy-kitchen ``QuantizedTensor`` whose ``orig_dtype`` is the compute
dtype, and its cast path calls ``QuantizedTensor.dequantize()``. :meth:`ComfyCodec.dequantize`
builds the same ``QuantizedTensor`` from the same tensors and calls the same method, so the
weights match ComfyUI's bit for bit (fp8: ``w.to(dtype) * scale.to(dtype)``; int8 ConvRot is
un-rotated; mxfp8/nvfp4 block scales are un-swizzled from the cuBLAS tile layout).
comfy-kitchen picks its eager (pure torch) backend on CPU and on GPUs without its kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from krea2kit.errors import WeightsError
from krea2kit.models.quant.detect import COMFY_FORMATS

if TYPE_CHECKING:  # pragma: no cover
    import torch

EXTRA_HINT = "install the optional extra: pip install 'krea2kit[quant]' (comfy-kitchen and gguf)"


def require_comfy_kitchen(file: str, layout: str):
    try:
        import comfy_kitchen  # noqa: F401
        from comfy_kitchen.tensor import QuantizedTensor  # noqa: F401
    except ImportError:
        raise WeightsError(f"this is a quantized ({layout}) file and comfy-kitchen is not installed",
                           file=file, hint=EXTRA_HINT) from None


def _roundup(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class ComfyCodec:
    """One layer's ComfyUI format: its storage tensors and how to dequantize them."""

    #: file suffix -> buffer name in :class:`~krea2kit.models.quant.linear.QuantLinear`.
    BUFFERS = {"weight": "qweight", "weight_scale": "weight_scale", "weight_scale_2": "weight_scale_2"}

    def __init__(self, conf: dict):
        import torch

        self.format = conf["format"]
        self.layout_cls = COMFY_FORMATS[self.format]
        self.convrot = bool(conf.get("convrot", False))
        self.convrot_groupsize = int(conf.get("convrot_groupsize", 256))
        self.unscaled = conf.get("_source") == "unscaled"
        self.storage_dtype = {
            "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "mxfp8": torch.float8_e4m3fn,
            "nvfp4": torch.uint8, "int8_tensorwise": torch.int8,
        }[self.format]

    @property
    def name(self) -> str:
        """The layout's usual name (as in Comfy-Org's file names)."""
        if self.format == "int8_tensorwise":
            return "int8_convrot" if self.convrot else "int8"
        if self.format.startswith("float8"):
            return "fp8" if self.unscaled else "fp8_scaled"
        return self.format

    def storage_shapes(self, out_f: int, in_f: int) -> dict[str, tuple[tuple[int, ...] | None, "torch.dtype"]]:
        """Buffer name -> (shape, dtype) of the stored tensors for an ``out_f x in_f`` weight.
        A shape of ``None`` is checked by the layout itself (block-scale tiles)."""
        import torch

        f = self.format
        if f.startswith("float8"):
            out = {"qweight": ((out_f, in_f), self.storage_dtype)}
            if not self.unscaled:
                out["weight_scale"] = (None, torch.float32)
            return out
        if f == "int8_tensorwise":
            return {"qweight": ((out_f, in_f), torch.int8), "weight_scale": (None, torch.float32)}
        if f == "mxfp8":
            return {"qweight": ((_roundup(out_f, 32), _roundup(in_f, 32)), self.storage_dtype),
                    "weight_scale": (None, torch.float8_e8m0fnu)}
        # nvfp4: two E2M1 values per byte, padded to 16 x 16.
        return {"qweight": ((_roundup(out_f, 16), _roundup(in_f, 16) // 2), torch.uint8),
                "weight_scale": (None, torch.float8_e4m3fn), "weight_scale_2": ((), torch.float32)}

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The (out, in) weight shape a stored weight implies (padding of real models is none)."""
        if self.format == "nvfp4" and len(stored) == 2:
            return (stored[0], stored[1] * 2)
        return tuple(stored)

    def prepare(self, buffer: str, tensor: "torch.Tensor", stored_dtype: str, *, file: str, key: str) -> "torch.Tensor":
        """A file tensor in the dtype ComfyUI reads it as (scales viewed, never converted)."""
        import torch

        want = self.storage_shapes(1, 1)[buffer][1]
        if tensor.dtype == want:
            return tensor
        if buffer == "qweight":
            raise WeightsError(f"format {self.format} stores weights as {want}, the file has {stored_dtype}",
                               file=file, key=key)
        if want in (torch.float8_e8m0fnu, torch.float8_e4m3fn) and tensor.element_size() == 1:
            return tensor.view(want)  # block scales saved as U8 bytes (ComfyUI views them)
        if want == torch.float32 and tensor.is_floating_point():
            return tensor.float()  # comfy-kitchen's Params cast the scale to fp32 as well
        raise WeightsError(f"scale stored as {stored_dtype}, format {self.format} needs {want}", file=file, key=key)

    def dequantize(self, storage: dict[str, "torch.Tensor"], shape: tuple[int, int], dtype: "torch.dtype") -> "torch.Tensor":
        """The (out, in) weight in ``dtype``, computed exactly as ComfyUI computes it."""
        import torch
        from comfy_kitchen.tensor import QuantizedTensor, get_layout_class

        q = storage["qweight"]
        layout = get_layout_class(self.layout_cls)
        if self.format.startswith("float8"):
            scale = storage.get("weight_scale")
            if scale is None:
                scale = torch.ones((), dtype=torch.float32, device=q.device)
            params = layout.Params(scale=scale, orig_dtype=dtype, orig_shape=shape)
        elif self.format == "int8_tensorwise":
            params = layout.Params(scale=storage["weight_scale"], orig_dtype=dtype, orig_shape=shape,
                                   convrot=self.convrot, convrot_groupsize=self.convrot_groupsize)
        elif self.format == "mxfp8":
            params = layout.Params(scale=storage["weight_scale"], orig_dtype=dtype, orig_shape=shape)
        else:
            params = layout.Params(scale=storage["weight_scale_2"], block_scale=storage["weight_scale"],
                                   orig_dtype=dtype, orig_shape=shape)
        return QuantizedTensor(q, self.layout_cls, params).dequantize()

    def quantize(self, weight: "torch.Tensor", storage: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """New storage for a changed (out, in) weight, quantized as ComfyUI re-quantizes a layer
        (``set_weight``: fp8 scale recalculated; int8 keeps per-row scales and the rotation)."""
        from comfy_kitchen.tensor import QuantizedTensor

        if self.format.startswith("float8") and self.unscaled:
            return {"qweight": weight.to(self.storage_dtype)}  # a plain cast, as it was stored
        if self.format.startswith("float8"):
            kwargs = {"scale": "recalculate"}
        elif self.format == "int8_tensorwise":
            per_row = self.convrot or storage["weight_scale"].numel() > 1
            kwargs = {"per_channel": per_row, "convrot": self.convrot, "convrot_groupsize": self.convrot_groupsize}
        else:
            kwargs = {}
        qt = QuantizedTensor.from_float(weight, self.layout_cls, **kwargs)
        out = {"qweight": qt._qdata.contiguous()}
        if self.format == "nvfp4":
            out["weight_scale"] = qt._params.block_scale.contiguous()
            out["weight_scale_2"] = qt._params.scale.float().contiguous()
        else:
            out["weight_scale"] = qt._params.scale.contiguous()
        return {k: v for k, v in out.items() if k in storage}
