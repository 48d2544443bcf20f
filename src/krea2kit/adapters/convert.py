"""Write a parsed LoRA in the diffusers, native or kohya layout.

* ``diffusers``: ``transformer.<diffusers module>.lora_A/lora_B.weight`` (what the official
  Krea style LoRAs and diffusers' ``Krea2LoraLoaderMixin`` use). Scales other than 1 and
  mixed ranks go into the ``lora_adapter_metadata`` JSON diffusers reads (``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``). Plain LoRA only.
* ``native``: ``diffusion_model.<native module>.…`` (ComfyUI / ai-toolkit): ``lora_A/lora_B.weight``
  (+ ``.alpha`` when the scale is not 1), LoKr ``lokr_*`` / LoHa ``hada_*`` + ``.alpha``,
  full ``.diff``/``.diff_b``, DoRA ``.dora_scale``.
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

from krea2kit.adapters.formats import (
    FULL, LOHA, LOKR, LORA, PEFT_METADATA_KEY, LoraDelta, LoraFile, native_to_diffusers,
)
from krea2kit.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

LAYOUTS = ("diffusers", "native", "kohya")
NATIVE_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."


def _alpha(value: float) -> "torch.Tensor":
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _dora_tensor(d: LoraDelta) -> "torch.Tensor":
    m = d.magnitude
    return m.reshape(-1, 1) if d.magnitude_axis == "out" else m.reshape(1, -1)


def _lycoris_tensors(d: LoraDelta, base: str, lora_names: tuple[str, str], always_alpha: bool) -> dict:

    out: dict[str, torch.Tensor] = {}
    f = d.factors
    if d.kind == LORA:
        out[f"{base}.{lora_names[0]}"] = f["down"]
        out[f"{base}.{lora_names[1]}"] = f["up"]
        if always_alpha or d.scale != 1.0:
            out[f"{base}.alpha"] = _alpha(d.scale * d.rank)
    elif d.kind == LOKR:
        factors = dict(f)
        if d.rank is not None:
            out[f"{base}.alpha"] = _alpha(d.scale * d.rank)
        elif d.scale != 1.0:  # neither side factored: LyCORIS ignores alpha, so fold the scale into w1
            factors["w1"] = (factors["w1"].float() * d.scale).to(factors["w1"].dtype)
        for k, v in factors.items():
            out[f"{base}.lokr_{k}"] = v
    elif d.kind == LOHA:
        for k, v in f.items():
            out[f"{base}.hada_{k}"] = v
        out[f"{base}.alpha"] = _alpha(d.scale * d.rank)
    elif d.kind == FULL:
        for k in ("diff", "diff_b"):
            if k in f:
                v = f[k]
                out[f"{base}.{k}"] = v if d.scale == 1.0 else (v.float() * d.scale).to(v.dtype)
    if d.magnitude is not None:
        out[f"{base}.dora_scale"] = _dora_tensor(d)
    return out


def _diffusers_tensors(lora: LoraFile) -> tuple[dict, dict]:
    bad = [d for d in lora.deltas.values() if d.kind != LORA or d.magnitude is not None]
    if bad:
        kinds = sorted({("dora" if d.magnitude is not None else d.kind) for d in bad})
        raise WeightsError(
            f"the diffusers/PEFT layout holds plain LoRA factors only; this LoRA has {', '.join(kinds)} adapters "
            f"({len(bad)} modules, e.g. {bad[0].module})",
            file=lora.path, hint="convert with --to native or --to kohya instead",
        )
    tensors = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for d in lora.deltas.values():
        dm = native_to_diffusers(d.module)
        tensors[f"{DIFFUSERS_PREFIX}{dm}.lora_A.weight"] = d.factors["down"]
        tensors[f"{DIFFUSERS_PREFIX}{dm}.lora_B.weight"] = d.factors["up"]
        ranks[dm] = d.rank
        alphas[dm] = d.scale * d.rank
    meta: dict[str, str] = {}
    uniform = len(set(ranks.values())) == 1 and all(d.scale == 1.0 for d in lora.deltas.values())
    if not uniform:
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        cfg = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {k: v for k, v in ranks.items() if v != r},
            "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
            "target_modules": sorted(ranks),
            "use_rslora": False,
            "use_dora": False,
        }
        # Pipeline-saved form: every field prefixed with the component name.
        meta[PEFT_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, indent=2, sort_keys=True)
    return tensors, meta


def lora_to_state_dict(lora: LoraFile, layout: str, *, dtype: "torch.dtype | None" = None) -> tuple[dict, dict]:
    """(tensors, metadata) for ``lora`` in ``layout`` (one of :data:`LAYOUTS`)."""
    from krea2kit.adapters.formats import _flat

    if layout not in LAYOUTS:
        raise WeightsError(f"unknown LoRA layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    meta = {k: v for k, v in lora.metadata.items() if k not in (PEFT_METADATA_KEY, "format")}
    if layout == "diffusers":
        tensors, extra = _diffusers_tensors(lora)
    else:
        tensors, extra = {}, {}
        for d in lora.deltas.values():
            if layout == "native":
                tensors.update(_lycoris_tensors(d, NATIVE_PREFIX + d.module, ("lora_A.weight", "lora_B.weight"), False))
            else:
                tensors.update(_lycoris_tensors(d, KOHYA_PREFIX + _flat(d.module), ("lora_down.weight", "lora_up.weight"), True))
    meta.update(extra)
    meta["krea2kit_source_layout"] = lora.layout
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v) for k, v in tensors.items()}
    # Fused q/k/v splits may leave views of one storage; safetensors needs separate tensors.
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    return tensors, meta


def write_lora(lora: LoraFile, path: str | os.PathLike, layout: str, *, dtype: "torch.dtype | None" = None) -> Path:
    """Write ``lora`` as a safetensors file in ``layout``; returns the path."""
    from krea2kit.models.weights import save_safetensors_atomic

    tensors, meta = lora_to_state_dict(lora, layout, dtype=dtype)
    out = Path(path)
    save_safetensors_atomic(tensors, out, metadata=meta)
    return out
