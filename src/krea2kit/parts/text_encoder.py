"""The built-in Qwen3-VL text conditioner as a pipeline part
(:class:`krea2kit.contracts.TextEncoderPart`), with the prompt cache."""

from __future__ import annotations

import warnings
from typing import Any

from krea2kit.contracts import LoadContext


class TextEncoderPart:
    """``encode(texts) -> (hidden (B, L, taps, D), mask (B, L))``; truncation notes are
    collected for the CLI to print on stderr."""

    def __init__(self, encoder: Any, cache: Any | None, *, layout: str = "official") -> None:
        self.encoder = encoder
        self.cache = cache
        self.identity = encoder.identity
        self.hidden_size = encoder.hidden_size
        self._notes: list[str] = []
        self.layout = layout  # the recipe's model.layout, from the load context

    def encode(self, texts: list[str]):
        from krea2kit.models.tokenizer import PromptTruncatedWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            # The official layout: every prompt as 512 positions [prompt | PAD | suffix] (the
            # transformer may drop the padding; keeping it is what the official forward does).
            length = self.encoder.template.max_length if self.layout == "official" else None
            self.encoder.exact_layout = self.layout == "official"
            hidden, mask = self.encoder.encode(texts, cache=self.cache, length=length)
        self._notes.extend(str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning))
        return hidden, mask

    def take_warnings(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes


TAPS_FILE = "krea2kit.json"  # optional, beside the weights: {"taps": [...]} for models tapped elsewhere


def taps_for(location: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """The tapped layers: Krea 2's (2, 5, ..., 35) unless the model folder says otherwise."""
    import json
    from pathlib import Path

    folder = Path(location)
    folder = folder if folder.is_dir() else folder.parent
    extra = folder / TAPS_FILE
    if extra.is_file():
        from krea2kit.errors import WeightsError

        try:
            return tuple(int(t) for t in json.loads(extra.read_text())["taps"])
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"invalid {TAPS_FILE}: {exc}", file=str(extra)) from None
    return default


def load(options: None, context: LoadContext) -> TextEncoderPart:
    import torch

    from krea2kit.conditioning import PromptEmbeddingCache, load_text_encoder
    from krea2kit.models.text_encoder import KREA2_TAPS

    location = context.location
    # context.weights_dtype: the recipe's model.text_encoder_weights_dtype ("fp8" / "int8"
    # quantize a full-precision file while loading it).
    encoder = load_text_encoder(location, taps=taps_for(location, KREA2_TAPS), dtype=getattr(torch, context.dtype),
                                device=context.device, weights_dtype=context.weights_dtype)
    cache = None
    settings = context.settings
    if settings is not None and settings.cache.prompt_embeddings:
        cache = PromptEmbeddingCache(settings.cache_root() / "prompt-embeddings")
    part = TextEncoderPart(encoder, cache, layout=context.layout)
    if getattr(encoder.tower, "storage_layout", None):  # the identity names the storage already
        from krea2kit.parts.dit import QUANT_COMPUTE_PATH

        part.identity = f"{part.identity} compute={QUANT_COMPUTE_PATH}"
    return part
