"""Memory preflight: the peak device memory of a plan, estimated before anything loads.

Weights are counted from what will sit on the device: safetensors headers (names, dtypes,
shapes; no tensor data is read), a GGUF file's size, or, when the weights are not on this
machine (a dry run of a Krea 2 preset), the architecture on torch's meta device. Full-precision
tensors count at the run's dtype, quantized tensors as stored; ``model.weights_dtype = "fp8" |
"int8"`` counts every quantizable Linear at one byte per weight plus its scales, keeping
in full precision what :data:`krea2kit.models.quant.KEEP_FULL_PRECISION` keeps;
``model.text_encoder_weights_dtype`` does the same for the text tower's decoder projections
(:func:`krea2kit.models.text_encoder.quantized_on_load`).

Activations are the largest live set of one inference step, from the shapes of the modules
(``tests/memory/`` checks the transformer and VAE terms against measured CPU peaks in fp32,
within 15 %; the text-encoder term is a rough bound; nothing is measured on a GPU yet):

* transformer: the residual stream, the modulated input and the larger of the attention
  phase (q, k, v, output, gate) and the SwiGLU phase (gate and up, in place), over
  ``batch x (text + image)`` tokens, batch 2 with guidance (cond and uncond in one call);
  the text fusion over ``batch x text x taps`` tokens; plus one dequantized layer for
  quantized weights (:class:`~krea2kit.models.quant.linear.QuantLinear` computes per layer;
  its fp8/int8 matmuls quantize the activations in token blocks whose temporaries stay below
  that, ``ROW_BLOCK_ELEMENTS``).
* text encoder: all prompts in one batch at the template's length.
* VAE decode: four full-resolution feature maps of the decoder's widest full-resolution
  stage, over a tile when the image is tiled.

The run keeps the transformer and VAE loaded together; the text encoder too unless it is
released after encoding (the preset's default or ``model.offload``). With ``model.offload =
"blocks"`` the transformer counts its weights outside ``blocks`` plus two of its blocks (the
one computing and the next one being copied: :mod:`krea2kit.models.offload`). The peak is the largest
of the three phases (encode, denoise, decode).

A plan that does not fit is refused with the changes that would lower its peak and their
estimates (:func:`alternatives`): the transformer quantized on load, the text encoder released
or quantized on load (when its weights count in the peak), the blocks streamed, and the text
encoder quantized together with a transformer change where the pair goes lower than either.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krea2kit.errors import Krea2kitError, RecipeError

GB = 1e9
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "BOOL": 1}
_QUANT_ST = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: The prompt template's positions handed to the transformer (models/tokenizer.py); compact
#: runs use fewer, so this is an upper bound there.
TEXT_TOKENS = 512
#: Live full-resolution feature maps while a VAE decoder stage runs (x, norm, conv out, skip).
VAE_LIVE_MAPS = 4
#: The exact (diffusers-arithmetic) Qwen-Image decode of the official layout pads each causal
#: conv input to three frames: 2.26 vs 1.50 GiB for the fold at 1024^2 fp32 (meta-device count,
#: bench/bench_vae_qwen.py), so an untiled official-layout decode peaks about 1.5x higher.
EXACT_DECODE_FACTOR = 1.5
SKIP_ENV = "KREA2KIT_SKIP_MEMORY_CHECK"
#: Transformer blocks on the device under block swap (krea2kit.models.offload.RESIDENT_BLOCKS;
#: not imported from there, which would import torch).
RESIDENT_BLOCKS = 2
_STREAMED = f"; blocks streamed, {RESIDENT_BLOCKS} on the device"


@dataclass
class Part:
    name: str  # "transformer weights", "VAE decode", ...
    nbytes: int
    note: str = ""


@dataclass
class Estimate:
    device: str
    dtype: str
    weights_dtype: str
    parts: list[Part]
    phases: dict[str, int]  # encode / denoise / decode -> bytes on the device
    text_encoder_released: bool
    blocks_streamed: bool = False
    notes: list[str] = field(default_factory=list)
    text_encoder_weights_dtype: str = "auto"

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "weights_dtype": self.weights_dtype,
                "peak_bytes": self.peak, "peak_phase": self.peak_phase, "phases": dict(self.phases),
                "text_encoder_released": self.text_encoder_released, "blocks_streamed": self.blocks_streamed,
                "parts": {p.name: p.nbytes for p in self.parts}}

    def lines(self) -> list[str]:
        out = [f"memory estimate on {self.device} ({self.dtype}, weights {self.weights_dtype}):"]
        for p in self.parts:
            out.append(f"  {p.name:<24} {gb(p.nbytes):>9}" + (f"  ({p.note})" if p.note else ""))
        released = "released after encoding" if self.text_encoder_released else "kept loaded"
        out.append(f"  peak {gb(self.peak)} while {self.peak_phase} (text encoder {released})")
        return out


def gb(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 1e6:.1f} MB"


def text_encoder_released(plan) -> bool:
    """Whether the run frees the text encoder once the prompts are encoded."""
    offload = plan.recipe.model.offload
    return plan.model.release_text_encoder if offload is None else offload in ("text-encoder", "blocks")


_BLOCK_KEY = re.compile(r"(?:^|\.)(?:transformer_)?blocks[._](\d+)[._]")


def _block_index(key: str) -> int | None:
    """N of a main transformer block's tensor (``blocks.N.`` / ``transformer_blocks.N.``,
    any prefix), ``None`` for everything else (text-fusion blocks included)."""
    m = _BLOCK_KEY.search(key)
    return int(m.group(1)) if m else None



def _config_name(plan, role: str) -> str:
    """The preset's named architecture config for ``role`` ("" = read from the weights)."""
    part_config = getattr(plan.model, "part_config", None)
    return part_config(role) if part_config else getattr(plan.model, f"{role}_config", "")


# -- weights -------------------------------------------------------------------------------

def _header_bytes(ckpt, dtype_bytes: int, skip=lambda k: False) -> tuple[int, bool]:
    """Bytes on the device for a checkpoint's tensors: quantized tensors and their scales as
    stored, other floating tensors at the run's dtype. Also whether any was quantized."""
    total, quantized = 0, False
    for key, info in ckpt.infos.items():
        if skip(key):
            continue
        n = math.prod(info.shape)
        if info.dtype in _QUANT_ST or "scale" in key.rsplit(".", 1)[-1] or key.endswith("comfy_quant"):
            total += n * _ST_BYTES.get(info.dtype, 4)
            quantized = quantized or info.dtype in _QUANT_ST
        elif info.dtype in ("F32", "F16", "BF16", "F64"):
            total += n * dtype_bytes
        else:
            total += n * _ST_BYTES.get(info.dtype, 4)
    return total, quantized


def dit_weight_bytes(config, dtype_bytes: int, weights_dtype: str = "auto", *,
                     resident_blocks: int | None = None) -> int:
    """A transformer of ``config`` on the device: every parameter at ``dtype_bytes``, or the
    quantizable Linears at one byte per weight plus fp32 scales (fp8: one per tensor; int8:
    one per output row) with their bias at the compute dtype. ``resident_blocks``: count only
    that many of the main blocks (block swap), all of them when ``None``."""
    from torch import nn

    from krea2kit.models.dit import build_meta
    from krea2kit.models.quant import keeps_full_precision

    def counted(name: str) -> bool:
        i = _block_index(name)
        return resident_blocks is None or i is None or i < resident_blocks

    model = build_meta(config)
    total = sum(t.numel() * dtype_bytes for n, t in [*model.named_parameters(), *model.named_buffers()]
                if counted(n))
    if weights_dtype in ("fp8", "int8"):
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and not keeps_full_precision(name) and counted(name + "."):
                out_f, in_f = mod.out_features, mod.in_features
                scales = 4 if weights_dtype == "fp8" else 4 * out_f
                total += out_f * in_f * (1 - dtype_bytes) + scales
    return total


def _dit_weights(plan, location: str | None, dtype_bytes: int, weights_dtype: str,
                 streamed: bool = False) -> tuple[Part, Any]:
    from krea2kit.models.dit import PRESETS

    preset = PRESETS.get(_config_name(plan, "dit"))
    resident = RESIDENT_BLOCKS if streamed else None
    path = Path(location) if location else None
    if path is not None and path.exists():
        from krea2kit.models.quant.detect import is_gguf

        if path.is_file() and is_gguf(path):
            size = path.stat().st_size
            if streamed and preset is not None:  # the file's share of blocks, as in the preset's layout
                size = size * dit_weight_bytes(preset, 2, resident_blocks=resident) // dit_weight_bytes(preset, 2)
            return Part("transformer weights", size, "GGUF, as stored" + _STREAMED * streamed), preset
        from krea2kit.models.weights import open_checkpoint

        def streamed_out(key: str) -> bool:
            i = _block_index(key)
            return streamed and i is not None and i >= RESIDENT_BLOCKS

        ckpt = open_checkpoint(path, what="transformer weights")
        nbytes, quantized = _header_bytes(ckpt, dtype_bytes, streamed_out)
        if preset is None:
            from krea2kit.models.dit_loader import dit_config_from_checkpoint

            try:
                preset = dit_config_from_checkpoint(ckpt)
            except (Krea2kitError, ValueError, KeyError):
                preset = None  # the loader will say what is wrong with the file
        if quantized:
            return Part("transformer weights", nbytes, "quantized file, as stored" + _STREAMED * streamed), preset
        if weights_dtype == "auto":
            return Part("transformer weights", nbytes, "from the file's header" + _STREAMED * streamed), preset
    if preset is None:
        return Part("transformer weights", 0, "unknown: no weights and no preset config"), None
    note = f"{weights_dtype} on load" if weights_dtype != "auto" else "from the preset config"
    return Part("transformer weights", dit_weight_bytes(preset, dtype_bytes, weights_dtype, resident_blocks=resident),
                note + _STREAMED * streamed), preset


def _quantized_linear_bytes(out_f: int, in_f: int, weights_dtype: str) -> int:
    """One Linear quantized on load: a byte per weight plus fp32 scales (fp8: one per tensor;
    int8: one per output row)."""
    return out_f * in_f + (4 if weights_dtype == "fp8" else 4 * out_f)


def _text_tower_bytes(cfg, layers: int, final_norm: bool, dtype_bytes: int, weights_dtype: str = "auto") -> int:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    projections = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]  # (out, in)
    if weights_dtype in ("fp8", "int8"):
        linear = sum(_quantized_linear_bytes(o, i, weights_dtype) for o, i in projections)
    else:
        linear = sum(o * i for o, i in projections) * dtype_bytes
    layer = (2 * hd + 2 * h) * dtype_bytes + linear  # q/k norms, two layer norms, the projections
    return (cfg.vocab_size * h + (h if final_norm else 0)) * dtype_bytes + layers * layer


def _quantized_on_load_saving(ckpt, dtype_bytes: int, weights_dtype: str, skip) -> int:
    """Bytes that quantizing a full-precision text tower on load saves (file header only)."""
    import re

    from krea2kit.models.text_encoder import quantized_on_load

    tower_key = re.compile(r"(?:^|\.)(layers\.\d+\..*)$")
    saved = 0
    for key, info in ckpt.infos.items():
        m = tower_key.search(key)
        if skip(key) or m is None or not quantized_on_load(m.group(1)) or len(info.shape) != 2:
            continue
        out_f, in_f = info.shape
        saved += out_f * in_f * dtype_bytes - _quantized_linear_bytes(out_f, in_f, weights_dtype)
    return saved


def _text_encoder_weights(plan, location: str | None, dtype_bytes: int,
                          on_load: str | None = None) -> tuple[Part, int, int]:
    """(weights part, hidden size, taps). ``model.text_encoder_weights_dtype = "fp8" | "int8"``
    (or ``on_load``, which overrides it) counts the decoder layers' projections at one byte per
    weight plus scales, as loaded."""
    import re

    from krea2kit.models.text_encoder import KREA2_TAPS, PRESETS

    on_load = on_load or getattr(plan.recipe.model, "text_encoder_weights_dtype", "auto")

    path = Path(location) if location else None
    if path is not None and path.exists():
        from krea2kit.models.weights import open_checkpoint
        from krea2kit.parts.text_encoder import taps_for

        taps = taps_for(str(path), KREA2_TAPS)
        deepest = max(taps)
        ckpt = open_checkpoint(path, what="text encoder weights")
        layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")

        def skip(key: str) -> bool:
            if "visual." in key or key.startswith("lm_head."):
                return True
            m = layer_re.search(key)
            return bool(m) and int(m.group(1)) >= deepest

        nbytes, quantized = _header_bytes(ckpt, dtype_bytes, skip)
        hidden = next((info.shape[-1] for k, info in ckpt.infos.items() if k.endswith("embed_tokens.weight")), 2560)
        note = "quantized file" if quantized else "from the file's header"
        if on_load in ("fp8", "int8") and not quantized:  # (a quantized file is refused then)
            nbytes -= _quantized_on_load_saving(ckpt, dtype_bytes, on_load, skip)
            note = f"{on_load} on load"
        return Part("text encoder weights", nbytes, note), hidden, len(taps)
    cfg = PRESETS.get(_config_name(plan, "text_encoder"))
    if cfg is None and plan.recipe.model.text_encoder == "qwen3-vl":  # the built-in part is Krea 2's encoder
        cfg = PRESETS["qwen3-vl-4b"]
    if cfg is None:
        return Part("text encoder weights", 0, "unknown"), 2560, len(KREA2_TAPS)
    deepest = max(KREA2_TAPS)
    nbytes = _text_tower_bytes(cfg, deepest, deepest == cfg.num_hidden_layers, dtype_bytes, on_load)
    note = f"{on_load} on load" if on_load != "auto" else "from the preset config"
    return Part("text encoder weights", nbytes, note), cfg.hidden_size, len(KREA2_TAPS)


def _vae_weights(plan, location: str | None, dtype_bytes: int) -> tuple[Part, int]:
    """(weights part, channels of the decoder's full-resolution stage)."""
    path = Path(location) if location else None
    if path is not None and path.exists():
        import json

        from krea2kit.models.weights import open_checkpoint

        ckpt = open_checkpoint(path, what="VAE weights")
        nbytes, _ = _header_bytes(ckpt, dtype_bytes)
        cfg_file = (path if path.is_dir() else path.parent) / "config.json"
        channels = 96
        try:
            raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            if "base_dim" in raw:
                channels = int(raw["base_dim"]) * int((raw.get("dim_mult") or [1])[0])
            elif raw.get("block_out_channels"):
                channels = int((raw.get("decoder_block_out_channels") or raw["block_out_channels"])[0])
        except (ValueError, TypeError, KeyError, OSError):
            pass
        return Part("VAE weights", nbytes, "from the file's header"), channels
    from krea2kit.models.vae_qwen import PRESETS, QwenImageVAE

    cfg = PRESETS.get(_config_name(plan, "vae"))
    if cfg is None:
        return Part("VAE weights", 0, "unknown"), 96
    import torch

    with torch.device("meta"):
        vae = QwenImageVAE(cfg)
    return (Part("VAE weights", sum(p.numel() for p in vae.parameters()) * dtype_bytes, "from the preset config"),
            cfg.base_dim * cfg.dim_mult[0])


def _lora_bytes(plan, dtype_bytes: int) -> int:
    from krea2kit.models.weights import open_checkpoint

    total = 0
    for lora in plan.recipe.loras:
        try:
            total += _header_bytes(open_checkpoint(Path(str(lora.path)), what="LoRA"), dtype_bytes)[0]
        except Krea2kitError:
            continue  # the LoRA loader reports a bad file with its own message
    return total


# -- activations ---------------------------------------------------------------------------

def dit_activation_bytes(config, *, batch: int, text_tokens: int, image_tokens: int, dtype_bytes: int,
                         cuda: bool = False, pad_to: int | None = None) -> int:
    """The largest live set of one transformer call (see the module docstring): the blocks
    over ``batch x (text + image)`` tokens (padded to ``pad_to`` in the official layout), or
    the text fusion, which runs once per prompt over ``text x taps`` tokens."""
    f, m, kv = config.features, config.mlp_dim, config.kvheads * config.head_dim
    fp32 = 4 // dtype_bytes  # elements of the run's dtype one fp32 element takes
    repeat = 2 * f if cuda and config.heads != config.kvheads else 0  # K/V heads repeated off CPU
    rope = f * (1 if fp32 == 1 else 2 * fp32)  # apply_rope rotates q (then k) in fp32: a copy and its result
    # residual + modulated input, the larger phase, the patchified input and output
    per_token = 2 * f + max(3 * f + 2 * kv + repeat + rope, f + 2 * m) + 2 * config.in_features
    tokens = text_tokens + image_tokens
    if pad_to:
        tokens += -tokens % pad_to
    main = batch * tokens * per_token + tokens * 2 * config.head_dim * fp32  # + the fp32 RoPE table
    td, tm = config.txtdim, config.txt_mlp_dim
    tkv = config.txtkvheads * config.txt_head_dim
    fusion = text_tokens * config.txtlayers * (2 * td + max(3 * td + 2 * tkv, td + 2 * tm))
    return max(main, fusion) * dtype_bytes


def largest_linear_bytes(config, dtype_bytes: int) -> int:
    """One dequantized weight (QuantLinear's temporary) at the compute dtype."""
    f = config.features
    return max(f * config.mlp_dim, f * f, config.txtdim * config.txt_mlp_dim) * dtype_bytes


def vae_decode_bytes(pixels: int, channels: int, dtype_bytes: int) -> int:
    return (VAE_LIVE_MAPS * channels + 3) * pixels * dtype_bytes


def _decode_pixels(plan, width: int, height: int) -> tuple[int, str]:
    from krea2kit.models.tiling import DEFAULT_TILE_THRESHOLD_PIXELS, needs_tiling

    threshold = plan.recipe.model.vae_tile_threshold or DEFAULT_TILE_THRESHOLD_PIXELS
    if needs_tiling(height, width, threshold):
        from krea2kit.models.vae_qwen import DEFAULT_TILE_OVERLAP_PIXELS, DEFAULT_TILE_PIXELS

        side = DEFAULT_TILE_PIXELS + 2 * DEFAULT_TILE_OVERLAP_PIXELS
        return min(side * side, width * height), "tiled"
    return width * height, "whole image"


# -- the estimate --------------------------------------------------------------------------

def estimate(plan, settings, *, device: str, dtype: str, weights_dtype: str | None = None,
             release_text_encoder: bool | None = None, stream_blocks: bool | None = None,
             text_encoder_weights_dtype: str | None = None) -> Estimate:
    """Peak device memory of ``plan`` on ``device`` at ``dtype`` (names as in ``model.dtype``);
    ``weights_dtype`` / ``release_text_encoder`` / ``stream_blocks`` /
    ``text_encoder_weights_dtype`` override the recipe's (for alternatives)."""
    from krea2kit.locate import locate_weights

    dtype_bytes = _DTYPE_BYTES[dtype]
    weights_dtype = weights_dtype or plan.recipe.model.weights_dtype
    released = text_encoder_released(plan) if release_text_encoder is None else release_text_encoder
    streamed = plan.recipe.model.offload == "blocks" if stream_blocks is None else stream_blocks
    notes: list[str] = []
    locations: dict[str, str | None] = {}
    for role in ("dit", "text_encoder", "vae"):
        try:
            locations[role] = locate_weights(plan.model, role, plan.weights.get(role), settings)[0]
        except Krea2kitError:
            locations[role] = None
            notes.append(f"no {role.replace('_', ' ')} weights found: sized from the preset")

    def read(role: str, fn, *args):
        # A file the estimate cannot read is sized from the preset instead: the part's own
        # loader reports what is wrong with it, with the message users know from it.
        try:
            return fn(plan, locations[role], *args)
        except (Krea2kitError, ValueError, KeyError, OSError):
            notes.append(f"could not read the {role.replace('_', ' ')} weights: sized from the preset")
            return fn(plan, None, *args)

    dit_w, dit_cfg = read("dit", _dit_weights, dtype_bytes, weights_dtype, streamed)
    te_w, te_hidden, taps = read("text_encoder", _text_encoder_weights, dtype_bytes, text_encoder_weights_dtype)
    vae_w, vae_channels = read("vae", _vae_weights, dtype_bytes)
    lora = _lora_bytes(plan, dtype_bytes)

    batch = 2 if plan.guidance > 0 else 1
    factor = plan.model.latent_factor
    patch = int(dit_cfg.patch) if dit_cfg is not None else 2
    cell = factor * patch
    biggest = max(plan.jobs, key=lambda j: j.width * j.height)
    w, h = -(-biggest.width // cell) * cell, -(-biggest.height // cell) * cell
    image_tokens = (w // cell) * (h // cell)
    texts = len({t for j in plan.jobs for t in ((j.prompt, j.negative) if batch == 2 else (j.prompt,))})
    if dit_cfg is None:
        notes.append("transformer activations unknown: no architecture config for these weights")
    if dit_cfg is not None:
        # [[references]] ride along every call as more tokens (krea2kit.recipe.references)
        from krea2kit.recipe.references import reference_extra_bytes, reference_tokens

        ref_tokens = reference_tokens(plan.recipe.references, image_tokens)
        dit_act = dit_activation_bytes(dit_cfg, batch=batch, text_tokens=TEXT_TOKENS,
                                       image_tokens=image_tokens + ref_tokens,
                                       dtype_bytes=dtype_bytes, cuda=device.startswith("cuda"),
                                       pad_to=256 if plan.recipe.model.layout == "official" else None)
        dit_act += reference_extra_bytes(dit_cfg, plan.recipe.references, batch=batch,
                                         tokens=TEXT_TOKENS + image_tokens + ref_tokens, dtype_bytes=dtype_bytes)
        if weights_dtype != "auto" or "quantized" in dit_w.note or "GGUF" in dit_w.note:
            dit_act += largest_linear_bytes(dit_cfg, dtype_bytes)
        conds = texts * TEXT_TOKENS * dit_cfg.txtlayers * dit_cfg.txtdim * dtype_bytes
    else:
        dit_act = conds = 0
    # The encoder runs all prompts at once: residual, normed input and SwiGLU (about 3x hidden
    # + 2x the intermediate, taken as 8x hidden) per token, plus the tapped states it returns.
    te_act = texts * TEXT_TOKENS * te_hidden * (8 + 4 + taps) * dtype_bytes
    pixels, how = _decode_pixels(plan, w, h)
    vae_act = vae_decode_bytes(pixels, vae_channels, dtype_bytes)
    if how == "whole image" and plan.recipe.model.layout == "official" and plan.parts["vae"].name == "qwen-image":
        vae_act = int(vae_act * EXACT_DECODE_FACTOR)  # parts/vae.py decodes exactly in this layout
        how += ", exact decode"

    parts = [dit_w, te_w, vae_w]
    if lora:
        parts.append(Part("LoRA factors", lora, f"{len(plan.recipe.loras)} file(s)"))
    parts += [Part("text encoding", te_act + conds, f"{texts} prompt(s) x {TEXT_TOKENS} tokens"),
              Part("transformer activations", dit_act,
                   f"batch {batch} x ({TEXT_TOKENS} text + {image_tokens} image tokens)"),
              Part("VAE decode", vae_act, f"{w}x{h}, {how}")]
    kept_te = 0 if released else te_w.nbytes
    resident = dit_w.nbytes + vae_w.nbytes + lora + kept_te + conds
    phases = {"encoding": te_w.nbytes + te_act + conds, "denoising": resident + dit_act,
              "decoding": resident + vae_act}
    return Estimate(device=device, dtype=dtype, weights_dtype=weights_dtype, parts=parts, phases=phases,
                    text_encoder_released=released, blocks_streamed=streamed, notes=notes,
                    text_encoder_weights_dtype=text_encoder_weights_dtype
                    or getattr(plan.recipe.model, "text_encoder_weights_dtype", "auto"))


# -- the check -----------------------------------------------------------------------------

def device_free_bytes(device: str) -> int | None:
    """Free memory of ``device`` (CUDA: the driver's count; MPS: the recommended working set
    minus what is allocated); ``None`` when unknown."""
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        current = getattr(torch.mps, "current_allocated_memory", None)
        if recommended and current:
            return int(recommended() - current())
    return None


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _text_encoder_in_peak(est: Estimate) -> bool:
    """Whether the text encoder's weights count in the peak: the peak is the encoding phase,
    or the encoder stays loaded through denoising and decoding."""
    return est.peak_phase == "encoding" or not est.text_encoder_released


def alternatives(plan, settings, est: Estimate) -> list[tuple[str, int]]:
    """Recipe changes that lower the peak, with their estimates (largest saving first): one
    key each, and the text encoder quantized on load together with each transformer change
    where the pair goes lower than either alone (with the blocks streamed, the encoding phase
    is often the peak: Krea 2 Turbo at 1024², 7.9 GB, 4.4 GB with an fp8 text encoder)."""
    def alt(**changes) -> int:
        kw = {"weights_dtype": est.weights_dtype, "release_text_encoder": est.text_encoder_released,
              "stream_blocks": est.blocks_streamed, "text_encoder_weights_dtype": est.text_encoder_weights_dtype}
        return estimate(plan, settings, device=est.device, dtype=est.dtype, **{**kw, **changes}).peak

    out: list[tuple[str, int]] = []
    dit: list[tuple[str, dict]] = []  # transformer-side changes, to pair with the text encoder's
    if est.weights_dtype == "auto" and not any("quantized" in p.note or "GGUF" in p.note for p in est.parts):
        for wd in ("fp8", "int8"):
            change = {"weights_dtype": wd, "stream_blocks": None}
            out.append((f'model.weights_dtype = "{wd}"', alt(**change)))
            dit.append((out[-1][0], change))
    if not est.text_encoder_released:
        out.append(('model.offload = "text-encoder"', alt(release_text_encoder=True, stream_blocks=False)))
    if not est.blocks_streamed:
        change = {"release_text_encoder": True, "stream_blocks": True}
        out.append(('model.offload = "blocks"', alt(**change)))
        dit.append((out[-1][0], change))
    te_quantized = any(p.name == "text encoder weights" and "quantized" in p.note for p in est.parts)
    if est.text_encoder_weights_dtype == "auto" and not te_quantized:
        singles = dict(out)
        for wd in ("fp8", "int8"):
            te = f'model.text_encoder_weights_dtype = "{wd}"'
            if _text_encoder_in_peak(est):  # its weights are on the device at the peak
                out.append((te, alt(text_encoder_weights_dtype=wd)))
            for name, change in dit:
                if name.endswith('"int8"') != (wd == "int8"):
                    continue  # pair fp8 with fp8 and int8 with int8: one line each
                peak = alt(**change, text_encoder_weights_dtype=wd)
                if peak < min(singles[name], dict(out).get(te, est.peak)):
                    out.append((f"{name} and {te}", peak))
    return sorted((a for a in out if a[1] < est.peak), key=lambda a: a[1])


def preflight(plan, settings, *, device: str, dtype: str, warn) -> Estimate | None:
    """Refuse a plan whose estimate exceeds the free memory of a CUDA/MPS device (a
    :class:`RecipeError`, exit 2, naming the changes that would fit); on CPU only ``warn``
    when it exceeds the available RAM. ``$KREA2KIT_SKIP_MEMORY_CHECK=1`` skips the check."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return None
    est = estimate(plan, settings, device=device, dtype=dtype)
    if device == "cpu":
        available = host_available_bytes()
        if available is not None and est.peak > available:
            warn(f"this run needs about {gb(est.peak)} of memory, the machine has {gb(available)} available; "
                 "it may swap or be stopped by the system")
        return est
    free = device_free_bytes(device)
    if free is None or est.peak <= free:
        return est
    options = alternatives(plan, settings, est)
    fits = [f"{name} (≈{gb(peak)})" for name, peak in options if peak <= free]
    others = [f"{name} (≈{gb(peak)})" for name, peak in options if peak > free]
    hint = ("set " + " or ".join(fits)) if fits else "use a smaller size or a device with more memory"
    if others:
        hint += "; not enough alone: " + ", ".join(others)
    import importlib.util

    if any("weights_dtype" in name for name, _ in options) and importlib.util.find_spec("comfy_kitchen") is None:
        hint += "; fp8/int8 on load need `pip install 'krea2kit[quant]'`"
    hint += f"; `krea2kit run --dry-run` prints the estimate per part; {SKIP_ENV}=1 skips this check"
    raise RecipeError(f"this run needs about {gb(est.peak)} on {device} while {est.peak_phase}, "
                      f"which has {gb(free)} free", file=str(plan.loaded.path) if plan.loaded.path else None,
                      key="model.weights_dtype", hint=hint)
