"""Model sizes used only by the tests: the smallest configs that still take every code path.

They are not presets of the package (whose preset tables name real models only); tests pass
them to the model classes and loaders as config objects.
"""

from __future__ import annotations

from krea2kit.models.dit import DiTConfig
from krea2kit.models.text_encoder import Qwen3TextConfig
from krea2kit.models.vae_flux2 import Flux2VAEConfig
from krea2kit.models.vae_qwen import QwenVAEConfig

# Transformers. "tiny": every code path of the full model (GQA, 3 taps, 2+2 text blocks).
# "micro": the smallest model the official code can build (head dim 16, MLP hidden 128): the
# golden fixture (tests/fixtures/krea2_golden.safetensors) was made with it.
DITS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(features=64, heads=2, kvheads=1, layers=2, tdim=32, txtdim=64, txtheads=2, txtkvheads=2,
                      txtlayers=3),
    "micro": DiTConfig(features=32, heads=2, kvheads=1, layers=2, tdim=16, txtdim=16, txtheads=1, txtkvheads=1,
                       txtlayers=3),
}
TINY_DIT = DITS["tiny"]

# A 6-layer Qwen3 text tower with GQA and interleaved mRoPE sections summing to head_dim / 2.
TINY_TEXT = Qwen3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=(4, 2, 2))

# Qwen-Image VAEs. "tiny"/"tiny-2res": the smallest widths that keep every code path
# (shortcuts, 2d/3d resamples), with non-trivial latent statistics. "nano": the Krea 2 latent
# space (f8, 16 channels, official statistics) at the nano models' width.
_STATS = dict(latents_mean=(0.1, -0.2, 0.3, -0.4), latents_std=(1.5, 0.5, 2.0, 0.75))
QWEN_VAES: dict[str, QwenVAEConfig] = {
    "tiny": QwenVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, **_STATS),
    "tiny-2res": QwenVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2, **_STATS),
    "nano": QwenVAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}

# FLUX.2 VAEs of a few thousand parameters with every code path (shortcut convs,
# down/upsamplers, mid attention, quant convs; "tiny3" also the small-decoder split).
_FLUX2 = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4),
    "tiny3": dict(block_out_channels=(8, 16, 16), decoder_block_out_channels=(4, 8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4),
}


def flux2_vae(name: str) -> Flux2VAEConfig:
    """A fresh FLUX.2 VAE test config (``"tiny"`` or ``"tiny3"``)."""
    return Flux2VAEConfig(**_FLUX2[name])
