"""Apply LoRA-family adapters to the Krea 2 transformer.

Two ways, both keyed by native module names (``blocks.3.attn.wq``):

* **Runtime** (:func:`attach_adapters`): base weights untouched; a forward hook on each
  adapted ``nn.Linear`` adds ``sum_i s_i(step) * ΔW_i x``. LoRA factors stay low-rank
  (``up @ (down @ x)``), LoKr is applied through its Kronecker structure
  (``vec(W1 · X · W2ᵀ)``), LoHa / full / DoRA deltas are materialised once per module. Strengths
  change per image and per step (:meth:`AdapterHandle.set_step`, :meth:`AdapterHandle.set_strength`)
  with no re-merge; a strength may also be a per-sample vector. Several LoRAs stack.
* **Merged** (:func:`merge_into`): ``W += Σ s_i ΔW_i`` once (fastest forward, fixed strengths);
  :meth:`MergedWeights.restore` puts the original tensors back bit for bit.

DoRA at strength ``s`` is ``W + s · (W'_DoRA − W)`` in both paths (see
:meth:`~krea2kit.lora.formats.LoraDelta.effective_delta`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

from krea2kit.lora.formats import FULL, LOHA, LOKR, LORA, LoraDelta, LoraFile
from krea2kit.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ``strength_fn(step, total) -> strength``; step counts from 0, total = number of steps.
StrengthFn = Callable[[int, int], float]
StrengthSpec = Union[float, int, StrengthFn]


@dataclass(frozen=True)
class StepSchedule:
    """A constant strength active only for steps in ``[start, end)`` (``end=None``: to the last step).

    Negative ``start``/``end`` count from the end (``end=-1`` leaves out the last step).
    """

    strength: float = 1.0
    start: int = 0
    end: int | None = None

    def active(self, step: int, total: int) -> bool:
        start = self.start + total if self.start < 0 else self.start
        end = total if self.end is None else (self.end + total if self.end < 0 else self.end)
        return start <= step < end

    def __call__(self, step: int, total: int) -> float:
        return float(self.strength) if self.active(step, total) else 0.0


def as_strength_fn(spec: StrengthSpec) -> StrengthFn:
    """A number becomes a constant schedule; a callable is used as is."""
    if callable(spec):
        return spec
    return StepSchedule(float(spec))


# ---------------------------------------------------------------------------
# Per-module appliers


class _Applier:
    """Computes ΔW x (strength 1) for one delta on one module."""

    def __init__(self, delta: LoraDelta, linear: "torch.nn.Linear"):
        import torch

        w = linear.weight
        self.dtype, self.device = w.dtype, w.device
        self.kind = delta.kind
        self.bias = None
        if delta.magnitude is not None or delta.kind in (LOHA, FULL):
            # DoRA needs the base weight (norm of W + ΔW); LoHa has no cheap factored product.
            self.mode = "dense"
            self.dense = delta.effective_delta(w.detach()).to(self.dtype)
            b = delta.bias_delta(torch.float32, w.device)
            self.bias = None if b is None else b.to(self.dtype)
        elif delta.kind == LORA:
            self.mode = "lowrank"
            self.down = delta.factors["down"].to(device=w.device, dtype=self.dtype)
            # The scale is folded into ``up`` once (in fp32, then cast).
            self.up = (delta.factors["up"].to(device=w.device, dtype=torch.float32) * delta.scale).to(self.dtype)
        elif delta.kind == LOKR:
            self.mode = "kron"
            self.w1 = (delta.w1(torch.float32, w.device) * delta.scale).to(self.dtype)
            self.w2 = delta.w2(torch.float32, w.device).to(self.dtype)
        else:  # pragma: no cover - formats only makes the kinds above
            raise WeightsError(f"unknown adapter kind {delta.kind!r}", key=delta.module)

    def _move(self, device) -> None:
        for name in ("dense", "bias", "down", "up", "w1", "w2"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.to(device))
        self.device = device

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        if x.device != self.device:
            self._move(x.device)
        x = x.to(self.dtype)
        if self.mode == "lowrank":
            return F.linear(F.linear(x, self.down), self.up)
        if self.mode == "kron":
            # kron(W1, W2) x = vec(W1 · X · W2ᵀ) with X = x reshaped (b, d) row-major.
            a, b = self.w1.shape
            c, d = self.w2.shape
            xx = x.reshape(*x.shape[:-1], b, d)
            y = self.w1 @ (xx @ self.w2.T)
            return y.reshape(*x.shape[:-1], a * c)
        return F.linear(x, self.dense, self.bias)


#: modules that see B*L rows: the text-fusion layerwise blocks run on (B·L, taps, D).
_PER_TOKEN_ROWS = "txtfusion.layerwise_blocks."


def _broadcast_strength(s, y: "torch.Tensor", name: str = ""):
    """A float, or a per-sample vector (B,) broadcast over y's leading dim.

    The vector needs one value per row of the transformer batch (CFG doubles it: give the
    values for both halves). The text-fusion ``layerwise_blocks`` see ``B*L`` rows
    (sample-major) and get each sample's value repeated ``L`` times.
    """
    if not hasattr(s, "shape"):
        return s
    n = y.shape[0]
    s = s.to(device=y.device, dtype=y.dtype).reshape(-1)
    if s.numel() != n:
        if not (name.startswith(_PER_TOKEN_ROWS) and n % s.numel() == 0):
            raise ValueError(
                f"{s.numel()} per-sample strengths for a batch of {n} rows at {name}: give one value per row of "
                "the transformer batch, and encode the text per image (shared text features cannot take "
                "per-image strengths in the text-fusion modules)")
        s = s.repeat_interleave(n // s.numel())
    return s.reshape(n, *([1] * (y.dim() - 1)))


class _ModuleHook:
    def __init__(self, handle: "AdapterHandle", name: str):
        self.handle = handle
        self.name = name
        self.entries: list[tuple[int, _Applier]] = []
        self.removable = None

    def __call__(self, module, args, output):
        import torch

        strengths = self.handle._current
        # Inference (no autograd): add in place into the Linear's fresh output, no temporaries.
        inplace = not torch.is_grad_enabled()
        out = output
        for idx, applier in self.entries:
            s = strengths[idx]
            if not hasattr(s, "shape") and s == 0.0:
                continue
            delta = applier(args[0])
            if hasattr(s, "shape"):
                out = out + (_broadcast_strength(s, delta, self.name) * delta).to(out.dtype)
            elif inplace and delta.dtype == out.dtype:
                out = out.add_(delta, alpha=s)
            else:
                out = out + (delta * s).to(out.dtype)
        return out


class AdapterHandle:
    """Runtime adapters attached to a transformer. Use :meth:`detach` (or ``with``) to remove them."""

    def __init__(self, dit: "torch.nn.Module", loras: list[LoraFile], fns: list[StrengthFn]):
        self.dit = dit
        self.loras = loras
        self._fns: list = list(fns)
        self._current: list = [0.0] * len(loras)
        self._hooks: dict[str, _ModuleHook] = {}
        self.step, self.total = 0, 1
        self.attached = False

    @property
    def names(self) -> list[str]:
        return [lora.name for lora in self.loras]

    @property
    def modules(self) -> list[str]:
        return list(self._hooks)

    def _index(self, which: int | str) -> int:
        if isinstance(which, int):
            return which
        for i, lora in enumerate(self.loras):
            if lora.name == which:
                return i
        raise KeyError(f"no attached LoRA named {which!r} (attached: {', '.join(self.names)})")

    def set_step(self, step: int, total: int) -> None:
        """Evaluate every strength function for this denoising step (call once per step)."""
        self.step, self.total = step, total
        for i, fn in enumerate(self._fns):
            self._current[i] = fn if hasattr(fn, "shape") else float(fn(step, total))

    def set_strength(self, which: int | str, strength: "StrengthSpec | torch.Tensor") -> None:
        """Change one LoRA's strength (a number, a ``fn(step, total)``, or a per-sample (B,) tensor)."""
        i = self._index(which)
        self._fns[i] = strength if hasattr(strength, "shape") else as_strength_fn(strength)
        self.set_step(self.step, self.total)

    def strengths(self) -> list:
        """The strengths in force at the current step, one per attached LoRA."""
        return list(self._current)

    def detach(self) -> None:
        """Remove every hook; the transformer is exactly as before."""
        for hook in self._hooks.values():
            if hook.removable is not None:
                hook.removable.remove()
        self._hooks.clear()
        self.attached = False

    def __enter__(self) -> "AdapterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _normalise(loras) -> list[tuple[LoraFile, StrengthSpec]]:
    if isinstance(loras, LoraFile):
        return [(loras, 1.0)]
    out = []
    for item in loras:
        if isinstance(item, LoraFile):
            out.append((item, 1.0))
        else:
            lora, spec = item
            out.append((lora, spec))
    return out


def _target(dit, name: str, delta: LoraDelta, lora: LoraFile):
    import torch

    try:
        mod = dit.get_submodule(name)
    except AttributeError:
        return None
    if not isinstance(mod, torch.nn.Linear):
        raise WeightsError(f"{name} is a {type(mod).__name__}, not a Linear layer", file=lora.path, key=name)
    if tuple(mod.weight.shape) != delta.shape:
        raise WeightsError(
            f"the LoRA changes {name} as {delta.shape[0]}x{delta.shape[1]}, the model's weight is "
            f"{tuple(mod.weight.shape)[0]}x{tuple(mod.weight.shape)[1]}",
            file=lora.path, key=name,
            hint="the LoRA was made for a model of another size (or another model)",
        )
    if "diff_b" in delta.factors and mod.bias is None:
        raise WeightsError(f"the LoRA changes the bias of {name}, which has none", file=lora.path, key=name)
    return mod


def _check_targets(dit, pairs, missing: str) -> dict[str, list[tuple[int, LoraDelta]]]:
    plan: dict[str, list[tuple[int, LoraDelta]]] = {}
    absent: list[str] = []
    for i, (lora, _) in enumerate(pairs):
        for name, delta in lora.deltas.items():
            if _target(dit, name, delta, lora) is None:
                absent.append(name)
                continue
            plan.setdefault(name, []).append((i, delta))
    if absent and missing == "error":
        from krea2kit.models.weights import summarize_names

        raise WeightsError(f"{len(absent)} adapted modules are not in this transformer ({summarize_names(absent)})",
                           hint="the LoRA was made for a model with more blocks; pass missing='skip' to ignore them")
    return plan


def attach_adapters(
    dit: "torch.nn.Module",
    loras: "LoraFile | Sequence[LoraFile | tuple[LoraFile, StrengthSpec]]",
    *,
    missing: str = "error",
) -> AdapterHandle:
    """Attach LoRAs as runtime adapters; each is ``LoraFile`` or ``(LoraFile, strength)``.

    ``strength`` is a number or ``fn(step, total) -> float`` (see :class:`StepSchedule`).
    Strengths are evaluated at step 0 of 1 until :meth:`AdapterHandle.set_step` is called.
    ``missing="skip"`` ignores modules the transformer does not have.
    """
    pairs = _normalise(loras)
    plan = _check_targets(dit, pairs, missing)
    handle = AdapterHandle(dit, [p[0] for p in pairs], [as_strength_fn(p[1]) for p in pairs])
    for name, items in plan.items():
        mod = dit.get_submodule(name)
        hook = _ModuleHook(handle, name)
        hook.entries = [(i, _Applier(delta, mod)) for i, delta in items]
        hook.removable = mod.register_forward_hook(hook)
        handle._hooks[name] = hook
    handle.attached = True
    handle.set_step(0, 1)
    return handle


# ---------------------------------------------------------------------------
# Merging


class MergedWeights:
    """What :func:`merge_into` changed, and the originals to put back."""

    def __init__(self, dit, backup: str):
        self.dit = dit
        self.backup = backup
        self._saved: dict[str, "torch.Tensor"] = {}
        self._applied: dict[str, "torch.Tensor"] = {}  # for backup="none": the float delta added
        self._storage: dict[str, dict] = {}  # quantized layers (krea2kit.models.quant): their stored tensors
        self.restored = False

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in (self._saved or self._applied)} | set(self._storage))

    def restore(self) -> None:
        """Put the original weights back (bit-exact unless ``backup="none"``)."""
        import torch

        if self.restored:
            return
        for name, state in self._storage.items():  # quantized layers: their storage, bit for bit
            self.dit.get_submodule(name).load_storage_(state)
        self._storage.clear()
        with torch.no_grad():
            if self.backup == "none":
                for pname, delta in self._applied.items():
                    p = self.dit.get_parameter(pname)
                    p.copy_((p.float() - delta.to(p.device)).to(p.dtype))
            else:
                for pname, orig in self._saved.items():
                    self.dit.get_parameter(pname).copy_(orig)
        self._saved.clear()
        self._applied.clear()
        self.restored = True

    def __enter__(self) -> "MergedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def merge_into(
    dit: "torch.nn.Module",
    loras: "LoraFile | Sequence[LoraFile | tuple[LoraFile, float]]",
    strength: float = 1.0,
    *,
    backup: str = "cpu",
    missing: str = "error",
) -> MergedWeights:
    """Add ``Σ s_i ΔW_i`` into the transformer's weights, in place.

    A bare ``LoraFile`` uses ``strength``; pairs carry their own (a number; step schedules
    need the runtime path). The sum is formed in fp32 and cast once to the weight dtype.
    ``backup``: ``"cpu"`` keeps the original tensors on the CPU, ``"device"`` beside the
    weights (both give a bit-exact :meth:`MergedWeights.restore`), ``"none"`` keeps nothing
    and restore subtracts (not exact in low precision).
    """
    import torch

    if backup not in ("cpu", "device", "none"):
        raise ValueError("backup must be 'cpu', 'device' or 'none'")
    if isinstance(loras, LoraFile):
        pairs = [(loras, strength)]
    else:
        pairs = [(item, strength) if isinstance(item, LoraFile) else (item[0], item[1]) for item in loras]
    for lora, spec in pairs:
        if callable(spec):
            raise ValueError(f"{lora.name}: a merged LoRA needs a fixed strength; use attach_adapters for schedules")
    plan = _check_targets(dit, pairs, missing)
    merged = MergedWeights(dit, backup)
    with torch.no_grad():
        for name, items in plan.items():
            mod = dit.get_submodule(name)
            w = mod.weight
            # DoRA's change depends on the weight it is merged into: use the original one.
            dora = {i: delta.effective_delta(w) for i, delta in items if delta.magnitude is not None}
            bias_items = [(i, delta.bias_delta(torch.float32, w.device)) for i, delta in items]
            bias_items = [(i, b) for i, b in bias_items if b is not None]
            # A quantized layer (krea2kit.models.quant) keeps its stored tensors; its weight is re-quantized below.
            quantized = hasattr(mod, "requantize_")
            if quantized:
                merged._storage[name] = mod.storage_state()
            targets = ([] if quantized else [("weight", w)]) + ([("bias", mod.bias)] if bias_items else [])
            for leaf, p in targets:
                pname = f"{name}.{leaf}"
                if backup == "cpu":
                    merged._saved[pname] = p.detach().to("cpu", copy=True)
                elif backup == "device":
                    merged._saved[pname] = p.detach().clone()
            # Accumulate in fp32 (in place when the weight is fp32), cast once.
            acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if backup == "none" else (
                w if w.dtype == torch.float32 else w.float())
            for i, delta in items:
                s = float(pairs[i][1])
                if i in dora:
                    acc.add_(dora[i], alpha=s)
                elif delta.kind == LORA:
                    up = delta.factors["up"].to(device=w.device, dtype=torch.float32)
                    down = delta.factors["down"].to(device=w.device, dtype=torch.float32)
                    acc.addmm_(up, down, alpha=s * delta.scale)
                else:
                    acc.add_(delta.dense(torch.float32, w.device), alpha=s)
            if backup == "none":
                if not quantized:
                    merged._applied[f"{name}.weight"] = acc
                w.copy_((w.float() + acc).to(w.dtype))
            elif acc is not w:
                w.copy_(acc.to(w.dtype))
            if quantized:  # w is this layer's dequantized copy: dequantize -> add -> requantize
                mod.requantize_(w)
            if bias_items:
                b = mod.bias
                bacc = sum(float(pairs[i][1]) * bd for i, bd in bias_items)
                if backup == "none":
                    merged._applied[f"{name}.bias"] = bacc
                b.copy_((b.float() + bacc).to(b.dtype))
    return merged
