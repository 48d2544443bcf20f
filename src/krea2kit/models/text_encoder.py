"""The Qwen3-VL text tower that Krea 2 reads its conditioning from.

Krea 2 conditions on hidden states of Qwen3-VL-4B-Instruct (text only): the outputs of
12 decoder layers, stacked per token. This module is a native, inference-only copy of
that text tower, so krea2kit needs neither ``transformers`` nor the vision half at run
time.

Architecture facts (read in ``transformers.models.qwen3_vl.modeling_qwen3_vl`` and the
Qwen3-VL-4B-Instruct ``config.json``; written here from those facts):

* token embedding, then N pre-norm decoder layers: ``x += attn(rmsnorm(x))``,
  ``x += mlp(rmsnorm(x))``; a final RMSNorm after the last layer.
* attention: q/k/v/o projections without bias, grouped KV heads, a per-head RMSNorm on q
  and k (over ``head_dim``) *before* the rotary embedding, causal SDPA.
* MLP: SwiGLU, ``down(silu(gate(x)) * up(x))``.
* RMSNorm: computed in fp32, cast back to the input dtype, then scaled by ``weight``
  (plain ``weight``, not ``1 + weight``).
* rotary embedding: "interleaved mRoPE" over three position axes (T, H, W) with
  ``mrope_section`` frequencies each. For text the three axes carry the same position,
  so every frequency sees the same position and it reduces to plain half-split
  ("rotate_half") RoPE over the full head dim (checked against transformers in
  ``tests/models/test_text_encoder.py``). Only that case is implemented: Krea 2 never
  feeds images to the encoder.

``hidden_states`` index convention (the one the official encoder and transformers use):
index 0 is the embedding output, index ``i`` (1 <= i < N) is the output of decoder
layer ``i`` (1-based), and index ``N`` is the output of the last layer *after* the final
norm. Only the layers up to the deepest tap are built and loaded; the final norm only
when a tap equals ``N``. Krea 2 taps (2, 5, ..., 35) of N = 36, so it needs 35 layers
and no final norm.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from krea2kit.errors import WeightsError

# The 12 hidden-state indices the official encoder stacks (krea-ai/krea-2 encoder.py,
# ``select_layers``; the same tuple is diffusers' ``text_encoder_select_layers``).
KREA2_TAPS: tuple[int, ...] = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)


@dataclass(frozen=True)
class Qwen3TextConfig:
    """The text half of a Qwen3-VL config (names as in transformers' ``text_config``)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    # Frequencies per (T, H, W) axis of the interleaved mRoPE. Irrelevant for text (all three
    # axes carry the same position) but kept so a config round-trips; must sum to head_dim/2.
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for the rotary embedding")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mrope_section"] = list(self.mrope_section)
        return d


# Named presets. "qwen3-vl-4b" is Qwen/Qwen3-VL-4B-Instruct's text_config (36 layers,
# hidden 2560, 32 query / 8 KV heads of 128, SwiGLU 9728, rope_theta 5e6, mrope [24,20,20]
# interleaved, eps 1e-6, vocab 151936). Real models only (test sizes: tests/support/presets.py;
# bench sizes: bench/bench_text_encoder.py).
PRESETS: dict[str, Qwen3TextConfig] = {
    "qwen3-vl-4b": Qwen3TextConfig(),
}


def layers_needed(taps: Sequence[int], num_hidden_layers: int) -> tuple[int, bool]:
    """(decoder layers to build, whether the final norm is needed) for these hidden-state taps."""
    taps = tuple(int(t) for t in taps)
    if not taps:
        raise ValueError("at least one hidden-state tap is needed")
    bad = [t for t in taps if not 0 <= t <= num_hidden_layers]
    if bad:
        raise ValueError(f"hidden-state taps {bad} are out of range 0..{num_hidden_layers}")
    deepest = max(taps)
    return deepest, deepest == num_hidden_layers


# ---------------------------------------------------------------------------
# Modules (attribute names = checkpoint keys under ``model.language_model.``)

class RMSNorm(nn.Module):
    """Qwen's RMSNorm: fp32 statistics, cast back to the input dtype, then ``weight * x``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:
            # Query head h reads KV head h // group (transformers' repeat_kv order).
            group = self.heads // self.kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _embedding_weight(rows: int, dim: int) -> torch.Tensor:
    """``nn.Embedding``'s own init (standard normal, same random draws), skipped on the meta
    device: there torch routes ``normal_`` through its reference kernels, whose first use
    imports ``torch._dynamo`` (measured 1.0-1.3 s of a 64x64 quickstart's cold start)."""
    weight = torch.empty(rows, dim)
    if weight.device.type != "meta":
        with torch.no_grad():
            nn.init.normal_(weight)
    return weight


class Qwen3TextTower(nn.Module):
    """Embedding + the first ``num_layers`` decoder layers (+ the final norm if asked).

    ``forward`` returns only the tapped hidden states, stacked on dim 2.
    """

    def __init__(self, config: Qwen3TextConfig, *, num_layers: int | None = None, final_norm: bool = True):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers if num_layers is None else int(num_layers)
        if not 0 <= n <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 0..{config.num_hidden_layers}, got {n}")
        if final_norm and n != config.num_hidden_layers:
            raise ValueError("the final norm only applies after the last decoder layer")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=_embedding_weight(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(n))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if final_norm else None
        # The official encoder runs ``Qwen3VLForConditionalGeneration(...).to(dtype=bfloat16)``,
        # which also casts transformers' rotary ``inv_freq`` buffer, so its RoPE frequencies are
        # bf16-rounded (then used in fp32). Set this to that dtype to reproduce it; None keeps
        # the exact fp32 frequencies (what ``from_pretrained(torch_dtype=...)`` gives).
        self.inv_freq_dtype: torch.dtype | None = None

    @classmethod
    def for_taps(cls, config: Qwen3TextConfig, taps: Sequence[int] = KREA2_TAPS) -> "Qwen3TextTower":
        n, norm = layers_needed(taps, config.num_hidden_layers)
        return cls(config, num_layers=n, final_norm=norm)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies in fp32 (as transformers computes them), optionally rounded."""
        hd = self.config.head_dim
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        if self.inv_freq_dtype is not None:
            inv = inv.to(self.inv_freq_dtype).float()
        return inv

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, S, head_dim) for integer positions (B, S)."""
        freqs = position_ids[..., None].float() * self.inv_freq().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, input_ids: torch.Tensor, *, taps: Sequence[int], position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tapped hidden states (B, S, len(taps), D).

        ``position_ids`` (B, S): one rotary position per token (default ``arange(S)``).
        ``attention_mask`` (B, S) bool key-padding mask; None means every key is real, so
        plain causal attention (the fast path: right-padded junk after the real tokens
        never reaches them).
        """
        taps = tuple(int(t) for t in taps)
        n_total = self.config.num_hidden_layers
        deepest = max(taps)
        if deepest > self.num_layers or (deepest == n_total and self.norm is None):
            raise ValueError(f"tap {deepest} needs more of the model than was built "
                             f"({self.num_layers} layers, final norm {'yes' if self.norm is not None else 'no'})")
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = None
        if attention_mask is not None:
            keys = attention_mask.to(torch.bool)
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            mask = causal & keys[:, None, None, :]
            # A query with no visible key (left padding) would give NaN; let it see itself.
            # Rows that see any key are untouched, so padded queries match transformers.
            mask = mask | (torch.eye(s, dtype=torch.bool, device=x.device) & ~mask.any(-1, keepdim=True))
        found: dict[int, torch.Tensor] = {}
        if 0 in taps:
            found[0] = x
        for i, layer in enumerate(self.layers[:deepest], start=1):
            x = layer(x, cos, sin, mask)
            if i in taps and i != n_total:
                found[i] = x
        if n_total in taps:
            found[n_total] = self.norm(x)
        return torch.stack([found[t] for t in taps], dim=2)


# ---------------------------------------------------------------------------
# Checkpoint layouts and loading

# Where the language model lives, by layout (checked in this order).
LANGUAGE_PREFIXES: dict[str, str] = {
    "model.language_model.": "transformers (Qwen3VLForConditionalGeneration)",
    "language_model.": "transformers (Qwen3VLModel)",
    "model.": "ComfyUI single file",
    "": "bare text model",
}
# Never materialised: the vision tower, the LM head.
IGNORED_PREFIXES = ("model.visual.", "visual.", "lm_head.")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


def detect_language_prefix(keys: Sequence[str]) -> str | None:
    """The key prefix of the language model, or None if these keys hold no Qwen3 text tower."""
    ks = set(keys)
    for prefix in LANGUAGE_PREFIXES:
        if f"{prefix}embed_tokens.weight" in ks and f"{prefix}layers.0.self_attn.q_norm.weight" in ks:
            return prefix
    return None


def _text_config_dict(raw: dict | None) -> dict | None:
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("text_config"), dict):
        return raw["text_config"]
    if str(raw.get("model_type", "")).startswith("qwen3") and "hidden_size" in raw:
        return raw
    return None


def config_from_dict(raw: dict) -> Qwen3TextConfig:
    """A Qwen3TextConfig from a transformers ``config.json`` (whole VL config or its text_config).

    Accepts both the 4.57 spelling (``rope_theta`` + ``rope_scaling``) and the 5.x one
    (``rope_parameters``).
    """
    tc = _text_config_dict(raw)
    if tc is None:
        raise ValueError("not a Qwen3-VL config (no text_config)")
    if tc.get("hidden_act", "silu") != "silu" or tc.get("attention_bias", False):
        raise ValueError("only the Qwen3 text tower (silu MLP, no attention bias) is supported")
    rope = {}
    for k in ("rope_scaling", "rope_parameters"):
        if isinstance(tc.get(k), dict):
            rope.update(tc[k])
    default = Qwen3TextConfig()
    theta = rope.get("rope_theta", tc.get("rope_theta", default.rope_theta))
    hd = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    section = tuple(rope.get("mrope_section", default.mrope_section))
    if sum(section) != hd // 2:
        section = _default_section(hd)
    return Qwen3TextConfig(
        vocab_size=int(tc["vocab_size"]), hidden_size=int(tc["hidden_size"]),
        intermediate_size=int(tc["intermediate_size"]), num_hidden_layers=int(tc["num_hidden_layers"]),
        num_attention_heads=int(tc["num_attention_heads"]),
        num_key_value_heads=int(tc.get("num_key_value_heads") or tc["num_attention_heads"]),
        head_dim=int(hd), rms_norm_eps=float(tc.get("rms_norm_eps", default.rms_norm_eps)),
        rope_theta=float(theta), mrope_section=section,
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)))


def _default_section(head_dim: int) -> tuple[int, int, int]:
    # Same proportions as [24, 20, 20] of 64; only used to keep a config valid (text ignores it).
    half = head_dim // 2
    h = w = (half * 20) // 64
    return (half - h - w, h, w)


def config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str) -> Qwen3TextConfig:
    """Infer a config from tensor shapes; eps, theta use the Qwen3-VL-4B values (not in shapes)."""
    p = prefix
    vocab, hidden = shapes[f"{p}embed_tokens.weight"]
    head_dim = shapes[f"{p}layers.0.self_attn.q_norm.weight"][0]
    heads = shapes[f"{p}layers.0.self_attn.q_proj.weight"][0] // head_dim
    kv = shapes[f"{p}layers.0.self_attn.k_proj.weight"][0] // head_dim
    inter = shapes[f"{p}layers.0.mlp.gate_proj.weight"][0]
    layer_ids = {int(m.group(1)) for k in shapes if k.startswith(p) and (m := _LAYER_RE.match(k[len(p):]))}
    n = max(layer_ids) + 1
    default = Qwen3TextConfig()
    section = default.mrope_section if head_dim == default.head_dim else _default_section(head_dim)
    return Qwen3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n,
                           num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                           mrope_section=section)


def _find_config(ckpt, path: Path) -> dict | None:
    if _text_config_dict(ckpt.config) is not None:
        return ckpt.config
    if path.is_file():
        beside = path.parent / "config.json"
        if beside.is_file():
            try:
                raw = json.loads(beside.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            if _text_config_dict(raw) is not None:
                return raw
    return None


_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

#: The Linears quantized on load (``weights_dtype = "fp8" | "int8"``): every projection of the
#: decoder layers. The embedding table and the norms stay at the compute dtype.
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_on_load(tower_key: str) -> bool:
    """True for a tower module (``layers.3.mlp.up_proj``) or its weight key that quantizing on
    load converts (shared by the loader and the memory estimate)."""
    name = tower_key[: -len(".weight")] if tower_key.endswith(".weight") else tower_key
    return bool(_LAYER_RE.match(name)) and name.rpartition(".")[2] in QUANTIZED_PROJECTIONS


@dataclass
class LoadedTower:
    tower: Qwen3TextTower
    layout: str
    files: list[Path] = field(default_factory=list)
    config_source: str = "shapes"


def load_text_tower(path, *, taps: Sequence[int] = KREA2_TAPS, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", weights_dtype: str = "auto") -> LoadedTower:
    """Build the tower on the meta device and fill it from a checkpoint.

    Layouts (detected from the keys): transformers (``model.language_model.*``, one file
    or shards with an index JSON), ``Qwen3VLModel`` (``language_model.*``), ComfyUI single
    file (``model.*`` with ``visual.*``/``model.visual.*``) and a bare text model. Vision
    weights, the LM head and decoder layers deeper than the deepest tap are never read.
    ``dtype=None`` uses the stored dtype of the embedding for every tensor (transformers
    also runs the tower in one dtype). ``weights_dtype="fp8" | "int8"`` quantizes the decoder
    layers' projections of a full-precision file while streaming it
    (:func:`krea2kit.models.quant.onload.fill_text_tower_quantizing`); an already quantized
    file is refused then (it loads as stored with ``"auto"``).
    """
    from krea2kit.models.weights import assign_weights, guess_checkpoint_kind, open_checkpoint

    p = Path(path).expanduser()
    ckpt = open_checkpoint(p, what="text-encoder weights")
    keys = ckpt.keys()
    prefix = detect_language_prefix(keys)
    if prefix is None:
        kind = guess_checkpoint_kind(keys)
        if any(f"{q}embed_tokens.weight" in ckpt for q in LANGUAGE_PREFIXES):
            # Embeddings but no q/k norms: a Qwen2 / Qwen2.5(-VL) tower, e.g. Qwen-Image's encoder.
            kind = "a Qwen2 / Qwen2.5-VL text model (no q/k norms), not Qwen3-VL"
        raise WeightsError(
            f"not a Qwen3-VL text encoder: this file looks like {kind}",
            file=str(p), hint="point the text encoder at Qwen3-VL-4B-Instruct weights (the HF folder or "
                              "ComfyUI's qwen3vl_4b_bf16.safetensors)")
    from krea2kit.models.quant.detect import detect_quantization

    scheme = detect_quantization(ckpt)  # ComfyUI fp8_scaled ... encoders: read by krea2kit.models.quant
    if weights_dtype != "auto" and scheme is not None:
        raise WeightsError("this text encoder file is already quantized", file=str(p),
                           hint="load it as it is (model.text_encoder_weights_dtype = \"auto\"), or point at the "
                                "bf16 file")
    stored = ckpt.infos[f"{prefix}embed_tokens.weight"].dtype
    if scheme is None and stored not in _STORED_DTYPES:
        raise WeightsError(f"text-encoder weights stored as {stored} in an unknown quantized layout",
                           file=str(p), key=f"{prefix}embed_tokens.weight",
                           hint="use the bf16 file (e.g. qwen3vl_4b_bf16.safetensors) or the original HF folder")
    raw_cfg = _find_config(ckpt, p)
    shapes = {k: ckpt.shape(k) for k in keys if k.startswith(prefix)}
    if raw_cfg is not None:
        try:
            config = config_from_dict(raw_cfg)
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"config.json does not describe a Qwen3-VL text tower: {exc}", file=str(p)) from None
        source = "config.json"
    else:
        config = config_from_shapes(shapes, prefix)
        source = "shapes"
    try:
        n_layers, want_norm = layers_needed(taps, config.num_hidden_layers)
    except ValueError as exc:
        raise WeightsError(str(exc), file=str(p)) from None
    with torch.device("meta"):
        tower = Qwen3TextTower(config, num_layers=n_layers, final_norm=want_norm)

    def key_map(ck: str) -> str | None:
        return ck[len(prefix):] if ck.startswith(prefix) else ck

    def ignore(ck: str) -> bool:
        if ck.startswith(IGNORED_PREFIXES):
            return True
        if not ck.startswith(prefix):
            return False
        rest = ck[len(prefix):]
        m = _LAYER_RE.match(rest)
        if m:
            return int(m.group(1)) >= n_layers
        return rest == "norm.weight" and not want_norm

    if dtype is None:
        dtype = _STORED_DTYPES.get(stored, torch.bfloat16)  # an fp8 embedding table computes in bf16
    if weights_dtype != "auto":
        from krea2kit.models.quant.onload import fill_text_tower_quantizing

        fill_text_tower_quantizing(tower, ckpt, weights_dtype, key_map=key_map, ignore=ignore, dtype=dtype,
                                   device=device, quantize=quantized_on_load)
    elif scheme is not None:
        from krea2kit.models.quant.load import fill_quantized_text_tower

        fill_quantized_text_tower(tower, ckpt, scheme, key_map=key_map, ignore=ignore, dtype=dtype, device=device)
    else:
        assign_weights(tower, ckpt, key_map=key_map, ignore=ignore, dtype=dtype, device=device,
                       what="text-encoder weights")
    tower.eval().requires_grad_(False)
    return LoadedTower(tower=tower, layout=LANGUAGE_PREFIXES[prefix], files=ckpt.files(), config_source=source)


__all__ = [
    "KREA2_TAPS", "PRESETS", "Qwen3TextConfig", "Qwen3TextTower", "LoadedTower",
    "config_from_dict", "config_from_shapes", "detect_language_prefix", "layers_needed", "load_text_tower",
    "quantized_on_load",
]
