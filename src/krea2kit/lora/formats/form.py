"""krea2kit's internal form of a LoRA: one :class:`LoraDelta` per native Linear name
(``blocks.3.attn.wq``), gathered in a :class:`LoraFile`. Every layout parses into it;
the runtime adapters and the converter read only this."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

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

