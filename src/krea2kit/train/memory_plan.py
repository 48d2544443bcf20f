"""The device-memory plan of a LoRA training run, from the inference estimator's numbers.

:func:`training_memory_plan` asks :func:`krea2kit.memory.estimate` (what ``krea2kit run``
checks before loading) for the frozen parts at their storage dtype: the transformer weights
(``weights_dtype`` bf16 / fp8 / int8 on load, ``offload = "blocks"``: two blocks resident),
the text encoder, the VAE, one prompt's encoding and the VAE's activations at the bucket
size. It then adds what training brings:

* **adapter**: LoRA factors ``rank x (in + out)`` per targeted Linear (every Linear of the
  transformer by default), kept in fp32 as the trainable master copy, their fp32 gradients,
  and the optimizer's state: AdamW two fp32 moments (16 bytes per parameter in all), 8-bit
  AdamW (bitsandbytes) two 1-byte moments (10 bytes);
* **activations** saved for the backward pass (:func:`block_activation_bytes`, per token of
  one transformer block, read off the block's code: the fp32 copies the RMSNorms and RoPE
  keep, the LoRA inputs of every adapted Linear, SDPA's q/k/v/output (flash-style kernels
  keep no attention matrix; CUDA repeats the grouped K/V heads), the SwiGLU's four hidden
  tensors). Without gradient checkpointing every block keeps its set; with it each block keeps
  only its input and one block's set exists at a time, recomputed during the backward pass.
  The text fusion's blocks are counted in full (they run on the 12 tapped layers per token);
* a **backward workspace**: a few residual-sized gradient buffers.

Latents and prompt embeddings are cached before training (:mod:`krea2kit.train.cache`), so
the VAE and the text encoder are on the device only in the **caching** phase, one after the
other, and are freed before the transformer loads; the plan's peak is the larger phase.
``tests/train/test_memory_plan.py`` checks :func:`block_activation_bytes` against the bytes
autograd really saves for a nano block (CPU, fp32); nothing here is measured on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from krea2kit.memory import Part, estimate, gb

#: Bytes per trainable parameter: fp32 master weight + fp32 gradient + optimizer state.
OPTIMIZER_BYTES = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}
#: Residual-sized gradient buffers live while one block runs backward (grad of the block
#: output and input, of the two normed inputs), in the compute dtype.
BACKWARD_BUFFERS = 4
_WEIGHTS_DTYPES = {"bf16": "auto", "auto": "auto", "fp8": "fp8", "int8": "int8"}


@dataclass
class Row:
    part: str
    phase: str  # "caching" | "training"
    dtype: str
    nbytes: int
    note: str = ""


@dataclass
class TrainingMemoryPlan:
    preset: str
    resolution: int
    rank: int
    batch: int
    weights_dtype: str
    offload: str
    gradient_checkpointing: bool
    optimizer: str
    rows: list[Row]
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    def phase_bytes(self, phase: str) -> int:
        return sum(r.nbytes for r in self.rows if r.phase == phase)

    @property
    def phases(self) -> dict[str, int]:
        # the VAE and the text encoder run one after the other while caching: the larger counts
        caching = [r for r in self.rows if r.phase == "caching"]
        vae = sum(r.nbytes for r in caching if r.part.startswith("VAE"))
        text = sum(r.nbytes for r in caching if not r.part.startswith("VAE"))
        return {"caching": max(vae, text), "training": self.phase_bytes("training")}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def fits(self, device_bytes: float) -> bool:
        return self.peak <= device_bytes

    def lines(self) -> list[str]:
        head = (f"training memory plan: {self.preset} at {self.resolution}x{self.resolution}, rank {self.rank}, "
                f"batch {self.batch}, weights {self.weights_dtype}, offload {self.offload}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.optimizer}")
        out = [head]
        for r in self.rows:
            out.append(f"  {r.phase:<9} {r.part:<28} {r.dtype:<6} {gb(r.nbytes):>10}" + (f"  ({r.note})" if r.note else ""))
        phases = self.phases
        out.append(f"  peak {gb(self.peak)} (caching {gb(phases['caching'])}, training {gb(phases['training'])}); "
                   f"{self.trainable_params / 1e6:.1f} M trainable parameters")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "resolution": self.resolution, "rank": self.rank, "batch": self.batch,
                "weights_dtype": self.weights_dtype, "offload": self.offload,
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
                "peak_bytes": self.peak, "phases": self.phases, "trainable_params": self.trainable_params,
                "rows": [{"part": r.part, "phase": r.phase, "dtype": r.dtype, "bytes": r.nbytes, "note": r.note}
                         for r in self.rows]}


def targeted(config, targets: Any = "all") -> list[tuple[str, int, int]]:
    """(native name, in, out) of the Linears an adapter with ``targets`` covers: a preset or
    globs as the trainer selects them (:func:`krea2kit.train.adapters.select_targets`:
    ``all``, ``blocks``, ``attention``, ``attention-mlp``, ``"blocks.*.attn.wq"`` ...), or a
    predicate on native names."""
    from torch import nn

    from krea2kit.models.dit import build_meta

    model = build_meta(config)
    if callable(targets):
        names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and targets(n)}
    else:
        from krea2kit.train.adapters import select_targets

        names = set(select_targets(model, [targets] if isinstance(targets, str) else list(targets)))
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules() if n in names]


def adapter_params(config, rank: int, targets: Any = "all") -> int:
    """Trainable LoRA parameters on the transformer of ``config``: ``rank x (in + out)`` per
    targeted Linear (LoKr of the same rank has fewer: this is an upper bound for it)."""
    return sum(rank * (i + o) for _, i, o in targeted(config, targets))


def block_activation_bytes(features: int, kv: int, mlp: int, heads: int, *, rank: int, dtype_bytes: int,
                           cuda: bool = False, adapted: int = 7) -> int:
    """Bytes autograd keeps per token of one pre-norm block (attention + SwiGLU) whose every
    Linear carries a trainable LoRA, base weights frozen (see the module docstring):

    * in the compute dtype: the attention input (the LoRA inputs of wq/wk/wv/gate), the rotated
      q (and k, v: SDPA's inputs; on CUDA the repeated K/V heads, ``features`` wide each), SDPA's
      output and its reshaped copy, sigmoid(gate), wo's input, the MLP input, the SwiGLU's gate
      output, silu of it, up's output and their product (down's input), and each LoRA's rank-wide
      down output;
    * in fp32: the RMSNorm inputs (prenorm, postnorm, the per-head q and k norms; a bf16 run
      makes fp32 copies) and SDPA's log-sum-exp per head.
    """
    f, c = features, dtype_bytes
    sdpa_kv = 2 * f if cuda else 2 * kv
    compute = 7 * f + sdpa_kv + 4 * mlp + adapted * rank
    fp32 = 3 * f + kv + heads
    return compute * c + fp32 * 4


def dit_activation_bytes(config, *, batch: int, image_tokens: int, text_tokens: int, rank: int, dtype_bytes: int,
                         gradient_checkpointing: bool, cuda: bool = True, text_fusion: bool = True) -> tuple[int, int]:
    """(saved activations, backward workspace) of one training step of the transformer.
    ``text_fusion``: whether adapters sit in the text fusion too (else nothing there needs
    gradients and autograd keeps nothing of it). Adapters on fewer Linears keep somewhat
    less than this (a frozen Linear keeps no input): an upper bound for them."""
    tokens = batch * (image_tokens + text_tokens)
    per_block = block_activation_bytes(config.features, config.kvheads * config.head_dim, config.mlp_dim,
                                       config.heads, rank=rank, dtype_bytes=dtype_bytes, cuda=cuda)
    text_block = block_activation_bytes(config.txtdim, config.txtkvheads * config.txt_head_dim, config.txt_mlp_dim,
                                        config.txtheads, rank=rank, dtype_bytes=dtype_bytes, cuda=cuda)
    fusion = batch * text_block * (text_tokens * config.txtlayers * config.txt_layerwise_blocks
                                   + text_tokens * config.txt_refiner_blocks) if text_fusion else 0
    if gradient_checkpointing:
        # every block keeps its input; one block's full set exists while it is recomputed
        saved = tokens * config.features * dtype_bytes * config.layers + tokens * per_block
    else:
        saved = tokens * per_block * config.layers
    workspace = BACKWARD_BUFFERS * tokens * config.features * dtype_bytes
    return saved + fusion, workspace


def _dit_config(plan, settings) -> Any:
    from krea2kit.models.dit import PRESETS

    name = plan.model.part_config("dit")
    if name in PRESETS:
        return PRESETS[name]
    from krea2kit.locate import locate_weights
    from krea2kit.models.dit_loader import dit_config_from_checkpoint
    from krea2kit.models.weights import open_checkpoint

    location, _ = locate_weights(plan.model, "dit", plan.weights.get("dit"), settings)
    return dit_config_from_checkpoint(open_checkpoint(location, what="transformer weights"))


def training_memory_plan(preset: str, *, resolution: int, rank: int, batch: int = 1, weights_dtype: str = "bf16",
                         offload: str = "none", gradient_checkpointing: bool = True, optimizer: str = "adamw",
                         targets: Any = "all", text_tokens: int = 512, device: str = "cuda",
                         session: Any = None, weights: dict[str, Any] | None = None) -> TrainingMemoryPlan:
    """The plan of training a LoRA of ``rank`` on ``preset`` at ``resolution``² (see the module
    docstring). ``weights_dtype``: the frozen base's storage (bf16 = as stored, fp8, int8);
    ``offload``: ``"none"`` or ``"blocks"``; ``text_tokens``: the prompt layout's length (512
    in the official layout); ``weights``: ``[model.weights]`` of the base (else found as ``run``
    finds them; weights not on this machine are sized from the preset's architecture). Compute
    is bf16 (mixed precision) on CUDA, fp32 on CPU."""
    from krea2kit.memory import TEXT_TOKENS

    if weights_dtype not in _WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype {weights_dtype!r}: choose from {', '.join(_WEIGHTS_DTYPES)}")
    if offload not in ("none", "blocks"):
        raise ValueError(f"offload {offload!r}: choose none or blocks")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer {optimizer!r}: choose from {', '.join(OPTIMIZER_BYTES)}")
    if session is None:
        from krea2kit.api import Session

        session = Session()
    import tomli_w

    model: dict[str, Any] = {"preset": preset}
    if weights:
        model["weights"] = dict(weights)
    plan = session.plan(text=tomli_w.dumps({"prompt": "training", "width": int(resolution),
                                            "height": int(resolution), "model": model}))
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    wd = _WEIGHTS_DTYPES[weights_dtype]
    est = estimate(plan, session.settings, device=device, dtype=dtype, weights_dtype=wd, release_text_encoder=True,
                   stream_blocks=offload == "blocks")
    part: dict[str, Part] = {p.name: p for p in est.parts}
    cfg = _dit_config(plan, session.settings)
    cell = plan.model.latent_factor * int(cfg.patch)
    side = -(-int(resolution) // cell)
    image_tokens = side * side
    linears = targeted(cfg, targets)
    params = sum(rank * (i + o) for _, i, o in linears)
    fusion_adapted = any(n.startswith("txtfusion.") for n, _, _ in linears)
    saved, workspace = dit_activation_bytes(cfg, batch=batch, image_tokens=image_tokens, text_tokens=text_tokens,
                                            rank=rank, dtype_bytes=dtype_bytes,
                                            gradient_checkpointing=gradient_checkpointing,
                                            cuda=device.startswith("cuda"), text_fusion=fusion_adapted)
    base_dtype = {"auto": dtype.replace("bfloat16", "bf16").replace("float32", "fp32")}.get(wd, wd)
    per_prompt = part["text encoding"].nbytes * text_tokens // max(1, TEXT_TOKENS)
    rows = [
        Row("text encoder weights", "caching", base_dtype if "on load" in part["text encoder weights"].note
            else dtype_name(dtype), part["text encoder weights"].nbytes, "freed before training"),
        Row("text encoding", "caching", dtype_name(dtype), per_prompt, "one caption at a time"),
        Row("VAE weights", "caching", dtype_name(dtype), part["VAE weights"].nbytes, "freed before training"),
        Row("VAE encode", "caching", dtype_name(dtype), part["VAE decode"].nbytes,
            "one image at its bucket size (sized as the decode)"),
        Row("transformer (frozen)", "training", base_dtype, part["transformer weights"].nbytes,
            part["transformer weights"].note),
        Row("LoRA weights", "training", "fp32", params * 4, f"{params / 1e6:.1f} M parameters"),
        Row("LoRA gradients", "training", "fp32", params * 4, ""),
        Row("optimizer state", "training", "fp32" if optimizer == "adamw" else "8-bit",
            params * (OPTIMIZER_BYTES[optimizer] - 8), "AdamW moments" + (" (bitsandbytes)" * (optimizer != "adamw"))),
        Row("activations", "training", dtype_name(dtype), saved,
            f"batch {batch} x ({image_tokens} image + {text_tokens} text tokens), "
            + ("checkpointed per block" if gradient_checkpointing else "every block kept")),
        Row("backward workspace", "training", dtype_name(dtype), workspace, "gradient buffers of one block"),
    ]
    if wd != "auto" or "quantized" in part["transformer weights"].note:
        from krea2kit.memory import largest_linear_bytes

        rows.append(Row("dequantized layer", "training", dtype_name(dtype), largest_linear_bytes(cfg, dtype_bytes),
                        "one layer at a time, forward and backward"))
    rows.append(Row("cached batch", "training", dtype_name(dtype),
                    batch * (cfg.channels * image_tokens * cfg.patch ** 2
                             + text_tokens * cfg.txtlayers * cfg.txtdim) * dtype_bytes, "latents + prompt embeddings"))
    return TrainingMemoryPlan(preset=preset, resolution=int(resolution), rank=rank, batch=batch,
                              weights_dtype=weights_dtype, offload=offload,
                              gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, rows=rows,
                              trainable_params=params, notes=list(est.notes))


def dtype_name(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


#: The set-ups the README's table compares, heaviest first. Block offload is planned here for
#: when the trainer streams blocks (``offload = "blocks"`` is an inference feature today).
VARIANTS = (
    dict(weights_dtype="bf16", offload="none", targets="all", optimizer="adamw"),
    dict(weights_dtype="fp8", offload="none", targets="all", optimizer="adamw"),
    dict(weights_dtype="fp8", offload="none", targets="blocks", optimizer="adamw8bit"),
    dict(weights_dtype="bf16", offload="blocks", targets="all", optimizer="adamw"),
)


def first_fit(preset: str, *, resolution: int, rank: int, card_gib: float, headroom: float = 0.9,
              session: Any = None, offload: bool = False, **kwargs) -> TrainingMemoryPlan | None:
    """The first of :data:`VARIANTS` (block offload only with ``offload``) whose peak fits
    ``headroom`` of a card of ``card_gib`` GiB (a "24 GB" card has 24 GiB; the CUDA context and
    the allocator take some of it), or None."""
    for variant in VARIANTS:
        if variant["offload"] == "blocks" and not offload:
            continue
        p = training_memory_plan(preset, resolution=resolution, rank=rank, session=session,
                                 **{**variant, **kwargs})
        if p.peak <= card_gib * 2**30 * headroom:
            return p
    return None


#: Weight locations that exist nowhere: the README's table is sized from the preset's
#: architecture whatever weights the machine printing it has (a file's header could differ).
_FROM_PRESET = {role: f"<{role} sized from the preset>" for role in ("dit", "text_encoder", "vae")}


def readme_table(preset: str = "krea2-raw", *, rank: int = 32, resolutions=(1024, 768), cards=(24, 16),
                 headroom: float = 0.9, session: Any = None) -> str:
    """The README's table: every :data:`VARIANTS` at each resolution, rank ``rank``, gradient
    checkpointing on, batch 1, bf16 compute on CUDA, the official 512-token prompt layout, and
    whether the peak fits ``headroom`` of each card (GiB); sizes in GB (1e9 bytes)."""
    def part(p: TrainingMemoryPlan, *names: str) -> str:
        return f"{sum(r.nbytes for r in p.rows if r.part in names) / 1e9:.2f}"

    head = ("| resolution | frozen transformer on the device | adapter, optimizer | adapter + grads + optimizer "
            "| activations | training peak | caching peak | " + " | ".join(f"{c} GB card" for c in cards) + " |")
    lines = [head, "|" + "---|" * (7 + len(cards))]
    for res in resolutions:
        for variant in VARIANTS:
            p = training_memory_plan(preset, resolution=res, rank=rank, session=session, weights=_FROM_PRESET,
                                     **variant)
            where = f"{variant['weights_dtype']}, " + ("2 blocks (the rest in host RAM; not in the trainer yet)"
                                                       if variant["offload"] == "blocks" else "all blocks")
            fits = ["fits" if p.peak <= c * 2**30 * headroom else "no" for c in cards]
            lines.append(f"| {res}² | {where}: {part(p, 'transformer (frozen)')} | "
                         f"{variant['targets']}, {variant['optimizer']} | "
                         f"{part(p, 'LoRA weights', 'LoRA gradients', 'optimizer state')} | "
                         f"{part(p, 'activations', 'backward workspace')} | {p.phases['training'] / 1e9:.2f} | "
                         f"{p.phases['caching'] / 1e9:.2f} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def plan_for_recipe(recipe: Any, *, session: Any = None, device: str | None = None,
                    file: str | None = None) -> TrainingMemoryPlan:
    """The plan of a validated training recipe (``krea2kit train --dry-run``): its base preset
    and storage, adapter rank and targets, batch, optimizer and checkpointing, at the dataset's
    bucket resolution (a slider: its width x height). Planned for CUDA unless the recipe's
    ``base.device`` says otherwise (what the plan is for: fitting a GPU).

    Targets that select no Linear of the preset's transformer are a ``RecipeError`` naming
    ``file``: planning is where that is known before any weights load (``train``, ``--dry-run``,
    ``recipe check``)."""
    base = recipe.base
    if recipe.dataset is not None:
        resolution = int(recipe.dataset.resolution)
    else:
        resolution = int(round((recipe.slider.width * recipe.slider.height) ** 0.5))
    device = device or (base.device if base.device not in ("auto",) else "cuda")
    plan = training_memory_plan(
        base.preset, resolution=resolution, rank=int(recipe.adapter.rank), batch=int(recipe.batch_size),
        weights_dtype="bf16" if base.weights_dtype == "auto" else base.weights_dtype, offload="none",
        gradient_checkpointing=bool(recipe.gradient_checkpointing),
        optimizer=recipe.optimizer.name if recipe.optimizer.name in OPTIMIZER_BYTES else "adamw",
        targets=list(recipe.adapter.targets), device=device, session=session,
        weights=base.weights.model_dump(exclude_none=True) or None)
    if plan.trainable_params == 0:
        from krea2kit.train.adapters import no_targets_error

        raise no_targets_error(recipe.adapter.targets, file)
    return plan


__all__ = ["OPTIMIZER_BYTES", "Row", "TrainingMemoryPlan", "VARIANTS", "adapter_params", "block_activation_bytes",
           "dit_activation_bytes", "first_fit", "plan_for_recipe", "readme_table", "targeted", "training_memory_plan"]
