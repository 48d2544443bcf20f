"""LoRA file formats as parts, and how a file finds the format that reads it.

A format part has ``detect(keys, metadata) -> bool`` and
``parse(path, *, strict, name) -> LoraFile``. Formats from other plugins are asked
first, in name order; krea2kit's own reader, which knows every layout of the Krea 2
ecosystem and refuses what it cannot read with a message, comes last.
"""

from __future__ import annotations

from typing import Any

BUILTIN = "krea2kit"


class BuiltinLoraFormat:
    """diffusers/PEFT, native (ai-toolkit, ComfyUI), kohya/musubi, LyCORIS LoKr/LoHa, DoRA."""

    name = BUILTIN

    def detect(self, keys, metadata) -> bool:
        return True  # the fallback: it reads or clearly refuses anything

    def parse(self, path, *, strict: bool = False, name: str | None = None):
        from krea2kit.adapters.formats import load_lora

        return load_lora(path, strict=strict, name=name)


def builtin(options=None) -> BuiltinLoraFormat:
    return BuiltinLoraFormat()


def open_lora(path: str, formats: list[Any], *, strict: bool = False, name: str | None = None):
    """Read ``path`` with the first registered format that recognises it."""
    from krea2kit.models.weights import open_checkpoint

    ordered = sorted(formats, key=lambda d: (d.plugin == BUILTIN and d.name == BUILTIN, d.plugin, d.name))
    ckpt = None
    for descriptor in ordered:
        fmt = descriptor.load_part()
        if descriptor.plugin != BUILTIN or descriptor.name != BUILTIN:
            ckpt = ckpt or open_checkpoint(path, what="LoRA")
            if not fmt.detect(ckpt.keys(), ckpt.metadata):
                continue
        return fmt.parse(path, strict=strict, name=name)
    return BuiltinLoraFormat().parse(path, strict=strict, name=name)
