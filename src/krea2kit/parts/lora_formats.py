"""How a LoRA file finds the registered format that reads it.

A format part (``register_lora_formats``; :class:`krea2kit.contracts.LoraFormat`) has
``detect(keys, metadata) -> bool`` and ``parse(path, *, strict, name) -> LoraFile``.
Formats from other plugins are asked first (by plugin, then name), then krea2kit's own
layouts (one module each in :mod:`krea2kit.lora.formats`). A file no format
recognises goes to krea2kit's reader anyway, which refuses it with the reason (another
model's LoRA, a text-encoder LoRA, no Krea 2 tensors).
"""

from __future__ import annotations

import os
from typing import Any

from krea2kit.plugins import BUILTIN_NAME


def ask_order(formats: list[Any]) -> list[Any]:
    """Format descriptors in the order they are asked: plugins' first, krea2kit's last."""
    return sorted(formats, key=lambda d: (d.plugin == BUILTIN_NAME, d.plugin, d.name))


def open_lora(path: str | os.PathLike, formats: list[Any], *, strict: bool = False, name: str | None = None):
    """Read ``path`` with the first registered format that recognises it."""
    from krea2kit.lora.formats import load_lora
    from krea2kit.models.weights import open_checkpoint

    ckpt = None
    for descriptor in ask_order(formats):
        fmt = descriptor.load_part()
        ckpt = ckpt or open_checkpoint(path, what="LoRA")
        if fmt.detect(ckpt.keys(), ckpt.metadata):
            return fmt.parse(path, strict=strict, name=name)
    return load_lora(path, strict=strict, name=name)
