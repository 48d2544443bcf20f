"""GGUF transformer files (community Krea 2 GGUFs: Q8_0, K-quants ...) through the ``gguf`` package.

The ``gguf`` package (llama.cpp's reference Python reader) parses the file and dequantizes;
nothing here decodes GGUF bytes by hand. :class:`GGUFCheckpoint` presents the file with the
interface the transformer loader reads (keys, shapes, tensors one at a time), with shapes in
torch order: GGUF lists dimensions fastest-first (``ne0`` = columns), so a Linear's
``(out, in)`` weight is listed as ``[in, out]`` and is reversed here. Tensor names are the
native (or ComfyUI-prefixed) Krea 2 names, as written by ComfyUI-GGUF's converter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from krea2kit.errors import WeightsError
from krea2kit.models.weights import TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: GGUF tensor types that are plain floats (loaded as ordinary tensors).
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def require_gguf(file: str):
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise WeightsError("this is a GGUF file and the gguf package is not installed", file=file,
                           hint="install the optional extra: pip install 'krea2kit[quant]' (comfy-kitchen and gguf)") from None


class GGUFCodec:
    """One GGUF-quantized weight: raw blocks kept as bytes, dequantized by ``gguf.quants``."""

    def __init__(self, qtype: int, byte_shape: tuple[int, ...]):
        import gguf

        self.qtype = gguf.GGMLQuantizationType(qtype)
        self.byte_shape = tuple(byte_shape)

    @property
    def name(self) -> str:
        return f"gguf-{self.qtype.name}"

    def n_values(self) -> int:
        """How many weights the stored blocks hold."""
        from gguf.quants import quant_shape_from_byte_shape

        n = 1
        for d in quant_shape_from_byte_shape(self.byte_shape, self.qtype):
            n *= int(d)
        return n

    def prepare(self, buffer: str, tensor: "torch.Tensor", stored_dtype: str, *, file: str, key: str) -> "torch.Tensor":
        return tensor  # raw blocks, kept as read

    def storage_shapes(self, out_f: int, in_f: int):
        import torch

        return {"qweight": (self.byte_shape, torch.uint8)}

    def quantize(self, weight: "torch.Tensor", storage: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """New blocks for a changed weight, by ``gguf.quants.quantize`` (which writes Q8_0 and the
        legacy Q4/Q5 types; K-quants it can only read)."""
        import torch
        from gguf.quants import quant_shape_from_byte_shape, quantize

        shape = tuple(int(d) for d in quant_shape_from_byte_shape(self.byte_shape, self.qtype))
        try:
            blocks = quantize(weight.detach().float().cpu().reshape(shape).numpy(), self.qtype)
        except NotImplementedError:
            raise WeightsError(f"cannot re-quantize a {self.qtype.name} layer (the gguf package only reads it)",
                               hint="attach the LoRA at runtime instead of merging it") from None
        return {"qweight": torch.from_numpy(blocks.copy()).to(storage["qweight"].device)}

    def dequantize(self, storage: dict[str, "torch.Tensor"], shape: tuple[int, int], dtype: "torch.dtype") -> "torch.Tensor":
        import torch
        from gguf.quants import dequantize

        q = storage["qweight"]
        # gguf's dequantizers are numpy (CPU) code: off-CPU storage makes a round trip.
        w = torch.from_numpy(dequantize(q.detach().cpu().numpy(), self.qtype)).reshape(shape)
        return w.to(device=q.device, dtype=dtype)


@dataclass
class GGUFCheckpoint:
    """A GGUF file seen as a checkpoint: ``keys()``, ``infos`` (torch-order shapes, the GGUF
    type name as dtype), ``iter_tensors`` (plain types as float tensors, quantized types as
    raw uint8 blocks)."""

    path: Path
    infos: dict[str, TensorInfo]
    qtypes: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    #: quantized tensors that are not Linear weights: read dequantized (fp32, torch shape).
    dequantize_on_read: set[str] = field(default_factory=set)
    _reader: object = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def is_quantized(self, key: str) -> bool:
        return self.infos[key].dtype not in FLOAT_TYPES

    def files(self) -> list[Path]:
        return [self.path]

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        import numpy as np
        import torch
        from gguf.quants import dequantize

        wanted = set(self.infos if keys is None else keys)
        for t in self._reader.tensors:  # file order
            if t.name not in wanted:
                continue
            info = self.infos[t.name]
            if info.dtype in ("F32", "F16", "F64"):
                tensor = torch.from_numpy(np.array(t.data)).reshape(info.shape)
            elif info.dtype == "BF16":
                tensor = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(info.shape).to(torch.bfloat16)
            elif t.name in self.dequantize_on_read:
                tensor = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(info.shape)
            else:
                tensor = torch.from_numpy(np.array(t.data, dtype=np.uint8))
            yield t.name, tensor

    def get_many(self, keys: Iterable[str]) -> dict[str, "torch.Tensor"]:
        return dict(self.iter_tensors(keys))


#: ComfyUI-GGUF's converter stores a 2-D tensor whose rows are not whole 256-value blocks as
#: (n / 256, 256) and records its real (torch-order) shape under this key + the tensor name.
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _orig_shape(reader, name: str, path: Path) -> tuple[int, ...] | None:
    import gguf

    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    if list(field.types) != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]:
        raise WeightsError(f"{ORIG_SHAPE_KEY}{name} is not an array of int32", file=str(path),
                           key=ORIG_SHAPE_KEY + name)
    return tuple(int(field.parts[i][0]) for i in field.data)


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file lazily (the reader memory-maps it). Raises WeightsError when unreadable."""
    p = Path(path)
    require_gguf(str(p))
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on damaged files
        raise WeightsError(f"cannot read the GGUF file: {exc}", file=str(p),
                           hint="the download may be incomplete; fetch the file again") from None
    infos, qtypes = {}, {}
    for t in reader.tensors:
        shape = _orig_shape(reader, t.name, p) or tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        infos[t.name] = TensorInfo(shape, t.tensor_type.name, p)
        qtypes[t.name] = int(t.tensor_type)
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith("general."):
            try:
                meta[name] = str(fld.contents())
            except Exception:  # pragma: no cover - odd field types are not needed
                pass
    return GGUFCheckpoint(path=p, infos=infos, qtypes=qtypes, metadata=meta, _reader=reader)


#: bytes hashed for a GGUF file's identity: the head (magic, metadata, tensor table) and samples.
_ID_HEAD, _ID_SAMPLES, _ID_SAMPLE_BYTES = 1 << 20, 16, 4096


def gguf_identity(path: str | Path) -> str:
    """A stable id of a GGUF file, in the spirit of :func:`krea2kit.conditioning.weights_identity`:
    name, size, the first MiB (header and tensor table) and sampled data; no full hash."""
    import hashlib

    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"{p.name}\0{size}\0".encode())
    with p.open("rb") as fh:
        h.update(fh.read(_ID_HEAD))
        for k in range(_ID_SAMPLES):
            fh.seek((size * k) // _ID_SAMPLES)
            h.update(fh.read(_ID_SAMPLE_BYTES))
    return h.hexdigest()
