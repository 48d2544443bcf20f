"""What every LoRA key layout shares: key anatomy, the layout contract, metadata and alpha.

A key is ``<prefix><module path><suffix>``. The suffix names the tensor's role and is the
same in every layout (:func:`split_key`); the prefix and the spelling of the module path
are what a layout is. A layout is a :class:`KeyLayout`: its name, its prefixes and how its
module paths map to native Linear names. Each built-in layout is one module beside this
one; :mod:`.reader` turns the keys a set of layouts claims into a :class:`~.form.LoraFile`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from krea2kit.models.key_names import COMFY_PREFIXES, DIFFUSERS_COMPONENT_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from .factors import ModuleGroup

# ---------------------------------------------------------------------------
# Key anatomy

#: tensor suffixes -> role, longest first so ``.lora_A.weight`` wins over ``.weight``.
SUFFIXES: list[tuple[str, str]] = sorted(
    [
        (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A", "down"), (".lora_B", "up"),
        (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
        (".alpha", "alpha"),
        (".dora_scale", "dora_scale"), (".magnitude", "magnitude"),
        (".lora_magnitude_vector.weight", "lora_magnitude_vector"), (".lora_magnitude_vector", "lora_magnitude_vector"),
        (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
        (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t1", "lokr_t1"),
        (".lokr_t2", "lokr_t2"),
        (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
        (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
        (".diff", "diff"), (".diff_b", "diff_b"),
        (".weight", "weight"), (".bias", "bias"),
    ],
    key=lambda s: -len(s[0]),
)
#: the low-rank pair's suffixes without ``.weight`` (the krea-2 trainer writes them so).
BARE_LORA_SUFFIXES = (".lora_A", ".lora_B")
#: prefixes before dotted module names (native or diffusers spelling): ComfyUI, PEFT's
#: ``base_model.model.``, a diffusers pipeline's ``transformer.``, and none ("" last).
DOTTED_PREFIXES = (*COMFY_PREFIXES, "base_model.model.", DIFFUSERS_COMPONENT_PREFIX, "")


def split_key(key: str) -> tuple[str, str] | None:
    """``(module path, role)`` of a tensor key, or ``None`` if its suffix is unknown."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass(frozen=True)
class Claim:
    """A key a layout recognises: the module path as the file spells it (prefix included),
    the tensor role, the prefix, and the native Linear (or fused q/k/v triple) it changes."""

    raw_module: str
    role: str
    prefix: str
    target: str | tuple[str, str, str]


@dataclass(frozen=True)
class KeyLayout:
    """One way of naming LoRA tensors.

    name: reported as ``LoraFile.layout`` (``lora inspect``).
    prefixes: key prefixes it accepts, tried in order ("" = none).
    to_native: a module path after the prefix -> its native Linear name (or the fused
        (wq, wk, wv) triple), ``None`` if this layout does not spell it so.
    refines: the name of a layout this one is a special case of (same names, its own
        scale convention). Its modules count as that layout's when the spelling naming
        most modules is chosen; it then names the file if :meth:`claims_file` agrees.

    Subclass to change how keys are claimed (:meth:`claim`), when a refinement names the
    file (:meth:`claims_file`) or to read a file-wide scale from the metadata (:meth:`file_scale`).
    """

    name: str
    prefixes: tuple[str, ...]
    to_native: Callable[[str], "str | tuple[str, str, str] | None"]
    refines: str = ""

    def claim(self, key: str) -> Claim | None:
        split = split_key(key)
        if split is None:
            return None
        path, role = split
        for prefix in self.prefixes:
            if path.startswith(prefix):
                target = self.to_native(path[len(prefix):])
                if target is not None:
                    return Claim(path, role, prefix, target)
        return None

    def detect(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        """Whether any key is spelled this way (the file may still be refused when parsed)."""
        return any(self.claim(k) is not None for k in keys)

    def claims_file(self, groups: Sequence[ModuleGroup]) -> bool:
        """For a refinement: whether the file is this layout rather than the one it refines."""
        return True

    def file_scale(self, metadata: Mapping[str, str]) -> tuple[float, list[str]]:
        """A factor on every module's scale when this layout names most of the file, and
        notes saying where it came from. Default: none."""
        return 1.0, []


def attempt(fn: Callable[[str], object]) -> Callable[[str], object]:
    """``fn`` with ``KeyError`` turned into ``None`` (the :attr:`KeyLayout.to_native` shape)."""

    def wrapped(name: str):
        try:
            return fn(name)
        except KeyError:
            return None

    return wrapped


# ---------------------------------------------------------------------------
# Files for other models (signatures from the key conventions of each family).

FOREIGN_SIGNATURES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|x_embedder|context_embedder|add_q_proj|ff_context)([._]|$)"),
     "a FLUX LoRA"),
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)([._]|$)"),
     "an SDXL / Stable Diffusion UNet LoRA"),
    (re.compile(r"(^|[._])(img_mlp|txt_mlp|img_mod|txt_mod)([._]|$)"), "a Qwen-Image LoRA"),
    (re.compile(r"(^|[._])(self_attn|cross_attn)([._]|$)"), "a Wan / video-model LoRA"),
]
TEXT_ENCODER_RE = re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.|te\d?\.|text_model\.|lora_te_)")


def foreign_kind(keys: Iterable[str]) -> str | None:
    """What other model a file's keys are for, or ``None``."""
    for key in keys:
        for pattern, what in FOREIGN_SIGNATURES:
            if pattern.search(key):
                return what
    return None


# ---------------------------------------------------------------------------
# Metadata

#: keys naming the model a LoRA was trained on (musubi, kohya, modelspec, ai-toolkit, PEFT, krea-2).
BASE_MODEL_KEYS = ("ss_krea2_dit_variant", "ss_base_model_version", "base_model", "base_model_name_or_path",
                   "modelspec.architecture", "ss_sd_model_name", "checkpoint")
TRIGGER_KEYS = ("trigger_word", "trigger_words", "trigger_phrase", "modelspec.trigger_phrase",
                "ss_trigger_words", "activation_text", "instance_prompt")
#: diffusers' metadata key (``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``).
PEFT_METADATA_KEY = "lora_adapter_metadata"


def base_model(meta: Mapping[str, str]) -> str | None:
    """``key=value`` of every metadata entry naming the base model, or ``None``."""
    found = [f"{k}={meta[k]}" for k in BASE_MODEL_KEYS if meta.get(k)]
    return ", ".join(found) if found else None


def trigger_words(meta: Mapping[str, str]) -> list[str]:
    """Trigger words from any of :data:`TRIGGER_KEYS` (a JSON list or comma-separated)."""
    words: list[str] = []
    for k in TRIGGER_KEYS:
        raw = meta.get(k)
        if not raw:
            continue
        items: list[str]
        try:
            val = json.loads(raw)
            items = [str(v) for v in val] if isinstance(val, list) else [str(val)]
        except (json.JSONDecodeError, TypeError):
            items = [w for w in (p.strip() for p in raw.split(",")) if w]
        for w in items:
            if w and w not in words:
                words.append(w)
    return words


def peft_config(meta: Mapping[str, str]) -> dict | None:
    """The PEFT ``LoraConfig`` fields diffusers stores in the metadata, or ``None``."""
    raw = meta.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(cfg, dict):
        return None
    # Pipeline-saved files prefix each field with the component ("transformer.r").
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg


def _pattern_value(patterns: Mapping[str, object] | None, module: str):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches ``(.*\\.)?key$``."""
    if not patterns:
        return None
    for key in sorted(patterns, key=len, reverse=True):
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return None


def peft_scale(cfg: Mapping, *module_names: str) -> float:
    """PEFT's scale for a module: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), patterns first.

    Patterns are tried against each spelling of the module (diffusers, then native: a PEFT
    folder made on the native model names its modules natively)."""
    def lookup(patterns):
        for name in module_names:
            v = _pattern_value(patterns, name)
            if v is not None:
                return v
        return None

    r = lookup(cfg.get("rank_pattern")) or cfg.get("r")
    alpha = lookup(cfg.get("alpha_pattern"))
    alpha = cfg.get("lora_alpha") if alpha is None else alpha
    if not r or alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(float(r)) if cfg.get("use_rslora") else float(r))


def meta_float(meta: Mapping[str, str], key: str, default: float) -> float:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return default
