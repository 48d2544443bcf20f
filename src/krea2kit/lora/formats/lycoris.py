"""SimpleTuner's LyCORIS names: ``lycoris_<diffusers name with underscores>`` (also under
``lora_unet_`` / ``lora_transformer_``), including a fused ``attn_to_qkv``.

LoKr / LoHa factors are tensor roles, read under every layout (:mod:`.factors`); this
module is only about the names."""

from __future__ import annotations

from krea2kit.models.key_names import linear_to_native, unflatten_diffusers

from .common import KeyLayout
from .reader import LayoutFormat


def _to_native(path: str):
    name = unflatten_diffusers(path)
    return linear_to_native(name) if name else None


LAYOUT = KeyLayout(
    name="lycoris",
    prefixes=("lora_transformer_", "lora_unet_", "lycoris_"),
    to_native=_to_native,
)


def load(options=None, context=None) -> LayoutFormat:
    return LayoutFormat(LAYOUT)
