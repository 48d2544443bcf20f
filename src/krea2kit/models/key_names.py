"""The Krea 2 transformer's module names in each spelling found in the wild: one table.

* **native**: the official single files (krea-ai/krea-2: ``first``, ``blocks.N.attn.wq``,
  ``txtfusion.layerwise_blocks.N.mlp.up`` ...);
* **ComfyUI**: the native names under ``diffusion_model.`` or ``model.diffusion_model.``;
* **diffusers**: ``Krea2Transformer2DModel`` (``img_in``, ``transformer_blocks.N.attn.to_q`` ...),
  under ``transformer.`` when a whole pipeline is saved.

Both the weight loader (:mod:`krea2kit.models.dit_loader`) and the LoRA reader
(:mod:`krea2kit.lora.formats`) translate names with this module, so a renamed module
is fixed in one row. ``tests/models/test_key_names.py`` checks the rows against the
reference key lists of both layouts (``tests/fixtures/keys/krea2_native_keys.txt`` and
``krea2_diffusers_keys.txt``; 430 tensors each, mapped 1:1). Flattened spellings (``blocks_3_attn_wq``, used by kohya /
musubi LoRAs and, on diffusers names, by SimpleTuner's LyCORIS files) are read back here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: ComfyUI / ai-toolkit wrap the native names in one of these prefixes.
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: a saved diffusers pipeline names the transformer's tensors under this component prefix.
DIFFUSERS_COMPONENT_PREFIX = "transformer."
TEXT_FUSION_GROUPS = ("layerwise_blocks", "refiner_blocks")

LINEAR, NORM, CONTAINER = "linear", "norm", "container"

# ---------------------------------------------------------------------------
# The table: (native, diffusers, what) per module.

#: modules inside a main block (``blocks.N.`` / ``transformer_blocks.N.``) and a text-fusion
#: block (``txtfusion.<group>.N.`` / ``text_fusion.<group>.N.``).
BLOCK_ROWS: tuple[tuple[str, str, str], ...] = (
    ("prenorm", "norm1", NORM),
    ("postnorm", "norm2", NORM),
    ("attn.wq", "attn.to_q", LINEAR),
    ("attn.wk", "attn.to_k", LINEAR),
    ("attn.wv", "attn.to_v", LINEAR),
    ("attn.gate", "attn.to_gate", LINEAR),
    ("attn.wo", "attn.to_out.0", LINEAR),
    ("attn.qknorm.qnorm", "attn.norm_q", NORM),
    ("attn.qknorm.knorm", "attn.norm_k", NORM),
    ("mlp.gate", "ff.gate", LINEAR),
    ("mlp.up", "ff.up", LINEAR),
    ("mlp.down", "ff.down", LINEAR),
    ("attn", "attn", CONTAINER),
    ("mlp", "ff", CONTAINER),
)
#: modules outside the blocks.
TOP_ROWS: tuple[tuple[str, str, str], ...] = (
    ("first", "img_in", LINEAR),
    ("tmlp.0", "time_embed.linear_1", LINEAR),
    ("tmlp.2", "time_embed.linear_2", LINEAR),
    ("tmlp", "time_embed", CONTAINER),
    ("tproj.1", "time_mod_proj", LINEAR),
    ("txtmlp.0", "txt_in.norm", NORM),
    ("txtmlp.1", "txt_in.linear_1", LINEAR),
    ("txtmlp.3", "txt_in.linear_2", LINEAR),
    ("txtmlp", "txt_in", CONTAINER),
    ("txtfusion.projector", "text_fusion.projector", LINEAR),
    ("last.norm", "final_layer.norm", NORM),
    ("last.linear", "final_layer.linear", LINEAR),
    ("last", "final_layer", CONTAINER),
)
#: RMSNorm parameters: ``scale`` natively, ``weight`` in diffusers.
NORM_PARAM = ("scale", "weight")
#: the one tensor that is not a rename: ``blocks.N.mod.lin`` (6F,) is diffusers'
#: ``transformer_blocks.N.scale_shift_table`` (6, F) (a reshape, done by the weight loader).
BLOCK_SPECIALS = {"mod.lin": "scale_shift_table"}
#: whole keys outside the blocks that are renamed as a unit.
TOP_SPECIALS = {"last.modulation.lin": "final_layer.scale_shift_table", "txtfusion": "text_fusion"}
#: extra diffusers spellings of a Linear, read but never written: ComfyUI registers
#: ``attn.to_out`` as well as ``attn.to_out.0`` for LoRA keys (``comfy/lora.py``, Krea2 branch).
LINEAR_ALIASES = {"attn.to_out": "attn.wo"}
#: diffusers' fused q/k/v projection (``fuse_qkv_projections``; SimpleTuner saves LoRAs on it).
FUSED_QKV = "attn.to_qkv"

#: The Linears (the only modules a LoRA changes), native -> diffusers.
BLOCK_LINEARS: dict[str, str] = {n: d for n, d, what in BLOCK_ROWS if what == LINEAR}
STANDALONE_LINEARS: dict[str, str] = {n: d for n, d, what in TOP_ROWS if what == LINEAR}

# Container modules map only as whole paths (their children are listed one by one above).
_CONTAINERS = frozenset(x for n, d, what in BLOCK_ROWS + TOP_ROWS if what == CONTAINER for x in (n, d))

_NATIVE_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.(.*))?$")
_NATIVE_TXT = re.compile(r"^txtfusion\.(layerwise_blocks|refiner_blocks)\.(\d+)(?:\.(.*))?$")
_DIFF_BLOCK = re.compile(r"^transformer_blocks\.(\d+)(?:\.(.*))?$")
_DIFF_TXT = re.compile(r"^text_fusion\.(layerwise_blocks|refiner_blocks)\.(\d+)(?:\.(.*))?$")


@dataclass(frozen=True)
class _Direction:
    """One direction of the translation; both are built from the rows above."""

    block: re.Pattern
    txt: re.Pattern
    block_out: str  # e.g. "transformer_blocks.{idx}"
    txt_out: str  # e.g. "text_fusion.{group}.{idx}"
    block_modules: tuple[tuple[str, str], ...]  # (source, destination), longest source first
    top_modules: tuple[tuple[str, str], ...]
    norms: frozenset[str]  # source module paths whose parameter is the norm parameter
    leaf: tuple[str, str]  # the norm parameter's name: (source, destination)
    block_specials: dict[str, str]
    top_specials: dict[str, str]


def _longest_first(pairs):
    return tuple(sorted(pairs, key=lambda p: len(p[0]), reverse=True))


_TO_DIFFUSERS = _Direction(
    _NATIVE_BLOCK, _NATIVE_TXT, "transformer_blocks.{idx}", "text_fusion.{group}.{idx}",
    _longest_first((n, d) for n, d, _ in BLOCK_ROWS), _longest_first((n, d) for n, d, _ in TOP_ROWS),
    frozenset(n for n, _, what in BLOCK_ROWS + TOP_ROWS if what == NORM), NORM_PARAM,
    BLOCK_SPECIALS, TOP_SPECIALS,
)
_TO_NATIVE = _Direction(
    _DIFF_BLOCK, _DIFF_TXT, "blocks.{idx}", "txtfusion.{group}.{idx}",
    _longest_first((d, n) for n, d, _ in BLOCK_ROWS), _longest_first((d, n) for n, d, _ in TOP_ROWS),
    frozenset(d for _, d, what in BLOCK_ROWS + TOP_ROWS if what == NORM), NORM_PARAM[::-1],
    {v: k for k, v in BLOCK_SPECIALS.items()}, {v: k for k, v in TOP_SPECIALS.items()},
)


def _map_rest(rest: str, modules, norms: frozenset[str], leaf: tuple[str, str]) -> str | None:
    """Map ``<module path>[.<suffix>]`` with the longest matching module path."""
    for src, dst in modules:
        if rest == src or (src not in _CONTAINERS and rest.startswith(src + ".")):
            suffix = rest[len(src):]
            if src in norms and suffix == "." + leaf[0]:
                suffix = "." + leaf[1]
            return dst + suffix
    return None


def _translate(key: str, way: _Direction) -> str:
    for pattern, out in ((way.block, way.block_out), (way.txt, way.txt_out)):
        m = pattern.match(key)
        if not m:
            continue
        *head, rest = m.groups()
        prefix = out.format(idx=head[-1], group=head[0])
        if rest is None:
            return prefix
        if pattern is way.block and rest in way.block_specials:
            return f"{prefix}.{way.block_specials[rest]}"
        mapped = _map_rest(rest, way.block_modules, way.norms, way.leaf)
        if mapped is None:
            raise KeyError(key)
        return f"{prefix}.{mapped}"
    if key in way.top_specials:
        return way.top_specials[key]
    mapped = _map_rest(key, way.top_modules, way.norms, way.leaf)
    if mapped is None:
        raise KeyError(key)
    return mapped


def native_to_diffusers(key: str) -> str:
    """Native (official / ComfyUI without its prefix) tensor key or module path -> diffusers.

    Works with or without a trailing suffix (``blocks.0.attn.wq``, ``blocks.0.attn.wq.weight``,
    ``blocks.0.attn.wq.lora_A.weight``). Raises ``KeyError`` for a name not in the table."""
    return _translate(key, _TO_DIFFUSERS)


def diffusers_to_native(key: str) -> str:
    """Diffusers tensor key or module path -> native; the inverse of :func:`native_to_diffusers`."""
    return _translate(key, _TO_NATIVE)


# ---------------------------------------------------------------------------
# Linear module names (what LoRA files name)

_NATIVE_LINEAR_BLOCK = re.compile(r"^(blocks\.\d+|txtfusion\.(?:layerwise|refiner)_blocks\.\d+)\.(attn\.\w+|mlp\.\w+)$")
_DIFF_LINEAR_BLOCK = re.compile(r"^(transformer_blocks\.\d+|text_fusion\.(?:layerwise|refiner)_blocks\.\d+)\.(.+)$")
_DIFF_LINEAR_TO_NATIVE = {d: n for n, d in BLOCK_LINEARS.items()} | LINEAR_ALIASES
_DIFF_STANDALONE_TO_NATIVE = {d: n for n, d in STANDALONE_LINEARS.items()}


def is_native_linear(name: str) -> bool:
    """Whether ``name`` is the native path of one of the transformer's Linear layers."""
    if name in STANDALONE_LINEARS:
        return True
    m = _NATIVE_LINEAR_BLOCK.match(name)
    return bool(m and m.group(2) in BLOCK_LINEARS)


def linear_to_diffusers(native: str) -> str:
    """``blocks.3.attn.wq`` -> ``transformer_blocks.3.attn.to_q``: Linear module paths only
    (``KeyError`` for anything else, e.g. a norm)."""
    if not is_native_linear(native):
        raise KeyError(native)
    return native_to_diffusers(native)


def linear_to_native(name: str) -> str | tuple[str, str, str]:
    """Inverse of :func:`linear_to_diffusers`, also reading :data:`LINEAR_ALIASES`; the fused
    ``attn.to_qkv`` of a block gives its (wq, wk, wv)."""
    if name in _DIFF_STANDALONE_TO_NATIVE:
        return _DIFF_STANDALONE_TO_NATIVE[name]
    m = _DIFF_LINEAR_BLOCK.match(name)
    if not m:
        raise KeyError(name)
    head, sub = m.group(1), m.group(2)
    native_head = diffusers_to_native(head)
    if sub == FUSED_QKV:
        return (f"{native_head}.attn.wq", f"{native_head}.attn.wk", f"{native_head}.attn.wv")
    if sub not in _DIFF_LINEAR_TO_NATIVE:
        raise KeyError(name)
    return f"{native_head}.{_DIFF_LINEAR_TO_NATIVE[sub]}"


# ---------------------------------------------------------------------------
# Flattened spellings: ``.`` -> ``_``. That is ambiguous (``layerwise_blocks``, ``to_out_0``,
# ``time_embed``), so names are read back by matching the known vocabulary.

def flat(name: str) -> str:
    """``blocks.3.attn.wq`` -> ``blocks_3_attn_wq``."""
    return name.replace(".", "_")


_NATIVE_FLAT_STANDALONE = {flat(n): n for n in STANDALONE_LINEARS}
_NATIVE_FLAT_SUB = {flat(n): n for n in BLOCK_LINEARS}
_DIFF_FLAT_STANDALONE = {flat(d): d for d in STANDALONE_LINEARS.values()}
_DIFF_FLAT_SUB = {flat(d): d for d in [*_DIFF_LINEAR_TO_NATIVE, FUSED_QKV]}
_NATIVE_FLAT_HEADS = {"blocks": "blocks", **{flat(f"txtfusion.{g}"): f"txtfusion.{g}" for g in TEXT_FUSION_GROUPS}}
_DIFF_FLAT_HEADS = {"transformer_blocks": "transformer_blocks",
                    **{flat(f"text_fusion.{g}"): f"text_fusion.{g}" for g in TEXT_FUSION_GROUPS}}
_NATIVE_FLAT_RE = re.compile(rf"^({'|'.join(_NATIVE_FLAT_HEADS)})_(\d+)_(\w+)$")
_DIFF_FLAT_RE = re.compile(rf"^({'|'.join(_DIFF_FLAT_HEADS)})_(\d+)_(\w+)$")


def unflatten_native(flat_name: str) -> str | None:
    """``txtfusion_layerwise_blocks_0_mlp_up`` -> ``txtfusion.layerwise_blocks.0.mlp.up``
    (Linears only; ``None`` if it names no Linear)."""
    if flat_name in _NATIVE_FLAT_STANDALONE:
        return _NATIVE_FLAT_STANDALONE[flat_name]
    m = _NATIVE_FLAT_RE.match(flat_name)
    if not m or m.group(3) not in _NATIVE_FLAT_SUB:
        return None
    return f"{_NATIVE_FLAT_HEADS[m.group(1)]}.{m.group(2)}.{_NATIVE_FLAT_SUB[m.group(3)]}"


def unflatten_diffusers(flat_name: str) -> str | None:
    """``text_fusion_refiner_blocks_1_attn_to_out_0`` -> ``text_fusion.refiner_blocks.1.attn.to_out.0``
    (Linears, their aliases and the fused ``to_qkv``; ``None`` otherwise)."""
    if flat_name in _DIFF_FLAT_STANDALONE:
        return _DIFF_FLAT_STANDALONE[flat_name]
    m = _DIFF_FLAT_RE.match(flat_name)
    if not m or m.group(3) not in _DIFF_FLAT_SUB:
        return None
    return f"{_DIFF_FLAT_HEADS[m.group(1)]}.{m.group(2)}.{_DIFF_FLAT_SUB[m.group(3)]}"
