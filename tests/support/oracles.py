"""Slow, literal re-computations of what the runtime does faster, for tests to compare with."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def encode_padded_reference(encoder, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The official text encoding of a :class:`krea2kit.conditioning.Krea2TextEncoder`'s tower:
    the full ``[prefix|prompt|PAD|suffix]`` block (546 tokens for max_length 512) with a
    key-padding mask and valid-token positions, then the prefix strip, as krea-ai/krea-2
    ``encoder.py`` does. Returns (B, max_length, taps, D) and the mask (B, max_length)."""
    tower = encoder.tower
    assert tower is not None, "the encoder was released"
    tokens = encoder.tokenize(prompts)
    ids, mask = tokens.padded()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    device = encoder.device
    hidden = tower(ids.to(device), taps=encoder.taps, position_ids=positions.to(device),
                   attention_mask=mask.to(device))
    return hidden[:, tokens.prefix_len:], mask[:, tokens.prefix_len:].to(device)
