"""Quantized Krea 2 transformer files: the layouts the community downloads.

* :mod:`krea2kit.models.quant.detect`: which layout a file is in, from its keys and header
  (ComfyUI ``fp8_scaled`` / ``int8_convrot`` / ``mxfp8`` / ``nvfp4``, the legacy ``scaled_fp8``
  marker, plain fp8 casts, GGUF), with one clear error for a layout still unknown.
* :mod:`krea2kit.models.quant.comfy`: ComfyUI's per-layer formats, dequantized by ``comfy-kitchen``
  (ComfyUI's own kernel library; its eager backend runs on any torch device) exactly as
  ComfyUI does.
* :mod:`krea2kit.models.quant.gguf_reader`: GGUF files through the ``gguf`` package's reader and
  dequantizers.
* :mod:`krea2kit.models.quant.linear`: :class:`QuantLinear`, which keeps the quantized storage and
  dequantizes one layer at a time in ``forward``.
* :mod:`krea2kit.models.quant.load`: builds a transformer from a quantized file.

Both libraries are the optional extra ``krea2kit[quant]``; a quantized file without them gets
one message naming the extra. Nothing here is imported unless a quantized file is opened.
"""

#: Modules every community quantizer keeps in full precision (ai-toolkit, musubi-tuner,
#: krea-ai/krea-2 PR #20): the embedders, the time/text MLPs, the text-fusion projector and the
#: last layer. Norms and modulations are not Linears and are never quantized either.
KEEP_FULL_PRECISION = ("first", "tmlp.", "tproj.", "txtmlp.", "txtfusion.projector", "last.")


def keeps_full_precision(native_module: str) -> bool:
    """True for a native module name (``tmlp.0``, ``blocks.3.attn.wq``) quantizers leave alone."""
    return any(native_module == k.rstrip(".") or native_module.startswith(k) for k in KEEP_FULL_PRECISION)
