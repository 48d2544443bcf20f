"""Write a parsed LoRA in the diffusers, native or kohya layout.

* ``diffusers``: what diffusers' ``load_lora_adapter`` and PEFT load, with the scale baked into
  the weights so a file means the same to a reader that ignores its metadata (ComfyUI,
  ``load_lora_adapter(state_dict)``) as to one that reads it:

  - plain LoRA: ``transformer.<diffusers module>.lora_A/lora_B.weight`` (the official Krea
    style LoRAs, ``Krea2LoraLoaderMixin``); ``scale = alpha / rank`` is folded into ``lora_B``.
    PEFT keys have no alpha, and a reader without metadata takes alpha = rank (scale 1).
    Mixed ranks also get a ``lora_adapter_metadata`` config with ``alpha_pattern`` =
    ``rank_pattern``, i.e. scale 1 everywhere, so both kinds of reader agree.
  - LoKr: PEFT's LoKr keys ``transformer.<diffusers module>.lokr_w1`` (always full) and
    ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``, the scale folded into ``lokr_w1``; the
    ``LoKrConfig`` (``r``, ``alpha`` = ``r``, ``rank_pattern``, ``alpha_pattern``,
    ``decompose_factor``, ``decompose_both = false``, ``target_modules``) goes into
    ``lora_adapter_metadata``. PEFT rebuilds each module's shapes from that config
    (peft ``tuners/lokr/layer.py``: ``factorization(dim, decompose_factor)``, a factored
    ``w2`` only when ``r < max(w2.shape) / 2``), so a LoKr whose Kronecker shapes no single
    ``decompose_factor`` reproduces is refused. diffusers' ``Krea2Transformer2DModel.
    load_lora_adapter`` loads it (with or without the metadata); ``Krea2Pipeline.
    load_lora_weights`` (diffusers 0.42) refuses any key without ``lora`` in it, LoKr included.
  - LoHa, full diffs, DoRA and files mixing LoRA with LoKr are refused (use native / kohya).
* ``native``: ``diffusion_model.<native module>.…`` (ComfyUI / ai-toolkit): ``lora_A/lora_B.weight``
  with the scale folded into ``lora_B`` (ai-toolkit's form; diffusers' converter refuses an
  ``.alpha`` there), LoKr ``lokr_*`` / LoHa ``hada_*`` + ``.alpha``, full ``.diff``/``.diff_b``,
  DoRA ``.dora_scale``.
* ``kohya``: ``lora_unet_<native with underscores>.lora_down/lora_up.weight`` + ``.alpha`` (musubi
  tuner, ComfyUI), the same LyCORIS / diff / DoRA suffixes.

``.alpha`` always means ``scale = alpha / rank`` (rank = the factored dimension), so reading
the written file back gives the same ΔW.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from krea2kit.lora.formats import (
    FULL, LOHA, LOKR, LORA, PEFT_METADATA_KEY, LoraDelta, LoraFile, native_to_diffusers,
)
from krea2kit.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

LAYOUTS = ("diffusers", "native", "kohya")
NATIVE_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
#: Scale settings of the krea-2 training output's metadata. A written file carries its scale in
#: its tensors (folded or ``.alpha``), so these are dropped: a reader honouring them would
#: apply the scale twice.
SCALE_METADATA_KEYS = ("lora_scale", "lora_alpha", "rank")


def _alpha(value: float) -> "torch.Tensor":
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _folded(t: "torch.Tensor", scale: float, dtype: "torch.dtype | None") -> "torch.Tensor":
    """``t * scale`` computed in fp32 and stored once in the output dtype (one rounding)."""
    out_dtype = dtype or t.dtype
    if scale == 1.0:
        return t.to(out_dtype)
    return (t.float() * scale).to(out_dtype)


def _dora_tensor(d: LoraDelta) -> "torch.Tensor":
    m = d.magnitude
    return m.reshape(-1, 1) if d.magnitude_axis == "out" else m.reshape(1, -1)


def _lycoris_tensors(d: LoraDelta, base: str, lora_names: tuple[str, str], always_alpha: bool,
                     dtype: "torch.dtype | None" = None) -> dict:

    out: dict[str, torch.Tensor] = {}
    f = d.factors
    if d.kind == LORA:
        out[f"{base}.{lora_names[0]}"] = f["down"]
        if always_alpha:
            out[f"{base}.{lora_names[1]}"] = f["up"]
            out[f"{base}.alpha"] = _alpha(d.scale * d.rank)
        else:
            out[f"{base}.{lora_names[1]}"] = _folded(f["up"], d.scale, dtype)
    elif d.kind == LOKR:
        factors = dict(f)
        if d.rank is not None:
            out[f"{base}.alpha"] = _alpha(d.scale * d.rank)
        elif d.scale != 1.0:  # neither side factored: LyCORIS ignores alpha, so fold the scale into w1
            factors["w1"] = _folded(factors["w1"], d.scale, dtype)
        for k, v in factors.items():
            out[f"{base}.lokr_{k}"] = v
    elif d.kind == LOHA:
        for k, v in f.items():
            out[f"{base}.hada_{k}"] = v
        out[f"{base}.alpha"] = _alpha(d.scale * d.rank)
    elif d.kind == FULL:
        for k in ("diff", "diff_b"):
            if k in f:
                out[f"{base}.{k}"] = _folded(f[k], d.scale, dtype)
    if d.magnitude is not None:
        out[f"{base}.dora_scale"] = _dora_tensor(d)
    return out


# ---------------------------------------------------------------------------
# diffusers / PEFT


def _pipeline_metadata(cfg: dict) -> dict[str, str]:
    # Pipeline-saved form: every field prefixed with the component name (what Krea2Pipeline saves
    # and what load_lora_adapter(..., prefix="transformer") strips).
    return {PEFT_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, indent=2, sort_keys=True)}


def _rank_config(ranks: dict[str, int]) -> dict:
    """``r`` = the commonest rank, the others in ``rank_pattern``; alpha mirrors rank (scale 1)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {k: v for k, v in ranks.items() if v != r}
    return {"r": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "target_modules": sorted(ranks)}


def _diffusers_lora(lora: LoraFile, dtype: "torch.dtype | None") -> tuple[dict, dict]:
    tensors = {}
    ranks: dict[str, int] = {}
    for d in lora.deltas.values():
        dm = native_to_diffusers(d.module)
        tensors[f"{DIFFUSERS_PREFIX}{dm}.lora_A.weight"] = d.factors["down"]
        tensors[f"{DIFFUSERS_PREFIX}{dm}.lora_B.weight"] = _folded(d.factors["up"], d.scale, dtype)
        ranks[dm] = d.rank
    if len(set(ranks.values())) == 1:
        return tensors, {}  # every reader infers r from the shapes and takes alpha = r
    cfg = _rank_config(ranks)
    cfg.update(lora_alpha=cfg["r"], use_rslora=False, use_dora=False)
    return tensors, _pipeline_metadata(cfg)


def kron_split(dim: int, factor: int = -1) -> tuple[int, int]:
    """How PEFT splits a Linear dimension into Kronecker factors ``(m, n)``, m·n = dim.

    A ``factor`` dividing ``dim`` gives ``(factor, dim // factor)`` as is; otherwise the divisor
    pair nearest the square root whose smaller side does not exceed ``factor`` (any size when
    ``factor`` is -1), smaller side first. Must match peft ``tuners/lokr/layer.py``
    ``factorization`` exactly (a test compares them): PEFT builds its LoKr tensors from it.
    LyCORIS' own ``factorization`` differs in one case: a dividing factor above the square root
    is swapped to ``(dim // factor, factor)``, so a LoKr trained that way may not fit PEFT.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        nxt = m + 1
        while dim % nxt:
            nxt += 1
        if nxt > cap:
            break
        m, n = nxt, dim // nxt
    return min(m, n), max(m, n)


def _lokr_shapes(d: LoraDelta) -> tuple[tuple[int, int], tuple[int, int]]:
    """((out_l, out_k), (in_m, in_n)): W1 is (out_l, in_m), W2 is (out_k, in_n)."""
    def side(name: str) -> tuple[int, int]:
        f = d.factors
        if name in f:
            return int(f[name].shape[0]), int(f[name].shape[1])
        return int(f[f"{name}_a"].shape[0]), int(f[f"{name}_b"].shape[1])

    (a, c), (b, e) = side("w1"), side("w2")
    return (a, b), (c, e)


def _decompose_factor(deltas: list[LoraDelta], file: str | None) -> int:
    """The one PEFT ``decompose_factor`` that reproduces every module's Kronecker shapes.

    PEFT has one factor for all modules (no per-module pattern), so a LoKr trained with
    per-module factors, or with LyCORIS' swapped split (see :func:`kron_split`), has none."""
    shapes = {d.module: _lokr_shapes(d) for d in deltas}

    def misfits(f: int) -> list[str]:
        return [m for m, ((o1, o2), (i1, i2)) in shapes.items()
                if kron_split(o1 * o2, f) != (o1, o2) or kron_split(i1 * i2, f) != (i1, i2)]

    candidates = sorted({s[0][0] for s in shapes.values()} | {s[1][0] for s in shapes.values()}) + [-1]
    tried = {f: misfits(f) for f in candidates}
    for f, bad in tried.items():
        if not bad:
            return f
    f, bad = min(tried.items(), key=lambda kv: len(kv[1]))
    (o1, o2), (i1, i2) = shapes[bad[0]]
    (p1, p2), (q1, q2) = kron_split(o1 * o2, f), kron_split(i1 * i2, f)
    raise WeightsError(
        "PEFT cannot rebuild this LoKr's Kronecker shapes: no single decompose_factor gives every module's "
        f"split (the closest, {f}, misses {len(bad)} modules, e.g. {bad[0]}: out {o1}x{o2} / in {i1}x{i2} "
        f"where PEFT would make {p1}x{p2} / {q1}x{q2})",
        file=file, hint="convert with --to native or --to kohya (ComfyUI and LyCORIS load those)")


def _diffusers_lokr(lora: LoraFile, dtype: "torch.dtype | None") -> tuple[dict, dict]:
    import torch

    deltas = list(lora.deltas.values())
    factor = _decompose_factor(deltas, lora.path)
    tensors = {}
    ranks: dict[str, int] = {}
    for d in deltas:
        dm = f"{DIFFUSERS_PREFIX}{native_to_diffusers(d.module)}"
        # W1 is always stored full (decompose_both = false), holding the scale: PEFT then needs
        # one rank per module, the one that decides whether W2 is factored.
        tensors[f"{dm}.lokr_w1"] = _folded(d.w1(torch.float32), d.scale, dtype or d.dtype)
        (_, out_k), (_, in_n) = _lokr_shapes(d)
        full_rank = max(out_k, in_n)
        k = d.factors["w2_a"].shape[1] if "w2_a" in d.factors else None
        if k is not None and k < full_rank / 2:  # PEFT factors W2 exactly when r < max(W2) / 2
            tensors[f"{dm}.lokr_w2_a"] = d.factors["w2_a"]
            tensors[f"{dm}.lokr_w2_b"] = d.factors["w2_b"]
            ranks[dm[len(DIFFUSERS_PREFIX):]] = k
        else:  # full W2: a rank of max(W2) makes PEFT (and diffusers' inference) expect it full
            tensors[f"{dm}.lokr_w2"] = d.w2(torch.float32).to(dtype or d.dtype)
            ranks[dm[len(DIFFUSERS_PREFIX):]] = full_rank
    cfg = _rank_config(ranks)
    cfg.update(peft_type="LOKR", alpha=cfg["r"], decompose_both=False, decompose_factor=factor)
    return tensors, _pipeline_metadata(cfg)


def _diffusers_tensors(lora: LoraFile, dtype: "torch.dtype | None" = None) -> tuple[dict, dict]:
    bad = [d for d in lora.deltas.values() if d.kind not in (LORA, LOKR) or d.magnitude is not None]
    if bad:
        kinds = sorted({("dora" if d.magnitude is not None else d.kind) for d in bad})
        raise WeightsError(
            f"the diffusers/PEFT layout holds plain LoRA or LoKr factors only; this LoRA has {', '.join(kinds)} "
            f"adapters ({len(bad)} modules, e.g. {bad[0].module})",
            file=lora.path, hint="convert with --to native or --to kohya instead",
        )
    kinds = Counter(d.kind for d in lora.deltas.values())
    if len(kinds) > 1:
        raise WeightsError(
            f"the diffusers/PEFT layout holds one adapter kind per file; this one mixes "
            f"{' and '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))} (diffusers reads a file with any "
            "lokr_ key as LoKr only)",
            file=lora.path, hint="convert with --to native or --to kohya instead")
    if kinds.get(LOKR):
        return _diffusers_lokr(lora, dtype)
    return _diffusers_lora(lora, dtype)


def lora_to_state_dict(lora: LoraFile, layout: str, *, dtype: "torch.dtype | None" = None) -> tuple[dict, dict]:
    """(tensors, metadata) for ``lora`` in ``layout`` (one of :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown LoRA layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    dropped = (PEFT_METADATA_KEY, "format", *SCALE_METADATA_KEYS)
    meta = {k: v for k, v in lora.metadata.items() if k not in dropped}
    if layout == "diffusers":
        tensors, extra = _diffusers_tensors(lora, dtype)
    else:
        tensors, extra = {}, {}
        for d in lora.deltas.values():
            if layout == "native":
                tensors.update(_lycoris_tensors(d, NATIVE_PREFIX + d.module, ("lora_A.weight", "lora_B.weight"),
                                                False, dtype))
            else:
                flat = d.module.replace(".", "_")  # kohya flattens native names
                tensors.update(_lycoris_tensors(d, KOHYA_PREFIX + flat, ("lora_down.weight", "lora_up.weight"),
                                                True, dtype))
    meta.update(extra)
    meta["krea2kit_source_layout"] = lora.layout
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v) for k, v in tensors.items()}
    # Fused q/k/v splits may leave views of one storage; safetensors needs separate tensors.
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    return tensors, meta


def write_lora(lora: LoraFile, path: str | os.PathLike, layout: str, *, dtype: "torch.dtype | None" = None,
               overwrite: bool = True) -> Path:
    """Write ``lora`` as a safetensors file in ``layout``; returns the path. ``overwrite=False``
    never replaces an existing file (checked atomically as the file takes its name)."""
    from krea2kit.models.weights import save_safetensors_atomic

    tensors, meta = lora_to_state_dict(lora, layout, dtype=dtype)
    out = Path(path)
    save_safetensors_atomic(tensors, out, metadata=meta, overwrite=overwrite)
    return out
