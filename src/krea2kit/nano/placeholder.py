"""Write the *untrained* nano weights: deterministic random initialisation, so the whole
pipeline (loaders, template, sampler, VAE, filters, metadata) runs offline before the
trained nano models exist. Images from these weights are noise-like by construction.

    python -m krea2kit.nano.placeholder [FOLDER]     # default: the package's nano/weights

Layouts written are the real ones: the transformer as a native single file, the text
encoder as a Hugging Face folder (``model.language_model.*`` + tokenizer.json), the VAE
in the diffusers key layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 20261125
PACKAGE_FOLDER = Path(__file__).parent / "weights"


def write_placeholder(folder: Path, seed: int = SEED) -> None:
    import torch

    from krea2kit.models.dit import SingleStreamDiT
    from krea2kit.models.text_encoder import Qwen3TextTower
    from krea2kit.models.tokenizer import build_tiny_tokenizer
    from krea2kit.models.vae_qwen import QwenImageVAE
    from krea2kit.models.weights import save_safetensors_atomic
    from krea2kit.nano import configs

    meta = {"krea2kit": "nano placeholder: untrained, deterministic random init", "seed": str(seed)}
    te_dir = folder / "text_encoder"
    te_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(te_dir, vocab_size=configs.NANO_TOKENIZER_VOCAB)
    torch.manual_seed(seed)
    tower = Qwen3TextTower(configs.text_config(tokenizer.get_vocab_size()))
    save_safetensors_atomic({f"model.language_model.{k}": v for k, v in tower.state_dict().items()},
                            te_dir / "model.safetensors", meta)
    (te_dir / "krea2kit.json").write_text(json.dumps({"taps": list(configs.NANO_TAPS)}) + "\n")
    for i, name in enumerate(("turbo", "raw")):
        torch.manual_seed(seed + 1 + i)
        dit = SingleStreamDiT(configs.dit_config())
        (folder / name).mkdir(exist_ok=True)
        save_safetensors_atomic(dit.state_dict(), folder / name / "model.safetensors", meta)
    torch.manual_seed(seed + 10)
    vae = QwenImageVAE(configs.vae_config())
    (folder / "vae").mkdir(exist_ok=True)
    save_safetensors_atomic(vae.state_dict(), folder / "vae" / "model.safetensors", meta)


if __name__ == "__main__":
    write_placeholder(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_FOLDER)
