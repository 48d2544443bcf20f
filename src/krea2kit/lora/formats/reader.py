"""Read a LoRA's keys with a list of key layouts into a :class:`~.form.LoraFile`.

Each key goes to the first layout that claims it, so one file may mix spellings (the
layout reported is the one naming most modules, and a module spelled twice is refused).
Everything after the key names (tensor roles, alpha, PEFT metadata, DoRA, fused q/k/v,
refusals) is the same for every layout and lives here and in :mod:`.factors`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from krea2kit.errors import WeightsError
from krea2kit.models.key_names import BLOCK_LINEARS, FUSED_QKV, STANDALONE_LINEARS, linear_to_diffusers

from .common import (
    PEFT_METADATA_KEY, TEXT_ENCODER_RE, Claim, KeyLayout, base_model, foreign_kind, peft_config, peft_scale,
    trigger_words,
)
from .factors import CONV_ROLES, LATENT_IN_FEATURES, ModuleGroup, build_delta, kind_of, refuse_control, split_fused
from .form import LoraDelta, LoraFile

if TYPE_CHECKING:  # pragma: no cover
    import torch

Reader = Callable[[list[str]], Mapping[str, "torch.Tensor"]]


def _claim(key: str, layouts: Sequence[KeyLayout]) -> tuple[Claim, KeyLayout] | None:
    for layout in layouts:
        claim = layout.claim(key)
        if claim is not None:
            return claim, layout
    return None


def read_keys(keys: Collection[str], read: Reader, metadata: Mapping[str, str], layouts: Sequence[KeyLayout], *,
              strict: bool = False, path: str | None = None, name: str | None = None) -> LoraFile:
    """Parse tensors named ``keys`` (``read(keys)`` gives them) with ``layouts``, in order."""
    keys = list(keys)
    metadata = dict(metadata)
    if not keys:
        raise WeightsError("the LoRA file holds no tensors", file=path)
    te_keys = [k for k in keys if TEXT_ENCODER_RE.match(k)]
    model_keys = [k for k in keys if not TEXT_ENCODER_RE.match(k)]
    foreign = foreign_kind(model_keys)
    if foreign:
        raise WeightsError(f"this file is {foreign}, not a Krea 2 LoRA", file=path,
                           hint="Krea 2 LoRAs name modules like blocks.N.attn.wq or transformer_blocks.N.attn.to_q")
    if te_keys and not model_keys:
        raise WeightsError("this file is a text-encoder LoRA; krea2kit applies LoRAs to the Krea 2 transformer only",
                           file=path, key=te_keys[0],
                           hint="Krea 2's diffusers loader does not load text-encoder LoRAs either")

    by_name: dict[str, KeyLayout] = {}
    for layout in layouts:
        by_name.setdefault(layout.name, layout)
    groups: dict[str, ModuleGroup] = {}
    unmatched: list[str] = list(te_keys)
    for key in model_keys:
        found = _claim(key, layouts)
        if found is None:
            unmatched.append(key)
            continue
        claim, layout = found
        if claim.role in ("weight", "bias"):
            # A plain weight in a LoRA file: only meaningful as a replaced ``first`` projection.
            if claim.target == "first" and claim.role == "weight":
                shape = tuple(read([key])[key].shape)
                if len(shape) == 2 and shape[1] != LATENT_IN_FEATURES:
                    refuse_control(ModuleGroup(claim.target, claim.raw_module, claim.prefix, layout.name, keys=[key]),
                                   shape[1], path)
            unmatched.append(key)
            continue
        g = groups.get(claim.raw_module)
        if g is None:
            g = groups[claim.raw_module] = ModuleGroup(claim.target, claim.raw_module, claim.prefix, layout.name)
        if claim.role in g.tensors:
            raise WeightsError(f"two tensors for the same role {claim.role!r} of one module", file=path, key=key)
        g.keys.append(key)
        g.tensors[claim.role] = key  # filled with tensors below

    # Groups with only an alpha / magnitude and nothing to scale are leftovers, not modules.
    for raw, g in list(groups.items()):
        if kind_of(set(g.tensors)) is None and not (set(g.tensors) & CONV_ROLES):
            unmatched.extend(g.keys)
            del groups[raw]
    if not groups:
        from krea2kit.models.weights import guess_checkpoint_kind

        raise WeightsError("no Krea 2 LoRA tensors in this file", file=path,
                           hint=f"this file looks like {guess_checkpoint_kind(keys)}; first keys: {', '.join(keys[:3])}")
    if strict and unmatched:
        from krea2kit.models.weights import summarize_names

        raise WeightsError(f"{len(unmatched)} keys match no Krea 2 module ({summarize_names(unmatched)})",
                           file=path, hint="load without strict to skip them")

    data = read([k for g in groups.values() for k in g.keys])
    for g in groups.values():
        g.tensors = {role: data[k] for role, k in g.tensors.items()}

    # The spelling naming most modules is the file's layout (or a refinement of it that
    # claims the whole file); that layout may carry a file-wide scale.
    spellings = Counter(by_name[g.layout].refines or g.layout for g in groups.values())
    layout_name = spellings.most_common(1)[0][0]
    for layout in by_name.values():
        if layout.refines == layout_name and layout.claims_file(list(groups.values())):
            layout_name = layout.name
            break
    scale_mult, notes = by_name[layout_name].file_scale(metadata)
    peft_cfg = peft_config(metadata)
    if peft_cfg:
        notes.append("alpha from lora_adapter_metadata")
    if len(spellings) > 1:
        notes.append("mixed key spellings: " + ", ".join(f"{s} x{n}" for s, n in spellings.items()))

    deltas: dict[str, LoraDelta] = {}
    fused = 0
    for g in groups.values():
        alpha_default = None
        if peft_cfg and "alpha" not in g.tensors:
            if isinstance(g.target, tuple):
                dmod = linear_to_diffusers(g.target[0]).rsplit(".", 2)[0] + "." + FUSED_QKV
                alpha_default = peft_scale(peft_cfg, dmod)
            else:
                alpha_default = peft_scale(peft_cfg, linear_to_diffusers(g.target), g.target)
        delta = build_delta(g, alpha_default, scale_mult, path)
        parts = split_fused(delta, g.target, path) if isinstance(g.target, tuple) else [delta]
        fused += isinstance(g.target, tuple)
        for d in parts:
            if d.module in deltas:
                raise WeightsError(f"two adapters for the module {d.module}", file=path, key=d.source_keys[0],
                                   hint="the file spells the same module twice (e.g. native and diffusers names)")
            if d.module == "first" and d.shape[1] != LATENT_IN_FEATURES:
                refuse_control(g, d.shape[1], path)
            deltas[d.module] = d
    if fused:
        notes.append(f"{fused} fused to_qkv adapters split into q / k / v")
    prefixes = Counter(g.prefix for g in groups.values())
    return LoraFile(
        deltas=dict(sorted(deltas.items(), key=lambda kv: module_order(kv[0]))),
        layout=layout_name,
        metadata=dict(metadata),
        unmatched=unmatched,
        path=path,
        name=name or (Path(path).stem if path else "lora"),
        key_prefix=prefixes.most_common(1)[0][0],
        base_model=base_model(metadata),
        trigger_words=trigger_words(metadata),
        notes=notes,
        num_tensors=len(keys),
    )


def read_file(path: str | os.PathLike, layouts: Sequence[KeyLayout], *, strict: bool = False,
              name: str | None = None) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (or PEFT folder) with ``layouts``."""
    from krea2kit.models.weights import open_checkpoint

    ckpt = open_checkpoint(path, what="LoRA")
    metadata = dict(ckpt.metadata)
    # A PEFT ``save_pretrained`` folder keeps r / lora_alpha in adapter_config.json beside the weights.
    p = Path(path)
    cfg_file = (p if p.is_dir() else p.parent) / "adapter_config.json"
    if PEFT_METADATA_KEY not in metadata and cfg_file.is_file() and (p.is_dir() or p.name.startswith("adapter_model")):
        try:
            metadata[PEFT_METADATA_KEY] = json.dumps(json.loads(cfg_file.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(f"adapter_config.json is not valid JSON: {exc}", file=str(cfg_file)) from None
    return read_keys(ckpt.keys(), ckpt.get_many, metadata, layouts, strict=strict,
                     path=str(path), name=name or (p.stem if p.is_file() else p.name))


class LayoutFormat:
    """A :class:`KeyLayout` as a LoRA format part (what a ``register_lora_formats`` load
    returns): ``detect`` asks the layout, ``parse`` reads the file with it first and
    krea2kit's built-in layouts after it (so a file that mixes spellings still reads)."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout
        self.name = layout.name

    def layouts(self) -> tuple[KeyLayout, ...]:
        from . import BUILTIN_LAYOUTS  # the package imports the layout modules, which import this one

        if any(self.layout is b for b in BUILTIN_LAYOUTS):
            return BUILTIN_LAYOUTS  # their order decides overlapping claims; keep it
        return (self.layout, *BUILTIN_LAYOUTS)

    def detect(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        return self.layout.detect(keys, metadata)

    def parse(self, path: str | os.PathLike, *, strict: bool = False, name: str | None = None) -> LoraFile:
        return read_file(path, self.layouts(), strict=strict, name=name)


_ORDER_STANDALONE = ["first", "tmlp.0", "tmlp.2", "tproj.1", "txtfusion.projector", "txtmlp.1", "txtmlp.3", "last.linear"]
_ORDER_SUB = list(BLOCK_LINEARS)
_BLOCK_LINEAR = re.compile(r"^(.+)\.(\d+)\.(.+)$")  # blocks.3.attn.wq -> (blocks, 3, attn.wq)


def module_order(name: str):
    """Sort key of a native Linear: inputs, text fusion, main blocks, then the output layer."""
    if name in STANDALONE_LINEARS:
        return (0 if name != "last.linear" else 3, _ORDER_STANDALONE.index(name), 0, 0)
    head, idx, sub = _BLOCK_LINEAR.match(name).groups()
    group = 1 if head.startswith("txtfusion.layerwise") else 1.5 if head.startswith("txtfusion.") else 2
    return (group, int(idx), _ORDER_SUB.index(sub), 0)
