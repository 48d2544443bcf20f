"""Read every LoRA layout of the Krea 2 ecosystem into one form keyed by native module names.

Layouts read (sources: krea2kit reference notes, ``krea2_ecosystem.md`` §3.5, §4.2, §5, §6
and ``filters_sliders_perf.md`` §2.3):

* **diffusers / PEFT**: ``transformer.<diffusers module>.lora_A/lora_B.weight`` (official Krea
  style LoRAs, the diffusers trainer). No alpha tensors; alpha comes from the safetensors
  metadata ``lora_adapter_metadata`` when present (``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern``, ``alpha_pattern``), else the scale is 1.
* **native**: ``diffusion_model.<native>`` (ai-toolkit, ComfyUI), ``base_model.model.<native>``
  and bare native names, with ``lora_A/lora_B(.weight)``; the krea-2 training output
  (bare native ``.lora_A`` without ``.weight``, metadata ``rank``/``lora_alpha``/``lora_scale``).
* **kohya / musubi**: ``lora_unet_<native with underscores>.lora_down/lora_up.weight`` + ``.alpha``,
  unflattened by vocabulary (``layerwise_blocks``/``refiner_blocks`` contain underscores).
* **LyCORIS** LoKr / LoHa under any of the prefixes above, and SimpleTuner's
  ``lycoris_<diffusers module with underscores>``, including a fused ``to_qkv`` split back
  into q / k / v.
* **DoRA** magnitudes (``dora_scale``, ``.magnitude``, ``lora_magnitude_vector``) and full
  deltas (``.diff`` / ``.diff_b``).

Everything becomes a :class:`LoraDelta` per native Linear name (``blocks.3.attn.wq``). Files
meant for another model are refused with :class:`~krea2kit.errors.WeightsError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from krea2kit.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# ---------------------------------------------------------------------------
# Module vocabulary: native <-> diffusers names of the 264 Linears (ecosystem notes §1.2, §3.3).

#: sub-module names inside a main block / text-fusion block: native -> diffusers.
BLOCK_LINEARS: dict[str, str] = {
    "attn.wq": "attn.to_q",
    "attn.wk": "attn.to_k",
    "attn.wv": "attn.to_v",
    "attn.gate": "attn.to_gate",
    "attn.wo": "attn.to_out.0",
    "mlp.gate": "ff.gate",
    "mlp.up": "ff.up",
    "mlp.down": "ff.down",
}
#: the Linears outside the blocks: native -> diffusers.
STANDALONE_LINEARS: dict[str, str] = {
    "first": "img_in",
    "last.linear": "final_layer.linear",
    "tmlp.0": "time_embed.linear_1",
    "tmlp.2": "time_embed.linear_2",
    "tproj.1": "time_mod_proj",
    "txtmlp.1": "txt_in.linear_1",
    "txtmlp.3": "txt_in.linear_2",
    "txtfusion.projector": "text_fusion.projector",
}
TEXT_FUSION_GROUPS = ("layerwise_blocks", "refiner_blocks")

#: ``first`` takes 2x2-patchified 16-channel latents: 16*2*2 = 64 inputs (official config
#: ``channels=16, patch=2``). A ``first`` delta with other in_features needs an extra input
#: (a control image concatenated per token, e.g. the depth control LoRA, notes §6).
LATENT_IN_FEATURES = 64

_DIFF_TO_NATIVE_SUB = {v: k for k, v in BLOCK_LINEARS.items()}
_DIFF_TO_NATIVE_SUB["attn.to_out"] = "attn.wo"  # ComfyUI also registers ``to_out`` (notes §4.2)
_DIFF_STANDALONE_TO_NATIVE = {v: k for k, v in STANDALONE_LINEARS.items()}

#: marker for a fused q/k/v projection (SimpleTuner ``fuse_qkv_projections``).
FUSED_QKV = "attn.to_qkv"

_NATIVE_BLOCK_RE = re.compile(r"^(blocks\.\d+|txtfusion\.(?:layerwise|refiner)_blocks\.\d+)\.(attn\.\w+|mlp\.\w+)$")
_DIFF_BLOCK_RE = re.compile(r"^(transformer_blocks\.\d+|text_fusion\.(?:layerwise|refiner)_blocks\.\d+)\.(.+)$")


def native_to_diffusers(native: str) -> str:
    """``blocks.3.attn.wq`` -> ``transformer_blocks.3.attn.to_q`` (module names, no ``.weight``)."""
    if native in STANDALONE_LINEARS:
        return STANDALONE_LINEARS[native]
    m = _NATIVE_BLOCK_RE.match(native)
    if not m or m.group(2) not in BLOCK_LINEARS:
        raise KeyError(native)
    head = m.group(1)
    head = ("transformer_" + head) if head.startswith("blocks.") else head.replace("txtfusion.", "text_fusion.", 1)
    return f"{head}.{BLOCK_LINEARS[m.group(2)]}"


def diffusers_to_native(name: str) -> str | tuple[str, str, str]:
    """Inverse of :func:`native_to_diffusers`; a fused ``attn.to_qkv`` gives (wq, wk, wv)."""
    if name in _DIFF_STANDALONE_TO_NATIVE:
        return _DIFF_STANDALONE_TO_NATIVE[name]
    m = _DIFF_BLOCK_RE.match(name)
    if not m:
        raise KeyError(name)
    head, sub = m.group(1), m.group(2)
    head = head[len("transformer_"):] if head.startswith("transformer_blocks.") else head.replace("text_fusion.", "txtfusion.", 1)
    if sub == FUSED_QKV:
        return (f"{head}.attn.wq", f"{head}.attn.wk", f"{head}.attn.wv")
    if sub not in _DIFF_TO_NATIVE_SUB:
        raise KeyError(name)
    return f"{head}.{_DIFF_TO_NATIVE_SUB[sub]}"


def is_native_linear(name: str) -> bool:
    if name in STANDALONE_LINEARS:
        return True
    m = _NATIVE_BLOCK_RE.match(name)
    return bool(m and m.group(2) in BLOCK_LINEARS)


# Flattened (underscore) names: kohya ``lora_unet_`` uses native names, SimpleTuner's LyCORIS
# ``lycoris_`` uses diffusers names. ``_`` -> ``.`` is ambiguous (``layerwise_blocks``,
# ``to_out_0``, ``time_embed``), so unflatten by matching the known vocabulary.
def _flat(name: str) -> str:
    return name.replace(".", "_")


_NATIVE_FLAT_STANDALONE = {_flat(k): k for k in STANDALONE_LINEARS}
_NATIVE_FLAT_SUB = {_flat(k): k for k in BLOCK_LINEARS}
_DIFF_FLAT_STANDALONE = {_flat(v): v for v in STANDALONE_LINEARS.values()}
_DIFF_FLAT_SUB = {_flat(k): k for k in list(_DIFF_TO_NATIVE_SUB) + [FUSED_QKV]}
_NATIVE_FLAT_RE = re.compile(r"^(blocks|txtfusion_layerwise_blocks|txtfusion_refiner_blocks)_(\d+)_(\w+)$")
_DIFF_FLAT_RE = re.compile(r"^(transformer_blocks|text_fusion_layerwise_blocks|text_fusion_refiner_blocks)_(\d+)_(\w+)$")


def unflatten_native(flat: str) -> str | None:
    """``txtfusion_layerwise_blocks_0_mlp_up`` -> ``txtfusion.layerwise_blocks.0.mlp.up``."""
    if flat in _NATIVE_FLAT_STANDALONE:
        return _NATIVE_FLAT_STANDALONE[flat]
    m = _NATIVE_FLAT_RE.match(flat)
    if not m or m.group(3) not in _NATIVE_FLAT_SUB:
        return None
    head = {"blocks": "blocks", "txtfusion_layerwise_blocks": "txtfusion.layerwise_blocks",
            "txtfusion_refiner_blocks": "txtfusion.refiner_blocks"}[m.group(1)]
    return f"{head}.{m.group(2)}.{_NATIVE_FLAT_SUB[m.group(3)]}"


def unflatten_diffusers(flat: str) -> str | None:
    """``text_fusion_refiner_blocks_1_attn_to_out_0`` -> ``text_fusion.refiner_blocks.1.attn.to_out.0``."""
    if flat in _DIFF_FLAT_STANDALONE:
        return _DIFF_FLAT_STANDALONE[flat]
    m = _DIFF_FLAT_RE.match(flat)
    if not m or m.group(3) not in _DIFF_FLAT_SUB:
        return None
    head = {"transformer_blocks": "transformer_blocks", "text_fusion_layerwise_blocks": "text_fusion.layerwise_blocks",
            "text_fusion_refiner_blocks": "text_fusion.refiner_blocks"}[m.group(1)]
    return f"{head}.{m.group(2)}.{_DIFF_FLAT_SUB[m.group(3)]}"


# ---------------------------------------------------------------------------
# Key anatomy: <prefix><module path><suffix>

#: tensor suffixes, longest first so ``.lora_A.weight`` wins over ``.weight``.
_SUFFIXES: list[tuple[str, str]] = sorted(
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

#: prefixes, longest first; the style says how the module path after it is spelled.
_PREFIXES: list[tuple[str, tuple[str, ...]]] = [
    ("model.diffusion_model.", ("native", "diffusers")),
    ("base_model.model.", ("native", "diffusers")),
    ("diffusion_model.", ("native", "diffusers")),
    ("transformer.", ("diffusers", "native")),
    ("lora_transformer_", ("diffusers_flat", "native_flat")),
    ("lora_unet_", ("native_flat", "diffusers_flat")),
    ("lycoris_", ("diffusers_flat", "native_flat")),
    ("", ("native", "diffusers")),
]

#: name spellings -> the layout name reported to people.
_LAYOUT_OF_STYLE = {"native": "native", "diffusers": "diffusers", "native_flat": "kohya", "diffusers_flat": "lycoris"}


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _resolve(path: str) -> tuple[str, str, str | tuple[str, str, str]] | None:
    """(prefix, style, native name or fused triple) for a module path, or None."""
    for prefix, styles in _PREFIXES:
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        for style in styles:
            target: str | tuple[str, str, str] | None
            if style == "native":
                target = rest if is_native_linear(rest) else None
            elif style == "diffusers":
                try:
                    target = diffusers_to_native(rest)
                except KeyError:
                    target = None
            elif style == "native_flat":
                target = unflatten_native(rest)
            else:
                d = unflatten_diffusers(rest)
                target = diffusers_to_native(d) if d else None
            if target is not None:
                return prefix, style, target
    return None


# ---------------------------------------------------------------------------
# Files for other models (signatures from the key conventions of each family).

_FOREIGN_SIGNATURES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|x_embedder|context_embedder|add_q_proj|ff_context)([._]|$)"),
     "a FLUX LoRA"),
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)([._]|$)"),
     "an SDXL / Stable Diffusion UNet LoRA"),
    (re.compile(r"(^|[._])(img_mlp|txt_mlp|img_mod|txt_mod)([._]|$)"), "a Qwen-Image LoRA"),
    (re.compile(r"(^|[._])(self_attn|cross_attn)([._]|$)"), "a Wan / video-model LoRA"),
]
_TEXT_ENCODER_RE = re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.|te\d?\.|text_model\.|lora_te_)")


def _foreign_kind(keys: Iterable[str]) -> str | None:
    for key in keys:
        for pattern, what in _FOREIGN_SIGNATURES:
            if pattern.search(key):
                return what
    return None


# ---------------------------------------------------------------------------
# The internal form

LORA, LOKR, LOHA, FULL = "lora", "lokr", "loha", "full"


@dataclass
class LoraDelta:
    """One module's weight change, kept factored.

    ``kind`` and ``factors`` (the stored tensors, stored dtype):

    * ``lora``: ``down`` (r, in), ``up`` (out, r); ΔW = scale · up @ down.
    * ``lokr``: ``w1`` or ``w1_a``/``w1_b``, ``w2`` or ``w2_a``/``w2_b``;
      ΔW = scale · kron(W1, W2).
    * ``loha``: ``w1_a`` (out, r), ``w1_b`` (r, in), ``w2_a``, ``w2_b``;
      ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b).
    * ``full``: ``diff`` (out, in) and optionally ``diff_b`` (out,) for the bias.

    ``magnitude`` (DoRA) is a 1-D vector along ``magnitude_axis`` ("out": one norm per output
    row, as PEFT's ``lora_magnitude_vector`` and LyCORIS ``wd_on_out``; "in": one per input
    column, as kohya's original ``dora_scale`` [1, in]). The axis is read from the stored shape.
    """

    module: str
    kind: str
    factors: dict[str, "torch.Tensor"]
    scale: float = 1.0
    magnitude: "torch.Tensor | None" = None
    magnitude_axis: str | None = None
    source_keys: tuple[str, ...] = ()

    # -- shape -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        f = self.factors
        if self.kind == LORA:
            return (int(f["up"].shape[0]), int(f["down"].shape[1]))
        if self.kind == LOHA:
            return (int(f["w1_a"].shape[0]), int(f["w1_b"].shape[1]))
        if self.kind == FULL:
            return (int(f["diff"].shape[0]), int(f["diff"].shape[1]))
        a, b = self._w1_shape()
        c, d = self._w2_shape()
        return (a * c, b * d)

    def _w1_shape(self) -> tuple[int, int]:
        f = self.factors
        if "w1" in f:
            return (int(f["w1"].shape[0]), int(f["w1"].shape[1]))
        return (int(f["w1_a"].shape[0]), int(f["w1_b"].shape[1]))

    def _w2_shape(self) -> tuple[int, int]:
        f = self.factors
        if "w2" in f:
            return (int(f["w2"].shape[0]), int(f["w2"].shape[1]))
        return (int(f["w2_a"].shape[0]), int(f["w2_b"].shape[1]))

    @property
    def rank(self) -> int | None:
        f = self.factors
        if self.kind == LORA:
            return int(f["down"].shape[0])
        if self.kind == LOHA:
            return int(f["w1_b"].shape[0])
        if self.kind == LOKR:
            if "w1_b" in f:
                return int(f["w1_b"].shape[0])
            if "w2_b" in f:
                return int(f["w2_b"].shape[0])
        return None

    @property
    def dtype(self) -> "torch.dtype":
        return next(iter(self.factors.values())).dtype

    def numel(self) -> int:
        n = sum(t.numel() for t in self.factors.values())
        return n + (self.magnitude.numel() if self.magnitude is not None else 0)

    # -- reconstruction ----------------------------------------------------
    def w1(self, dtype=None, device=None) -> "torch.Tensor":
        f = self.factors
        if "w1" in f:
            return f["w1"].to(device=device, dtype=dtype)
        return f["w1_a"].to(device=device, dtype=dtype) @ f["w1_b"].to(device=device, dtype=dtype)

    def w2(self, dtype=None, device=None) -> "torch.Tensor":
        f = self.factors
        if "w2" in f:
            return f["w2"].to(device=device, dtype=dtype)
        return f["w2_a"].to(device=device, dtype=dtype) @ f["w2_b"].to(device=device, dtype=dtype)

    def dense(self, dtype=None, device=None) -> "torch.Tensor":
        """ΔW (out, in) with ``scale`` applied, without DoRA. fp32 unless ``dtype`` is given."""
        import torch

        dtype = dtype or torch.float32
        f = self.factors
        if self.kind == LORA:
            w = f["up"].to(device=device, dtype=dtype) @ f["down"].to(device=device, dtype=dtype)
        elif self.kind == LOHA:
            t = lambda k: f[k].to(device=device, dtype=dtype)  # noqa: E731
            w = (t("w1_a") @ t("w1_b")) * (t("w2_a") @ t("w2_b"))
        elif self.kind == LOKR:
            w = torch.kron(self.w1(dtype, device), self.w2(dtype, device))
        else:
            w = f["diff"].to(device=device, dtype=dtype)
        return w * self.scale if self.scale != 1.0 else w

    def bias_delta(self, dtype=None, device=None) -> "torch.Tensor | None":
        b = self.factors.get("diff_b")
        if b is None:
            return None
        b = b.to(device=device, dtype=dtype)
        return b * self.scale if self.scale != 1.0 else b

    def effective_delta(self, base_weight: "torch.Tensor", dtype=None) -> "torch.Tensor":
        """The change at strength 1 against ``base_weight``: ΔW, or for DoRA ``W' - W``.

        DoRA: ``W' = m · (W + ΔW) / ‖W + ΔW‖`` (norm along the magnitude axis). Strength ``s``
        then gives ``W + s · (W' - W)``, the blend ComfyUI uses (``weight_decompose``); it is
        linear in ``s`` and equals full DoRA at ``s = 1``.
        """
        import torch

        dtype = dtype or torch.float32
        delta = self.dense(torch.float32, base_weight.device)
        if self.magnitude is None:
            return delta.to(dtype)
        w = base_weight.to(torch.float32)
        merged = w + delta
        m = self.magnitude.to(device=w.device, dtype=torch.float32)
        if self.magnitude_axis == "out":
            merged = merged * (m / merged.norm(dim=1)).unsqueeze(1)
        else:
            merged = merged * (m / merged.norm(dim=0)).unsqueeze(0)
        return (merged - w).to(dtype)


@dataclass
class LoraFile:
    """A parsed LoRA file: deltas per native module name, plus what the file says about itself."""

    deltas: dict[str, LoraDelta]
    layout: str
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    path: str | None = None
    name: str = ""
    key_prefix: str = ""
    base_model: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_tensors: int = 0

    def __len__(self) -> int:
        return len(self.deltas)

    def modules(self) -> list[str]:
        return list(self.deltas)

    def kinds(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.deltas.values()))

    def ranks(self) -> dict[int, int]:
        return dict(Counter(d.rank for d in self.deltas.values() if d.rank is not None))

    def scales(self) -> dict[float, int]:
        return dict(Counter(round(d.scale, 8) for d in self.deltas.values()))

    def dtypes(self) -> dict[str, int]:
        return dict(Counter(str(d.dtype).replace("torch.", "") for d in self.deltas.values()))

    def has_dora(self) -> bool:
        return any(d.magnitude is not None for d in self.deltas.values())

    def coverage(self) -> dict[str, int]:
        """How many modules per part of the model (main blocks, text fusion, standalone)."""
        c = Counter()
        for m in self.deltas:
            c["blocks" if m.startswith("blocks.") else "txtfusion_blocks" if m.startswith("txtfusion.") and "_blocks." in m else "standalone"] += 1
        return dict(c)

    def summary(self) -> dict:
        """A JSON-able description (``lora inspect --json``)."""
        return {
            "path": self.path,
            "name": self.name,
            "layout": self.layout,
            "key_prefix": self.key_prefix,
            "tensors": self.num_tensors,
            "modules": len(self.deltas),
            "coverage": self.coverage(),
            "kinds": self.kinds(),
            "ranks": {str(k): v for k, v in sorted(self.ranks().items())},
            "scales": {repr(k): v for k, v in self.scales().items()},
            "dtypes": self.dtypes(),
            "dora": self.has_dora(),
            "base_model": self.base_model,
            "trigger_words": self.trigger_words,
            "unmatched": len(self.unmatched),
            "unmatched_keys": self.unmatched[:50],
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------
# Metadata

#: keys naming the model a LoRA was trained on (musubi, kohya, modelspec, ai-toolkit, PEFT, krea-2).
BASE_MODEL_KEYS = ("ss_krea2_dit_variant", "ss_base_model_version", "base_model", "base_model_name_or_path",
                   "modelspec.architecture", "ss_sd_model_name", "checkpoint")
TRIGGER_KEYS = ("trigger_word", "trigger_words", "trigger_phrase", "modelspec.trigger_phrase",
                "ss_trigger_words", "activation_text", "instance_prompt")
#: diffusers' metadata key (``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``).
PEFT_METADATA_KEY = "lora_adapter_metadata"


def _base_model(meta: Mapping[str, str]) -> str | None:
    found = [f"{k}={meta[k]}" for k in BASE_MODEL_KEYS if meta.get(k)]
    return ", ".join(found) if found else None


def _trigger_words(meta: Mapping[str, str]) -> list[str]:
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


def _peft_config(meta: Mapping[str, str]) -> dict | None:
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


def _peft_scale(cfg: Mapping, *module_names: str) -> float:
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


def _meta_float(meta: Mapping[str, str], key: str, default: float) -> float:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return default


# ---------------------------------------------------------------------------
# Parsing


@dataclass
class _Group:
    target: str | tuple[str, str, str]
    raw_module: str
    prefix: str
    style: str
    tensors: dict[str, "torch.Tensor"] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    bare_lora_suffix: bool = False  # ``.lora_A`` without ``.weight`` (krea-2 training output)


def _refuse_control(group: _Group, in_features: int, file: str | None) -> None:
    raise WeightsError(
        f"this file carries an expanded input projection ({group.keys[0]}: in_features={in_features}, "
        f"the Krea 2 transformer takes {LATENT_IN_FEATURES}): a control adapter (e.g. a depth/pose control "
        "LoRA) that needs a control image concatenated to the latents, which krea2kit does not provide",
        file=file, key=group.keys[0],
        hint="use a plain style LoRA, or a tool that supports Krea 2 control adapters",
    )


def _kind_of(roles: set[str]) -> str | None:
    if roles & {"down", "up"}:
        return LORA
    if any(r.startswith("lokr_") for r in roles):
        return LOKR
    if any(r.startswith("hada_") for r in roles):
        return LOHA
    if roles & {"diff", "diff_b"}:
        return FULL
    return None


def _magnitude(group: _Group, out_f: int, in_f: int, file: str | None) -> tuple["torch.Tensor | None", str | None]:
    role = next((r for r in ("dora_scale", "magnitude", "lora_magnitude_vector") if r in group.tensors), None)
    if role is None:
        return None, None
    m = group.tensors[role]
    shape = tuple(m.shape)
    axis: str | None = None
    if len(shape) == 2 and shape == (out_f, 1):
        axis = "out"
    elif len(shape) == 2 and shape == (1, in_f):
        axis = "in"
    elif m.numel() == out_f and m.numel() != in_f:
        axis = "out"
    elif m.numel() == in_f and m.numel() != out_f:
        axis = "in"
    elif m.numel() == out_f:  # square weight with a 1-D vector: PEFT / ai-toolkit store it per output row
        axis = "out"
    if axis is None:
        raise WeightsError(f"DoRA magnitude of shape {shape} fits neither axis of a ({out_f}, {in_f}) weight",
                           file=file, key=group.raw_module + "." + role)
    return m.reshape(-1), axis


def _build_delta(group: _Group, alpha_default: float | None, scale_mult: float, file: str | None) -> LoraDelta:
    t = group.tensors
    roles = set(t)
    where = group.keys[0]
    bad = roles & {"mid", "lokr_t1", "hada_t1", "hada_t2"}
    if bad:
        raise WeightsError(f"a convolution adapter ({', '.join(sorted(bad))}) cannot apply to a Linear layer",
                           file=file, key=where)
    kind = _kind_of(roles)
    alpha_t = t.get("alpha")
    alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else None
    if kind == LORA:
        if not {"down", "up"} <= roles:
            raise WeightsError("incomplete LoRA pair (need both A/down and B/up)", file=file, key=where)
        down, up = t["down"], t["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise WeightsError(f"LoRA factors do not chain: down {tuple(down.shape)}, up {tuple(up.shape)}",
                               file=file, key=where)
        r = down.shape[0]
        if alpha is not None and alpha != 0:
            scale = alpha / r  # kohya: alpha/r; absent or 0 means alpha = r (notes §2.3)
        elif alpha_default is not None:
            scale = alpha_default
        else:
            scale = 1.0
        factors = {"down": down, "up": up}
    elif kind == LOKR:
        f: dict = {}
        for side in ("w1", "w2"):
            if f"lokr_{side}" in t:
                f[side] = t[f"lokr_{side}"]
            elif f"lokr_{side}_a" in t and f"lokr_{side}_b" in t:
                f[f"{side}_a"], f[f"{side}_b"] = t[f"lokr_{side}_a"], t[f"lokr_{side}_b"]
            else:
                raise WeightsError(f"incomplete LoKr factors (no {side})", file=file, key=where)
        if "lokr_t2" in t:
            if "w2_a" not in f:
                raise WeightsError("LoKr lokr_t2 without lokr_w2_a/b", file=file, key=where)
            # Tucker w2 (LyCORIS ``rebuild_tucker``): einsum('i j ..., j r, i p -> p r ...'); for a
            # Linear the core is 2-D, so W2 = w2_a @ t2 @ w2_b.
            t2 = t["lokr_t2"]
            if t2.dim() != 2:
                raise WeightsError("a convolution LoKr (4-D lokr_t2) cannot apply to a Linear layer", file=file, key=where)
            f["w2"] = (f.pop("w2_a").float() @ t2.float() @ f.pop("w2_b").float()).to(t2.dtype)
        # LyCORIS (``rank_scale``): scale = alpha / r with r from a factored side; if neither side
        # is factored the scale is 1 whatever alpha says.
        factored = f.get("w1_b", f.get("w2_b"))
        if factored is not None:
            r = factored.shape[0]
            scale = (alpha / r) if (alpha is not None and alpha != 0) else 1.0
        else:
            scale = 1.0
        factors = f
    elif kind == LOHA:
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not need <= roles:
            raise WeightsError("incomplete LoHa factors", file=file, key=where)
        factors = {k[len("hada_"):]: t[k] for k in need}
        r = factors["w1_b"].shape[0]
        scale = (alpha / r) if (alpha is not None and alpha != 0) else 1.0
    elif kind == FULL:
        if "diff" not in t:
            raise WeightsError("a bias-only delta (diff_b without diff) is not supported", file=file, key=where)
        factors = {"diff": t["diff"]}
        if "diff_b" in t:
            factors["diff_b"] = t["diff_b"]
        scale = 1.0
    else:
        raise WeightsError("no adapter tensors for this module (only alpha/magnitude)", file=file, key=where)
    target = group.target if isinstance(group.target, str) else "+".join(group.target)
    delta = LoraDelta(module=target, kind=kind, factors=factors, scale=float(scale) * scale_mult,
                      source_keys=tuple(group.keys))
    out_f, in_f = delta.shape
    delta.magnitude, delta.magnitude_axis = _magnitude(group, out_f, in_f, file)
    return delta


def _slice_rows(delta: LoraDelta, module: str, start: int, stop: int, file: str | None) -> LoraDelta:
    """Rows [start, stop) of a fused delta as its own delta (exact; LoKr stays LoKr when aligned)."""
    import torch

    f = delta.factors
    if delta.kind == LORA:
        factors = {"down": f["down"].clone(), "up": f["up"][start:stop].clone()}
        kind = LORA
    elif delta.kind == LOHA:
        factors = {"w1_a": f["w1_a"][start:stop].clone(), "w1_b": f["w1_b"].clone(),
                   "w2_a": f["w2_a"][start:stop].clone(), "w2_b": f["w2_b"].clone()}
        kind = LOHA
    elif delta.kind == LOKR:
        c = delta._w2_shape()[0]
        if start % c == 0 and stop % c == 0:
            # kron(W1, W2)[i*c:(j)*c] = kron(W1[i:j], W2): slice W1's rows.
            factors = {k: v.clone() for k, v in f.items() if k.startswith("w2")}
            if "w1" in f:
                factors["w1"] = f["w1"][start // c: stop // c].clone()
            else:
                factors["w1_a"] = f["w1_a"][start // c: stop // c].clone()
                factors["w1_b"] = f["w1_b"].clone()
            kind = LOKR
        else:  # boundaries cut through W2 blocks: no Kronecker form; keep the exact dense rows.
            factors = {"diff": delta.dense(torch.float32)[start:stop].contiguous()}
            kind = FULL
    else:
        factors = {"diff": f["diff"][start:stop].clone()}
        if "diff_b" in f:
            factors["diff_b"] = f["diff_b"][start:stop].clone()
        kind = FULL
    out = LoraDelta(module=module, kind=kind, factors=factors,
                    scale=1.0 if (kind == FULL and delta.kind != FULL) else delta.scale,
                    source_keys=delta.source_keys)
    if delta.magnitude is not None:
        if delta.magnitude_axis != "out":
            raise WeightsError("a DoRA magnitude per input column cannot be split across a fused q/k/v projection",
                               file=file, key=delta.source_keys[0])
        out.magnitude = delta.magnitude[start:stop].clone()
        out.magnitude_axis = "out"
    return out


def _split_fused(delta: LoraDelta, targets: tuple[str, str, str], file: str | None) -> list[LoraDelta]:
    # Krea 2's q projection is square (heads * 128 == features, both in the main blocks and in
    # text fusion), and k / v have kvheads * 128 rows each, so rows = in + 2 * kv (notes §1.2).
    total, in_f = delta.shape
    kv2 = total - in_f
    if kv2 <= 0 or kv2 % 2:
        raise WeightsError(f"fused to_qkv delta of shape ({total}, {in_f}) does not split into q ({in_f}) + 2 equal k/v",
                           file=file, key=delta.source_keys[0])
    kv = kv2 // 2
    bounds = [(0, in_f), (in_f, in_f + kv), (in_f + kv, total)]
    return [_slice_rows(delta, t, a, b, file) for t, (a, b) in zip(targets, bounds)]


def parse_lora_state_dict(
    tensors: Mapping[str, "torch.Tensor"],
    metadata: Mapping[str, str] | None = None,
    *,
    strict: bool = False,
    path: str | None = None,
    name: str | None = None,
) -> LoraFile:
    """Parse a LoRA state dict (any supported layout) into a :class:`LoraFile`."""
    return _parse(list(tensors), lambda keys: {k: tensors[k] for k in keys}, dict(metadata or {}),
                  strict=strict, path=path, name=name)


def load_lora(path: str | os.PathLike, *, strict: bool = False, name: str | None = None) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (or folder) into a :class:`LoraFile`.

    ``strict=True`` makes keys that match no Krea 2 module an error; otherwise they are
    counted and listed in ``LoraFile.unmatched``. Raises :class:`WeightsError` for files meant
    for another model, control adapters needing an extra input, and malformed factors.
    """
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
    return _parse(ckpt.keys(), ckpt.get_many, metadata, strict=strict,
                  path=str(path), name=name or (p.stem if p.is_file() else p.name))


def _parse(keys, read, metadata: dict, *, strict: bool, path: str | None, name: str | None) -> LoraFile:
    keys = list(keys)
    if not keys:
        raise WeightsError("the LoRA file holds no tensors", file=path)
    te_keys = [k for k in keys if _TEXT_ENCODER_RE.match(k)]
    model_keys = [k for k in keys if not _TEXT_ENCODER_RE.match(k)]
    foreign = _foreign_kind(model_keys)
    if foreign:
        raise WeightsError(f"this file is {foreign}, not a Krea 2 LoRA", file=path,
                           hint="Krea 2 LoRAs name modules like blocks.N.attn.wq or transformer_blocks.N.attn.to_q")
    if te_keys and not model_keys:
        raise WeightsError("this file is a text-encoder LoRA; krea2kit applies LoRAs to the Krea 2 transformer only",
                           file=path, key=te_keys[0],
                           hint="Krea 2's diffusers loader does not load text-encoder LoRAs either")

    groups: dict[str, _Group] = {}
    unmatched: list[str] = list(te_keys)
    for key in model_keys:
        split = _split_key(key)
        res = _resolve(split[0]) if split else None
        if res is None:
            unmatched.append(key)
            continue
        raw_module, role = split
        prefix, style, target = res
        if role in ("weight", "bias"):
            # A plain weight in a LoRA file: only meaningful as a replaced ``first`` projection.
            if target == "first" and role == "weight":
                g = _Group(target, raw_module, prefix, style, keys=[key])
                # shape without reading: parse both readers the same way
                shape = tuple(read([key])[key].shape)
                if len(shape) == 2 and shape[1] != LATENT_IN_FEATURES:
                    _refuse_control(g, shape[1], path)
            unmatched.append(key)
            continue
        g = groups.get(raw_module)
        if g is None:
            g = groups[raw_module] = _Group(target, raw_module, prefix, style)
        if role in g.tensors:
            raise WeightsError(f"two tensors for the same role {role!r} of one module", file=path, key=key)
        g.keys.append(key)
        g.tensors[role] = key  # type: ignore[assignment]  # filled with tensors below
        if role in ("down", "up") and not key.endswith(".weight"):
            g.bare_lora_suffix = True

    # Groups with only an alpha / magnitude and nothing to scale are leftovers, not modules.
    for raw, g in list(groups.items()):
        if _kind_of(set(g.tensors)) is None and not (set(g.tensors) & {"mid", "lokr_t1", "hada_t1", "hada_t2"}):
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

    # Scale conventions that live outside the tensors.
    styles = Counter(g.style for g in groups.values())
    style = styles.most_common(1)[0][0]
    layout = _LAYOUT_OF_STYLE[style]
    notes: list[str] = []
    peft_cfg = _peft_config(metadata)
    krea_training = all(g.bare_lora_suffix for g in groups.values() if "down" in g.tensors) and any(
        "down" in g.tensors for g in groups.values()) and style == "native" and not any(g.prefix for g in groups.values())
    scale_mult = 1.0
    if krea_training:
        layout = "krea-training"
        rank_meta = _meta_float(metadata, "rank", 0.0)
        alpha_meta = _meta_float(metadata, "lora_alpha", rank_meta)
        scale_mult = _meta_float(metadata, "lora_scale", 1.0)
        if rank_meta and alpha_meta != rank_meta:
            scale_mult *= alpha_meta / rank_meta
        if scale_mult != 1.0:
            notes.append(f"scale {scale_mult:g} from metadata (lora_alpha / rank * lora_scale)")
    if peft_cfg:
        notes.append("alpha from lora_adapter_metadata")
    if len(styles) > 1:
        notes.append("mixed key spellings: " + ", ".join(f"{_LAYOUT_OF_STYLE[s]} x{n}" for s, n in styles.items()))

    deltas: dict[str, LoraDelta] = {}
    fused = 0
    for g in groups.values():
        alpha_default = None
        if peft_cfg and "alpha" not in g.tensors:
            if isinstance(g.target, tuple):
                dmod = native_to_diffusers(g.target[0]).rsplit(".", 2)[0] + "." + FUSED_QKV
                alpha_default = _peft_scale(peft_cfg, dmod)
            else:
                alpha_default = _peft_scale(peft_cfg, native_to_diffusers(g.target), g.target)
        delta = _build_delta(g, alpha_default, scale_mult, path)
        parts = _split_fused(delta, g.target, path) if isinstance(g.target, tuple) else [delta]
        fused += isinstance(g.target, tuple)
        for d in parts:
            if d.module in deltas:
                raise WeightsError(f"two adapters for the module {d.module}", file=path, key=d.source_keys[0],
                                   hint="the file spells the same module twice (e.g. native and diffusers names)")
            if d.module == "first" and d.shape[1] != LATENT_IN_FEATURES:
                _refuse_control(g, d.shape[1], path)
            deltas[d.module] = d
    if fused:
        notes.append(f"{fused} fused to_qkv adapters split into q / k / v")
    prefixes = Counter(g.prefix for g in groups.values())
    return LoraFile(
        deltas=dict(sorted(deltas.items(), key=lambda kv: _module_order(kv[0]))),
        layout=layout,
        metadata=dict(metadata),
        unmatched=unmatched,
        path=path,
        name=name or (Path(path).stem if path else "lora"),
        key_prefix=prefixes.most_common(1)[0][0],
        base_model=_base_model(metadata),
        trigger_words=_trigger_words(metadata),
        notes=notes,
        num_tensors=len(keys),
    )


_ORDER_STANDALONE = ["first", "tmlp.0", "tmlp.2", "tproj.1", "txtfusion.projector", "txtmlp.1", "txtmlp.3", "last.linear"]
_ORDER_SUB = list(BLOCK_LINEARS)


def _module_order(name: str):
    if name in STANDALONE_LINEARS:
        return (0 if name != "last.linear" else 3, _ORDER_STANDALONE.index(name), 0, 0)
    m = _NATIVE_BLOCK_RE.match(name)
    head, sub = m.group(1), m.group(2)
    idx = int(head.rsplit(".", 1)[1])
    group = 1 if head.startswith("txtfusion.layerwise") else 1.5 if head.startswith("txtfusion.") else 2
    return (group, idx, _ORDER_SUB.index(sub), 0)
