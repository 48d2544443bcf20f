"""Shapes of the nano models. They use the real Krea 2 code paths: the same transformer
(2x2 patches of 16-channel f8 latents, 12 tapped text layers), the same Qwen3 text tower
and chat template, the same Qwen-Image VAE architecture, only narrower and shallower."""

from __future__ import annotations

# Tapped hidden states of the 12-layer nano text tower: every layer's output (1..12), so the
# transformer's text fusion sees 12 taps exactly as with Qwen3-VL-4B's (2, 5, ..., 35).
NANO_TAPS = tuple(range(1, 13))
NANO_TOKENIZER_VOCAB = 600


# Transformer sizes tried for the nano Raw (head dim 32 throughout). "m" ships: at equal steps
# it beat "s" (held-out adherence 0.45 vs 0.39 after 1,000 steps) for 0.75x the steps/s.
NANO_DIT_SIZE = "m"
DIT_SIZES = {
    "s": dict(features=128, heads=4, kvheads=2, layers=3),
    "m": dict(features=192, heads=6, kvheads=2, layers=4),
}


def dit_config(size: str = NANO_DIT_SIZE):
    from krea2kit.models.dit import DiTConfig

    return DiTConfig(**DIT_SIZES[size], tdim=64, txtdim=64, txtheads=4, txtkvheads=2, txtlayers=len(NANO_TAPS))


def text_config(vocab_size: int):
    from krea2kit.models.text_encoder import Qwen3TextConfig

    return Qwen3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=(4, 2, 2))


def vae_config():
    from krea2kit.models.vae_qwen import QwenVAEConfig

    return QwenVAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
