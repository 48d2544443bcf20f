"""A Linear layer that keeps its quantized storage, and how it computes.

The weight lives as the file stored it (fp8 + scale, int8 + row scales, nvfp4 blocks, GGUF
blocks), so a loaded model's resident size stays near the file's size. ``forward`` takes one
of three compute paths, chosen per layer and per device (:func:`select_path`):

* ``dequantize-per-layer``: dequantize this one layer to the compute dtype, a plain matmul,
  drop the temporary. Every layout, every device (CPU, MPS, any GPU); the weights are the
  ones ComfyUI computes (comfy-kitchen's dequantization).
* ``fp8-scaled-mm``: fp8 e4m3 weights with a per-tensor scale (``fp8_scaled``, fp8 on load):
  the activations are quantized to fp8 e4m3 with one scale per token (``amax / 448``) and
  ``torch._scaled_mm`` multiplies fp8 by fp8 with the two scales (row-wise scaling: the
  weight's one scale broadcast over its output channels). Tensor cores from sm_89 (Ada,
  Hopper; comfy-kitchen's ``TensorCoreFP8Layout.MIN_SM_VERSION``).
* ``int8-int-mm``: int8 weights with per-row (or one) scales (``int8``, ``int8_convrot``, int8
  on load): comfy-kitchen's ``int8_linear`` (ComfyUI's own int8 path) quantizes the activations
  to int8 per token, rotates them first by the same group Hadamard as a ConvRot weight, and
  multiplies with ``torch._int_mm`` (int32 accumulation). From sm_75
  (``TensorWiseINT8Layout.MIN_SM_VERSION``).

Both matmul paths run the tokens in blocks (:data:`ROW_BLOCK_ELEMENTS`) so their temporaries
stay bounded; per-token scales make the blocking change nothing beyond the float GEMMs'
summation order.

``model.quant_compute`` picks: ``"auto"`` takes the low-precision matmul on CUDA GPUs that have
it and dequantizes elsewhere; ``"dequantize"`` always dequantizes; ``"scaled-mm"`` takes the
low-precision matmul wherever torch runs it, the CPU included (torch 2.13 runs both
``_scaled_mm`` and ``_int_mm`` on CPU). ``auto`` leaves the CPU on the dequantize path. Measured
there (512 x 1536 x 1536, bf16, one thread, best of 5): bf16 matmul 7 ms; fp8 dequantize +
matmul 42 ms, ``_scaled_mm`` with its activation quantization 118 ms; int8 ConvRot dequantize +
matmul 61 ms, comfy-kitchen's ``int8_linear`` 15 ms. The int8 matmul is faster on the CPU too
(ComfyUI takes it there), but it rounds the activations, and the CPU results stay those of the
oracle's dequantized weights (LoRA on a quantized base equal to LoRA on its dequantized base,
tests/quant); ``"scaled-mm"`` opts in.
Layouts without a matmul of their own (mxfp8, nvfp4, e5m2, GGUF) always dequantize.

The path each layer took is collected while a :func:`quant_compute` block is open, so the
pipeline records in each image's metadata the path that produced it.

It is an ``nn.Linear`` for everything that looks for one (runtime LoRA adapters hook its
output): :attr:`weight` is the dequantized weight, computed on access.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from krea2kit.errors import Krea2kitError

#: ``model.quant_compute`` values (recipe/schema.py).
COMPUTE_MODES = ("auto", "dequantize", "scaled-mm")
#: Compute paths, as recorded in the images' metadata.
DEQUANTIZE = "dequantize-per-layer"
FP8_MM = "fp8-scaled-mm"
FP8_MM_TENSORWISE = "fp8-scaled-mm-tensorwise"  # a torch/GPU without row-wise fp8 scaling
INT8_MM = "int8-int-mm"
#: Lowest CUDA capability with the tensor-core instructions (the same as comfy-kitchen's
#: ``TensorCoreFP8Layout`` / ``TensorWiseINT8Layout.MIN_SM_VERSION``; a test keeps them equal).
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (7, 5)}
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
#: Token block of the low-precision paths, in elements of the wider of a layer's two widths:
#: bounds their temporaries (int8: ~17 bytes an element; fp8: ~5) to ~140 MB, below one
#: dequantized 6144 x 16384 bf16 weight, which the memory preflight counts for quantized layers.
ROW_BLOCK_ELEMENTS = 1 << 23

_MODE: ContextVar[str] = ContextVar("krea2kit_quant_compute", default="auto")
_USED: ContextVar[set | None] = ContextVar("krea2kit_quant_paths_used", default=None)


@contextlib.contextmanager
def quant_compute(mode: str = "auto") -> Iterator[set[str]]:
    """Run quantized layers in ``mode`` inside the block; yields the set of paths the layers
    took (filled as they run), e.g. ``{"fp8-scaled-mm"}``."""
    if mode not in COMPUTE_MODES:
        raise ValueError(f"quant compute mode must be one of {COMPUTE_MODES}, not {mode!r}")
    used: set[str] = set()
    mode_token, used_token = _MODE.set(mode), _USED.set(used)
    try:
        yield used
    finally:
        _MODE.reset(mode_token)
        _USED.reset(used_token)


def current_mode() -> str:
    """The ``model.quant_compute`` of the open :func:`quant_compute` block ("auto" outside)."""
    return _MODE.get()


def record_path(path: str) -> None:
    """Note that a layer computed by ``path`` (what the images' metadata records); a no-op
    outside a :func:`quant_compute` block. For parts with quantized kernels of their own."""
    used = _USED.get()
    if used is not None:
        used.add(path)


def describe_paths(used) -> str:
    """``"fp8-scaled-mm+dequantize-per-layer"`` for the metadata ('' when no layer ran)."""
    return "+".join(sorted(used))


def matmul_kind(codec) -> str | None:
    """"fp8" / "int8" for the ComfyUI formats with a low-precision matmul, else ``None``."""
    fmt = getattr(codec, "format", None)
    if fmt == "float8_e4m3fn":
        return "fp8"
    if fmt == "int8_tensorwise":
        return "int8"
    return None


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int] | None:
    if torch.version.hip is not None:  # ROCm: fp8 there is e4m3fnuz, another format
        return None
    return tuple(torch.cuda.get_device_capability(index))


@functools.lru_cache(maxsize=None)
def cpu_runs(kind: str) -> bool:
    """Whether this torch runs ``_scaled_mm`` (fp8) / ``_int_mm`` (int8) on the CPU (2.13 does
    both; older builds raise ``NotImplementedError``)."""
    try:
        if kind == "fp8":
            a = torch.zeros(1, 16, dtype=torch.float8_e4m3fn)
            b = torch.zeros(16, 16, dtype=torch.float8_e4m3fn).t()
            torch._scaled_mm(a, b, scale_a=torch.ones(1, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        else:
            torch._int_mm(torch.zeros(1, 16, dtype=torch.int8), torch.zeros(16, 16, dtype=torch.int8))
        return True
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False


def device_runs(kind: str, device_type: str, capability: tuple[int, int] | None) -> bool:
    """Whether a device runs ``kind``'s matmul: CUDA from :data:`MIN_CAPABILITY`, the CPU when
    this torch has the kernels, nothing else (MPS, ROCm)."""
    if device_type == "cuda":
        return capability is not None and tuple(capability) >= MIN_CAPABILITY[kind]
    if device_type == "cpu":
        return cpu_runs(kind)
    return False


def select_path(codec, out_features: int, in_features: int, *, device_type: str,
                capability: tuple[int, int] | None, mode: str) -> str:
    """The compute path of one layer on one device (see the module docstring).

    Raises a :class:`Krea2kitError` naming ``model.quant_compute`` when ``"scaled-mm"`` is asked
    of a device that has no such matmul for this layer's format."""
    kind = matmul_kind(codec)
    if mode == "dequantize" or kind is None:
        return DEQUANTIZE
    if kind == "fp8" and (in_features % 16 or out_features % 16):
        return DEQUANTIZE  # cuBLASLt fp8 wants both weight dimensions in multiples of 16
    if mode == "auto" and device_type != "cuda":
        return DEQUANTIZE
    if not device_runs(kind, device_type, capability):
        if mode == "auto":
            return DEQUANTIZE
        what = f"sm_{capability[0]}{capability[1]}" if device_type == "cuda" and capability else device_type
        need = "sm_89 or newer (Ada, Hopper)" if kind == "fp8" else "a CUDA GPU (sm_75 or newer) or a CPU"
        raise Krea2kitError(f'"scaled-mm" asks for {kind} matmuls, which this device ({what}) does not run '
                            f"(they need {need})", key="model.quant_compute",
                            hint='use "auto" (the fastest path the device has) or "dequantize"')
    return FP8_MM if kind == "fp8" else INT8_MM


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

    # -- compute --------------------------------------------------------------------
    def compute_path(self, device: torch.device, mode: str | None = None) -> str:
        """The path this layer takes on ``device`` in ``mode`` (default: the open
        :func:`quant_compute` block's, else "auto"); decided once per device and mode."""
        mode = mode or _MODE.get()
        cache = self.__dict__.setdefault("_paths", {})
        key = (mode, device.type, device.index)
        if key not in cache:
            capability = None
            if device.type == "cuda":
                capability = cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
            cache[key] = select_path(self.codec, self.out_features, self.in_features, device_type=device.type,
                                     capability=capability, mode=mode)
        return cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.compute_path(x.device)
        y = None
        if path != DEQUANTIZE and x.numel():
            y, path = self._low_precision(x, path)
        if y is None:
            path = DEQUANTIZE
            w = self.dequantized()
            bias = self.bias if self.bias is None or self.bias.dtype == w.dtype else self.bias.to(w.dtype)
            y = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, bias)
        record_path(path)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _low_precision(self, x: torch.Tensor, path: str) -> tuple[torch.Tensor | None, str]:
        """``(y, path taken)`` by the fp8 / int8 matmul; ``(None, ...)`` when torch refuses it
        at run time under "auto" (then this layer dequantizes from now on)."""
        x2 = x.reshape(-1, self.in_features)
        try:
            if path == INT8_MM:
                y2 = self._int8_mm(x2)
            else:
                y2, path = self._fp8_mm(x2, path)
        except (RuntimeError, NotImplementedError) as err:
            if _MODE.get() != "auto":
                raise Krea2kitError(f"the {path} matmul failed on {x.device}: {err}", key="model.quant_compute",
                                    hint='use "auto" or "dequantize"') from None
            self.__dict__["_paths"][(_MODE.get(), x.device.type, x.device.index)] = DEQUANTIZE
            return None, DEQUANTIZE
        if self.bias is not None:
            y2 += self.bias.to(y2.dtype)
        return y2.reshape(*x.shape[:-1], self.out_features), path

    def _row_blocks(self, rows: int) -> Iterator[slice]:
        """Token blocks of at most :data:`ROW_BLOCK_ELEMENTS` over the wider side: the
        activations' quantized copies and the int32 accumulators exist one block at a time
        (a few tens of MB), never for the whole sequence. Both paths scale per token, so the
        blocks give the same result as one call."""
        step = max(1, ROW_BLOCK_ELEMENTS // max(self.in_features, self.out_features))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))

    def _int8_mm(self, x2: torch.Tensor) -> torch.Tensor:
        # comfy-kitchen's int8 linear, as ComfyUI computes an int8 layer: per-token int8
        # activations (rotated first for ConvRot weights), torch._int_mm, both scales applied
        # to the int32 result; its CUDA backend's kernel where installed, else the eager one.
        import comfy_kitchen as ck

        codec, dtype = self.codec, self.compute_dtype
        q, scale = self._buffers["qweight"], self._buffers["weight_scale"]
        out = torch.empty(x2.shape[0], self.out_features, dtype=dtype, device=x2.device)
        for rows in self._row_blocks(x2.shape[0]):
            out[rows] = ck.int8_linear(x2[rows].to(dtype), q, scale, None, dtype, convrot=codec.convrot,
                                       convrot_groupsize=codec.convrot_groupsize)
        return out

    def _fp8_mm(self, x2: torch.Tensor, path: str) -> tuple[torch.Tensor, str]:
        # comfy-kitchen's fp8 linear scales the activations per tensor; one scale per token
        # keeps a token of large activations from pushing the others into fp8's subnormals.
        w = self._buffers["qweight"]
        scale = self._buffers.get("weight_scale")
        w_scale = (scale if scale is not None else torch.ones((), device=w.device)).float().reshape(1, 1)
        tiny = torch.finfo(torch.float32).tiny
        per_token = path == FP8_MM
        if per_token:
            scale_b = w_scale.expand(1, self.out_features).contiguous()
        else:  # one activation scale for the call (exact amax over the blocks)
            amax = torch.stack([x2[rows].abs().amax() for rows in self._row_blocks(x2.shape[0])]).amax()
            x_scale = (amax.float() / FP8_MAX).clamp_(min=tiny).reshape(1, 1)
            scale_b = w_scale
        out = torch.empty(x2.shape[0], self.out_features, dtype=self.compute_dtype, device=x2.device)
        try:
            for rows in self._row_blocks(x2.shape[0]):
                xb = x2[rows]
                if per_token:  # |x| is exact in x's own dtype: no fp32 copy for the amax
                    x_scale = (xb.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_(min=tiny)
                xq = xb.to(torch.float32, copy=True).div_(x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                out[rows] = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=self.compute_dtype)
            return out, path
        except RuntimeError:
            if not per_token or x2.device.type != "cuda":
                raise
        # Row-wise scaling is newer than tensor-wise in cuBLASLt/torch (and wants bf16 output
        # on some builds): fall back to one activation scale per call for this layer.
        self.__dict__["_paths"][(_MODE.get(), x2.device.type, x2.device.index)] = FP8_MM_TENSORWISE
        return self._fp8_mm(x2, FP8_MM_TENSORWISE)

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
