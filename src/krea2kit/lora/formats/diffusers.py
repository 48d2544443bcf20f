"""Diffusers module names (``transformer_blocks.3.attn.to_q``): the official Krea style
LoRAs and diffusers' trainer write ``transformer.<module>.lora_A/lora_B.weight`` with no
alpha tensors; the scale then comes from the PEFT metadata (:func:`.common.peft_scale`).
A fused ``attn.to_qkv`` is split back into q / k / v."""

from __future__ import annotations

from krea2kit.models.key_names import linear_to_native

from .common import DOTTED_PREFIXES, KeyLayout, attempt
from .reader import LayoutFormat

LAYOUT = KeyLayout(
    name="diffusers",
    prefixes=DOTTED_PREFIXES,
    to_native=attempt(linear_to_native),
)


def load(options=None, context=None) -> LayoutFormat:
    return LayoutFormat(LAYOUT)
