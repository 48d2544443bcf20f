"""Native module names (``blocks.3.attn.wq``), as ComfyUI, ai-toolkit and PEFT on the
native model write them: under ``diffusion_model.``, ``model.diffusion_model.``,
``base_model.model.``, ``transformer.`` or no prefix."""

from __future__ import annotations

from krea2kit.models.key_names import is_native_linear

from .common import DOTTED_PREFIXES, KeyLayout
from .reader import LayoutFormat

LAYOUT = KeyLayout(
    name="native",
    prefixes=DOTTED_PREFIXES,
    to_native=lambda path: path if is_native_linear(path) else None,
)


def load(options=None, context=None) -> LayoutFormat:
    return LayoutFormat(LAYOUT)
