"""A Linear layer that keeps its quantized storage and dequantizes at compute time.

The weight lives as the file stored it (fp8 + scale, int8 + row scales, nvfp4 blocks, GGUF
blocks); ``forward`` dequantizes this one layer to the compute dtype, runs the matmul and
drops the temporary, so a loaded model's resident size stays near the file's size and never
holds the dequantized model at once. This is the portable path (CPU, MPS, any GPU); fused
fp8/int8 matmuls are a later, device-specific path.

It is an ``nn.Linear`` for everything that looks for one (runtime LoRA adapters hook its
output): :attr:`weight` is the dequantized weight, computed on access.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantLinear(nn.Linear):
    """``y = x W^T + b`` with ``W = codec.dequantize(storage)`` computed per call.

    codec: a :class:`~krea2kit.models.quant.comfy.ComfyCodec` or
        :class:`~krea2kit.models.quant.gguf_reader.GGUFCodec` (storage layout and dequantization).
    compute_dtype: the dtype the weight is dequantized to; inputs are cast to it and the
        output is returned in the input's dtype (as :class:`krea2kit.models.dit.Linear`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, codec, compute_dtype: torch.dtype,
                 device=None):
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight Parameter
        self.in_features = in_features
        self.out_features = out_features
        self.codec = codec
        self.compute_dtype = compute_dtype
        self.storage_names: list[str] = []
        for name, (shape, dtype) in codec.storage_shapes(out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape if shape is not None else (0,), dtype=dtype, device=device))
            self.storage_names.append(name)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def storage_layout(self) -> str:
        return self.codec.name

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This layer's (out, in) weight in ``dtype`` (default: the compute dtype)."""
        storage = {n: self._buffers[n] for n in self.storage_names}
        return self.codec.dequantize(storage, (self.out_features, self.in_features), dtype or self.compute_dtype)

    # ``nn.Linear`` users read ``.weight``: give them the dequantized tensor (one layer).
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized()

    # -- merging (dequantize -> add -> requantize, one layer) -------------------------
    def storage_state(self) -> dict[str, torch.Tensor]:
        """A copy of the stored tensors (to put back with :meth:`load_storage_`)."""
        return {n: self._buffers[n].clone() for n in self.storage_names}

    def load_storage_(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.storage_names:
            self._buffers[n] = state[n].to(self._buffers[n].device)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a changed (out, in) weight in this layer's format (ComfyUI's ``set_weight``)."""
        storage = {n: self._buffers[n] for n in self.storage_names}
        for n, t in self.codec.quantize(weight.to(self.compute_dtype), storage).items():
            self._buffers[n] = t.to(storage[n].device)

    def storage_nbytes(self) -> int:
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in self.storage_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized()
        bias = self.bias if self.bias is None or self.bias.dtype == w.dtype else self.bias.to(w.dtype)
        if x.dtype == w.dtype:
            return F.linear(x, w, bias)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)`` / ``.half()`` convert floating tensors; the storage (fp8 codes,
        # fp32 scales) must only ever move, so it goes through as raw bytes and is viewed back.
        saved = {}
        for n in self.storage_names:
            t = self._buffers[n]
            saved[n] = (t.dtype, tuple(t.shape))
            self._buffers[n] = t.reshape(-1).view(torch.uint8)
        try:
            super()._apply(fn, recurse)
        finally:
            for n, (dtype, shape) in saved.items():
                self._buffers[n] = self._buffers[n].view(dtype).reshape(shape)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage={self.storage_layout}, compute={self.compute_dtype}")
