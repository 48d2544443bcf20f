"""Which quantized layout a transformer file is in, read from its keys and header only.

ComfyUI's layouts (``comfy/utils.py`` ``convert_old_quants`` and ``comfy/ops.py``
``MixedPrecisionOps``; Comfy-Org's Krea 2 repackaging uses them):

* each quantized Linear ``<stem>`` has ``<stem>.weight`` in the storage dtype, its scales
  (``<stem>.weight_scale``, nvfp4 also ``<stem>.weight_scale_2``) and a per-layer format, given
  either by ``<stem>.comfy_quant`` (a U8 tensor holding JSON such as
  ``{"format": "float8_e4m3fn"}``) or by ``_quantization_metadata`` in the safetensors header
  (``{"layers": {"<stem>": {...}}}``; it wins over the tensors, as in ComfyUI);
* the legacy ``scaled_fp8`` marker key: every ``<stem>.scale_weight`` is an fp8 layer's
  ``weight_scale`` (``<stem>.scale_input`` an input scale, unused here);
* fp8 weights with no scale at all (plain fp8 casts): ComfyUI casts them to the compute dtype,
  which is the fp8 dequantization with a scale of 1.

GGUF files are told by their magic bytes (:func:`is_gguf`). Anything quantized-looking that
matches none of these gets one :class:`~krea2kit.errors.WeightsError` naming the file, the
layer and the layout it seems to be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from krea2kit.errors import WeightsError

#: ComfyUI ``QUANT_ALGOS`` formats read here -> comfy-kitchen layout class.
COMFY_FORMATS = {
    "float8_e4m3fn": "TensorCoreFP8Layout",
    "float8_e5m2": "TensorCoreFP8Layout",
    "mxfp8": "TensorCoreMXFP8Layout",
    "nvfp4": "TensorCoreNVFP4Layout",
    "int8_tensorwise": "TensorWiseINT8Layout",
}
#: per-layer tensors that describe a layer rather than hold its weight (dropped after reading).
SIDECAR_SUFFIXES = (".comfy_quant", ".input_scale", ".scale_input")
#: safetensors dtypes that only quantized weights use.
QUANT_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8")
LEGACY_MARKER = "scaled_fp8"
GGUF_MAGIC = b"GGUF"


@dataclass
class QuantScheme:
    """What a quantized safetensors file holds.

    layout: a short name for metadata (``fp8_scaled``, ``scaled_fp8``, ``fp8``, ``int8_convrot``,
        ``int8``, ``mxfp8``, ``nvfp4``; several joined with ``+`` for a mixed file).
    layers: file key stem (``model.diffusion_model.blocks.0.attn.wq``) -> ComfyUI layer config.
    renames: file key -> the key ComfyUI reads it as (legacy ``.scale_weight`` -> ``.weight_scale``).
    dropped: file keys that carry no weight (markers, ``comfy_quant``, input scales).
    """

    layout: str
    layers: dict[str, dict] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)


def is_gguf(path: str | Path) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with p.open("rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _parse_conf(raw: bytes | str, where: str, file: str) -> dict:
    try:
        conf = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        conf = None
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise WeightsError(
            "quantized file with an unreadable layer format (expected JSON like {\"format\": \"float8_e4m3fn\"})",
            file=file, key=where, hint="the file is damaged or in a quantized layout krea2kit does not know; "
                                       "use the bf16 file")
    return conf


def _layout_name(layers: dict[str, dict], source: str) -> str:
    names = set()
    for conf in layers.values():
        fmt = conf["format"]
        if fmt.startswith("float8"):
            names.add({"legacy": "scaled_fp8", "unscaled": "fp8"}.get(conf.get("_source", source), "fp8_scaled"))
        elif fmt == "int8_tensorwise":
            names.add("int8_convrot" if conf.get("convrot") else "int8")
        else:
            names.add(fmt)
    return "+".join(sorted(names))


def detect_quantization(ckpt) -> QuantScheme | None:
    """The :class:`QuantScheme` of an open :class:`~krea2kit.models.weights.Checkpoint`, or
    ``None`` for an unquantized file. Reads the small ``comfy_quant`` tensors, nothing else.
    Raises :class:`WeightsError` for a quantized layout that is unknown or not supported."""
    keys = ckpt.keys()
    keyset = set(keys)
    file = str(ckpt.path)
    layers: dict[str, dict] = {}
    renames: dict[str, str] = {}
    dropped: set[str] = set()
    source = "comfy"

    markers = [k for k in keys if k == LEGACY_MARKER or k.endswith("." + LEGACY_MARKER)]
    dropped.update(markers)
    comfy_quant = [k for k in keys if k.endswith(".comfy_quant")]
    if comfy_quant:
        for k, t in ckpt.get_many(comfy_quant).items():
            layers[k[: -len(".comfy_quant")]] = _parse_conf(t.numpy().tobytes(), k, file)
    header = ckpt.metadata.get("_quantization_metadata")
    if header is not None:
        try:
            described = json.loads(header)["layers"]
            if not isinstance(described, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError("the header's _quantization_metadata is not {\"layers\": {...}}", file=file,
                               key="__metadata__._quantization_metadata") from None
        for stem, conf in described.items():
            layers[stem] = _parse_conf(json.dumps(conf), f"__metadata__._quantization_metadata.{stem}", file)
    elif markers:
        source = "legacy"
        for k in keys:
            if k.endswith(".scale_weight"):
                stem = k[: -len(".scale_weight")]
                renames[k] = stem + ".weight_scale"
                layers.setdefault(stem, {"format": "float8_e4m3fn"})
    # Header stems may be written without the file's ComfyUI prefix.
    for stem in [s for s in layers if s + ".weight" not in keyset]:
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if prefix + stem + ".weight" in keyset:
                layers[prefix + stem] = layers.pop(stem)
                break
        else:
            raise WeightsError(f"the quantization table names layer {stem}, which has no weight in the file",
                               file=file, key=stem)
    # fp8 weights with no format and no scale at all: a plain cast (ComfyUI upcasts them as they
    # are). One with any other ``.weight_*`` tensor (e.g. a block-wise ``weight_scale_inv``) is not.
    with_sidecars = {k.rsplit(".", 1)[0] for k in keys if k.rsplit(".", 1)[-1].startswith("weight_")}
    for k in keys:
        info = ckpt.infos[k]
        if k.endswith(".weight") and info.dtype in ("F8_E4M3", "F8_E5M2"):
            stem = k[: -len(".weight")]
            if stem not in layers and stem not in with_sidecars and stem + ".scale_weight" not in keyset:
                fmt = "float8_e4m3fn" if info.dtype == "F8_E4M3" else "float8_e5m2"
                layers[stem] = {"format": fmt, "_source": "unscaled"}
    dropped.update(k for k in keys if k.endswith(SIDECAR_SUFFIXES))

    # Anything quantized-looking left over is a layout this module does not know.
    for k in keys:
        if k in dropped:
            continue
        stem, _, leaf = k.rpartition(".")
        if stem in layers:
            continue
        if ckpt.infos[k].dtype in QUANT_DTYPES or leaf in ("weight_scale", "weight_scale_2", "scale_weight"):
            raise WeightsError(
                f"unknown quantized layout: {k} is stored as {ckpt.infos[k].dtype} with no format krea2kit can read",
                file=file, key=k,
                hint="supported: ComfyUI fp8_scaled / scaled_fp8 / int8 (ConvRot) / mxfp8 / nvfp4 files and GGUF; "
                     "otherwise use the bf16 file")
    if not layers:
        return None
    for stem, conf in layers.items():
        if conf["format"] not in COMFY_FORMATS:
            raise WeightsError(
                f"quantized layout {conf['format']!r} is not supported yet",
                file=file, key=stem,
                hint=f"supported formats: {', '.join(sorted(COMFY_FORMATS))}; otherwise use the bf16 file")
    return QuantScheme(layout=_layout_name(layers, source), layers=layers, renames=renames, dropped=dropped)
