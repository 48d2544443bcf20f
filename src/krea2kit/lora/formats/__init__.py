"""Read every LoRA layout of the Krea 2 ecosystem into one form keyed by native module names.

One module per key layout, each a :class:`~.common.KeyLayout` registered as a LoRA format
part through the public ``register_lora_formats`` hook (:mod:`krea2kit.builtins`), the way
a plugin registers its own:

* :mod:`.diffusers`: ``transformer.<diffusers module>.lora_A/lora_B.weight`` (official Krea
  style LoRAs, the diffusers trainer); alpha from the ``lora_adapter_metadata`` PEFT config;
* :mod:`.native`: ``diffusion_model.<native>`` (ComfyUI, ai-toolkit), ``base_model.model.<native>``
  and bare native names;
* :mod:`.krea_training`: the krea-2 trainer's bare ``.lora_A`` keys, scaled by its metadata;
* :mod:`.kohya`: ``lora_unet_<native with underscores>`` + ``.alpha`` (kohya, musubi-tuner);
* :mod:`.lycoris`: SimpleTuner's ``lycoris_<diffusers with underscores>``, fused ``to_qkv`` too.

What does not depend on the names is shared: key anatomy, metadata and alpha (:mod:`.common`),
LyCORIS LoKr / LoHa, DoRA and full deltas (:mod:`.factors`), the internal form
(:mod:`.form`: a :class:`LoraDelta` per native Linear name, in a :class:`LoraFile`), and
the reader that combines them (:mod:`.reader`). Files meant for another model are refused
with :class:`~krea2kit.errors.WeightsError`. Names come from :mod:`krea2kit.models.key_names`,
the table the weight loader uses too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from krea2kit.models.key_names import linear_to_diffusers as native_to_diffusers
from krea2kit.models.key_names import linear_to_native as diffusers_to_native
from krea2kit.models.key_names import unflatten_native

from . import diffusers, kohya, krea_training, lycoris, native
from .common import PEFT_METADATA_KEY, Claim, KeyLayout
from .factors import LATENT_IN_FEATURES
from .form import FULL, LOHA, LOKR, LORA, LoraDelta, LoraFile
from .reader import LayoutFormat, read_file, read_keys

__all__ = [
    "BUILTIN_LAYOUTS", "parse_lora_state_dict", "load_lora",
    "LoraDelta", "LoraFile", "LORA", "LOKR", "LOHA", "FULL",
    "KeyLayout", "Claim", "LayoutFormat", "PEFT_METADATA_KEY", "LATENT_IN_FEATURES",
    "native_to_diffusers", "diffusers_to_native", "unflatten_native",
]

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: krea2kit's own layouts, in the order they claim keys (a more specific claim first:
#: the krea-2 trainer's bare keys are native names too). Each is registered in builtins.py.
BUILTIN_LAYOUTS: tuple[KeyLayout, ...] = (
    krea_training.LAYOUT, native.LAYOUT, diffusers.LAYOUT, kohya.LAYOUT, lycoris.LAYOUT,
)


def parse_lora_state_dict(
    tensors: Mapping[str, "torch.Tensor"],
    metadata: Mapping[str, str] | None = None,
    *,
    strict: bool = False,
    path: str | None = None,
    name: str | None = None,
) -> LoraFile:
    """Parse a LoRA state dict (any built-in layout) into a :class:`LoraFile`."""
    return read_keys(list(tensors), lambda keys: {k: tensors[k] for k in keys}, dict(metadata or {}),
                     BUILTIN_LAYOUTS, strict=strict, path=path, name=name)


def load_lora(path: str | os.PathLike, *, strict: bool = False, name: str | None = None) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (or PEFT folder) in any built-in layout.

    ``strict=True`` makes keys that match no Krea 2 module an error; otherwise they are
    counted and listed in ``LoraFile.unmatched``. Raises :class:`WeightsError` for files meant
    for another model, control adapters needing an extra input, and malformed factors.
    """
    return read_file(path, BUILTIN_LAYOUTS, strict=strict, name=name)
