"""kohya / musubi-tuner names: ``lora_unet_<native name with underscores>`` with
``lora_down`` / ``lora_up`` and an ``alpha`` (scale = alpha / rank)."""

from __future__ import annotations

from krea2kit.models.key_names import unflatten_native

from .common import KeyLayout
from .reader import LayoutFormat

LAYOUT = KeyLayout(
    name="kohya",
    prefixes=("lora_transformer_", "lora_unet_"),
    to_native=unflatten_native,
)


def load(options=None, context=None) -> LayoutFormat:
    return LayoutFormat(LAYOUT)
