"""The krea-2 trainer's output: bare native names whose low-rank pair has no ``.weight``
(``blocks.3.attn.wq.lora_A``), scaled by the metadata: ``lora_alpha / rank * lora_scale``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from krea2kit.models.key_names import is_native_linear

from .common import BARE_LORA_SUFFIXES, Claim, KeyLayout, meta_float
from .factors import ModuleGroup
from .reader import LayoutFormat


@dataclass(frozen=True)
class KreaTrainingLayout(KeyLayout):
    def claim(self, key: str) -> Claim | None:
        # Only the bare pair is this trainer's signature; anything else is plain native.
        return super().claim(key) if key.endswith(BARE_LORA_SUFFIXES) else None

    def claims_file(self, groups: Sequence[ModuleGroup]) -> bool:
        # Every low-rank pair in the file is bare and nothing is prefixed (else it is native).
        pairs = [g for g in groups if "down" in g.tensors]
        return bool(pairs) and all(g.layout == self.name for g in pairs) and not any(g.prefix for g in groups)

    def file_scale(self, metadata: Mapping[str, str]) -> tuple[float, list[str]]:
        rank = meta_float(metadata, "rank", 0.0)
        alpha = meta_float(metadata, "lora_alpha", rank)
        scale = meta_float(metadata, "lora_scale", 1.0)
        if rank and alpha != rank:
            scale *= alpha / rank
        notes = [f"scale {scale:g} from metadata (lora_alpha / rank * lora_scale)"] if scale != 1.0 else []
        return scale, notes


LAYOUT = KreaTrainingLayout(
    name="krea-training",
    prefixes=("",),
    refines="native",
    to_native=lambda path: path if is_native_linear(path) else None,
)


def load(options=None, context=None) -> LayoutFormat:
    return LayoutFormat(LAYOUT)
