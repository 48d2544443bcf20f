"""The built-in slider kind: a named control driving one or more [[loras]] strengths."""

from __future__ import annotations

from krea2kit.contracts import LoadContext
from krea2kit.lora.sliders import Binding, LoraSliderOptions

__all__ = ["Binding", "LoraSliderOptions", "load"]


def load(options: LoraSliderOptions, context: LoadContext):
    """The :class:`krea2kit.contracts.Slider` of one ``[[sliders]]`` entry: ``context.name``
    is its name, ``options`` its validated keys."""
    from krea2kit.lora.sliders import Slider

    if options is None:
        raise ValueError(f"slider {context.name!r} needs its options (give 'lora' or 'loras')")
    return Slider.from_options(context.name, options)
