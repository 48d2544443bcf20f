"""From one module's tensors to its :class:`~.form.LoraDelta`, whatever the key layout.

The tensor roles (``down``/``up``, LyCORIS ``lokr_*`` / ``hada_*``, full ``diff``, DoRA
magnitudes, ``alpha``) are the same under every layout; this module turns them into one
delta, applies the scale conventions (kohya and LyCORIS ``alpha / rank``), and splits a
fused q/k/v delta (SimpleTuner) back into the three projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .form import FULL, LOHA, LOKR, LORA, LoraDelta
from krea2kit.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ``first`` takes 2x2-patchified 16-channel latents: 16*2*2 = 64 inputs (official config
#: ``channels=16, patch=2``). A ``first`` delta with other in_features needs an extra input
#: (a control image concatenated per token, e.g. ``Patil/Krea-2-depth-controlnet``'s expanded
#: ``first.weight`` of 128 inputs).
LATENT_IN_FEATURES = 64


@dataclass
class ModuleGroup:
    """The tensors of one module as a file names it.

    target: the native Linear it changes, or (wq, wk, wv) for a fused q/k/v projection.
    raw_module: the module path as spelled in the file (prefix included).
    layout: the name of the key layout that claimed it.
    tensors: role -> tensor (role -> key until the tensors are read).
    """

    target: str | tuple[str, str, str]
    raw_module: str
    prefix: str
    layout: str
    tensors: dict = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


#: roles only a convolution adapter has: refused (every Krea 2 module a LoRA changes is a Linear).
CONV_ROLES = frozenset({"mid", "lokr_t1", "hada_t1", "hada_t2"})


def refuse_control(group: ModuleGroup, in_features: int, file: str | None) -> None:
    """Refuse a ``first`` projection wider than the latent input: a control adapter."""
    raise WeightsError(
        f"this file carries an expanded input projection ({group.keys[0]}: in_features={in_features}, "
        f"the Krea 2 transformer takes {LATENT_IN_FEATURES}): a control adapter (e.g. a depth/pose control "
        "LoRA) that needs a control image concatenated to the latents, which krea2kit does not provide",
        file=file, key=group.keys[0],
        hint="use a plain style LoRA, or a tool that supports Krea 2 control adapters",
    )


def kind_of(roles: set[str]) -> str | None:
    """The :class:`LoraDelta` kind a set of tensor roles makes, ``None`` if nothing to apply."""
    if roles & {"down", "up"}:
        return LORA
    if any(r.startswith("lokr_") for r in roles):
        return LOKR
    if any(r.startswith("hada_") for r in roles):
        return LOHA
    if roles & {"diff", "diff_b"}:
        return FULL
    return None


def _magnitude(group: ModuleGroup, out_f: int, in_f: int, file: str | None) -> tuple["torch.Tensor | None", str | None]:
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


def build_delta(group: ModuleGroup, alpha_default: float | None, scale_mult: float, file: str | None) -> LoraDelta:
    """One module's delta. ``alpha_default``: the scale when the file stores no alpha for it
    (from PEFT metadata); ``scale_mult``: a file-wide factor from the layout's metadata."""
    t = group.tensors
    roles = set(t)
    where = group.keys[0]
    bad = roles & CONV_ROLES
    if bad:
        raise WeightsError(f"a convolution adapter ({', '.join(sorted(bad))}) cannot apply to a Linear layer",
                           file=file, key=where)
    kind = kind_of(roles)
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
            scale = alpha / r  # kohya ``lora.py``: alpha/r; absent or 0 means alpha = r
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


def split_fused(delta: LoraDelta, targets: tuple[str, str, str], file: str | None) -> list[LoraDelta]:
    # Krea 2's q projection is square (heads * 128 == features, both in the main blocks and in
    # text fusion), and k / v have kvheads * 128 rows each, so rows = in + 2 * kv (krea-ai/krea-2 ``mmdit.py``).
    total, in_f = delta.shape
    kv2 = total - in_f
    if kv2 <= 0 or kv2 % 2:
        raise WeightsError(f"fused to_qkv delta of shape ({total}, {in_f}) does not split into q ({in_f}) + 2 equal k/v",
                           file=file, key=delta.source_keys[0])
    kv = kv2 // 2
    bounds = [(0, in_f), (in_f, in_f + kv), (in_f + kv, total)]
    return [_slice_rows(delta, t, a, b, file) for t, (a, b) in zip(targets, bounds)]

