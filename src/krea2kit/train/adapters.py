"""Trainable LoRA and LoKr adapters around the frozen transformer's Linears.

Each adapted ``nn.Linear`` keeps its weights and its name (``blocks.3.attn.wq``): a forward
hook adds ``multiplier · ΔW x`` to its output, so the model still matches every LoRA file's
module names and the runtime loader (:mod:`krea2kit.lora.apply`) can be attached beside it.

* **LoRA** (Hu et al. 2021; PEFT ``LoraLayer``): ``ΔW x = (alpha / r) · up(down(x))``, ``down``
  (r, in) initialised Kaiming-uniform with ``a = √5`` (``nn.Linear``'s default, PEFT's
  ``init_lora_weights=True``), ``up`` (out, r) zeros, so step 0 is exactly the base model.
* **LoKr** (LyCORIS ``LokrModule``): ``ΔW = scale · kron(W1, W2)`` with the out/in sizes split
  by LyCORIS' ``factorization`` (``W1`` (a, b) full and Kaiming-uniform; ``W2`` (c, d) low-rank
  ``w2_a @ w2_b`` when ``r < max(c, d) / 2`` (``w2_a`` Kaiming, ``w2_b`` zeros, scale ``alpha / r``),
  else full and zero, scale 1 (LyCORIS forces alpha = r when no side is factored).

The adapters' parameters are fp32 whatever the base dtype (bf16 Adam moments lose the small
updates); the adapter runs in fp32 and its output is cast to the base output's dtype.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from krea2kit.errors import RecipeError

KINDS = ("lora", "lokr")

#: Named target sets (native module names). ``all`` is every Linear of the transformer,
#: the default of musubi-tuner (``KREA2_TARGET_REPLACE_MODULES=None``, 264 Linears on Krea 2)
#: and of ai-toolkit; ``blocks`` the 28 main blocks only (what krea-2's own converter keeps);
#: ``attention`` the main blocks' attention projections (musubi's attention-only preset:
#: wq, wk, wv, gate, wo x 28 = 140 Linears); ``attention-mlp`` adds the blocks' SwiGLU.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    "blocks": ("blocks.*",),
    "attention": ("blocks.*.attn.wq", "blocks.*.attn.wk", "blocks.*.attn.wv", "blocks.*.attn.gate",
                  "blocks.*.attn.wo"),
    "attention-mlp": ("blocks.*.attn.*", "blocks.*.mlp.*"),
}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``, the split LyCORIS' LoKr uses.

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)`` (sorted). Otherwise
    ``m`` grows through the divisors of ``dimension`` while ``m + n`` does not grow and ``m``
    stays within ``factor`` (``-1``: no bound), i.e. the most balanced split (128 -> 8, 16;
    1024 -> 32, 32; 127 -> 1, 127). Same results as ``lycoris.functional.factorization``.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        cand_n = dimension // cand
        if cand + cand_n > m + n or cand > bound:
            break
        m, n = cand, cand_n
    return (n, m) if m > n else (m, n)


def _kaiming(t: Tensor, generator: torch.Generator | None) -> None:
    # nn.Linear's default init (Kaiming-uniform, a = sqrt(5)); PEFT and LyCORIS use it too.
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


class LoraAdapter(nn.Module):
    """``(alpha / r) · up(down(x))``: ``down`` (r, in), ``up`` (out, r)."""

    kind = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 *, generator: torch.Generator | None = None):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.down = nn.Parameter(torch.empty(self.rank, in_features, dtype=torch.float32))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, dtype=torch.float32))
        _kaiming(self.down, generator)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def factors(self) -> dict[str, Tensor]:
        return {"down": self.down, "up": self.up}

    def dense(self) -> Tensor:
        return (self.up @ self.down) * self.scale


class LokrAdapter(nn.Module):
    """``scale · kron(W1, W2) x`` computed as ``vec(W1 · X · W2ᵀ)`` (X: x as a (b, d) matrix),
    never forming the (out, in) product."""

    kind = "lokr"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 *, factor: int = -1, generator: torch.Generator | None = None):
        super().__init__()
        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
        self.rank = int(rank)
        self.w1 = nn.Parameter(torch.empty(out_l, in_m, dtype=torch.float32))
        _kaiming(self.w1, generator)
        self.decomposed = self.rank < max(out_k, in_n) / 2
        if self.decomposed:
            self.w2_a = nn.Parameter(torch.empty(out_k, self.rank, dtype=torch.float32))
            _kaiming(self.w2_a, generator)
            self.w2_b = nn.Parameter(torch.zeros(self.rank, in_n, dtype=torch.float32))
            self.alpha = float(alpha)
            self.scale = self.alpha / self.rank
        else:  # LyCORIS: both sides full -> alpha = r, scale 1
            self.w2 = nn.Parameter(torch.zeros(out_k, in_n, dtype=torch.float32))
            self.alpha = float(self.rank)
            self.scale = 1.0

    def w2_matrix(self) -> Tensor:
        return self.w2_a @ self.w2_b if self.decomposed else self.w2

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w1.shape
        w2 = self.w2_matrix()
        c, d = w2.shape
        xx = x.reshape(*x.shape[:-1], b, d)
        y = self.w1 @ (xx @ w2.T)
        return y.reshape(*x.shape[:-1], a * c) * self.scale

    def factors(self) -> dict[str, Tensor]:
        if self.decomposed:
            return {"w1": self.w1, "w2_a": self.w2_a, "w2_b": self.w2_b}
        return {"w1": self.w1, "w2": self.w2}

    def dense(self) -> Tensor:
        return torch.kron(self.w1, self.w2_matrix()) * self.scale


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"
    rank: int = 32
    alpha: float = 32.0
    targets: tuple[str, ...] = ("all",)
    factor: int = -1  # LoKr only


def select_targets(dit: nn.Module, targets: Sequence[str]) -> list[str]:
    """Native names of the Linears ``targets`` selects, in module order.

    Each entry is a preset name (:data:`TARGET_PRESETS`) or a glob on native names
    (``"blocks.*.attn.wq"``, ``"txtfusion.*"``); the union is taken.
    """
    patterns: list[str] = []
    for t in targets:
        patterns.extend(TARGET_PRESETS.get(t, (t,)))
    regexes = [re.compile(fnmatch.translate(p)) for p in patterns]
    names = [name for name, mod in dit.named_modules()
             if isinstance(mod, nn.Linear) and any(r.match(name) for r in regexes)]
    return names


def no_targets_error(targets: Sequence[str], file: str | None = None) -> RecipeError:
    return RecipeError(f"the targets {list(targets)} select no Linear of this transformer", file=file,
                       key="adapter.targets",
                       hint=f"use a preset ({', '.join(TARGET_PRESETS)}) or globs on native names "
                            "such as 'blocks.*.attn.wq'")


class AdapterSet(nn.Module):
    """The trainable adapters of one run, attached to ``dit`` by forward hooks.

    ``multiplier`` scales every adapter's output (1 for plain training; the slider mode trains
    at +1 and -1; 0 switches them off without detaching). :meth:`detach` removes the hooks.
    """

    def __init__(self, dit: nn.Module, config: AdapterConfig, *, seed: int = 0):
        super().__init__()
        if config.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {config.kind!r}")
        self.config = config
        self.multiplier: float = 1.0
        self.names = select_targets(dit, config.targets)
        if not self.names:
            raise no_targets_error(config.targets)
        # One generator for the whole set, consumed in module order: the init depends on the
        # seed and the target list only.
        gen = torch.Generator().manual_seed(int(seed))
        self.adapters = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        for name in self.names:
            lin = dit.get_submodule(name)
            if config.kind == "lora":
                ad = LoraAdapter(lin.in_features, lin.out_features, config.rank, config.alpha, generator=gen)
            else:
                ad = LokrAdapter(lin.in_features, lin.out_features, config.rank, config.alpha,
                                 factor=config.factor, generator=gen)
            key = name.replace(".", "__")  # ModuleDict keys cannot hold dots
            self._keys[name] = key
            self.adapters[key] = ad.to(lin.weight.device)
        self._handles: list = []
        self._attach(dit)

    def _attach(self, dit: nn.Module) -> None:
        for name in self.names:
            ad = self.adapters[self._keys[name]]
            self._handles.append(dit.get_submodule(name).register_forward_hook(self._hook(ad)))

    def _hook(self, ad: nn.Module):
        def hook(module, args, output):
            m = self.multiplier
            if m == 0.0:
                return output
            x = args[0]
            y = ad(x.to(torch.float32) if not torch.is_autocast_enabled(x.device.type) else x)
            return output + (y * m).to(output.dtype)
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def adapter(self, name: str) -> nn.Module:
        return self.adapters[self._keys[name]]

    def items(self) -> Iterable[tuple[str, nn.Module]]:
        for name in self.names:
            yield name, self.adapters[self._keys[name]]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- state in native names ---------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """``{"<native name>.<factor>": tensor}`` (detached; the checkpoint's adapter file)."""
        return {f"{name}.{k}": v.detach() for name, ad in self.items() for k, v in ad.factors().items()}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = set(self.tensors())
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:3]
            extra = sorted(set(tensors) - expected)[:3]
            raise ValueError(f"adapter tensors do not match this run (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for name, ad in self.items():
                for k, p in ad.factors().items():
                    p.copy_(tensors[f"{name}.{k}"])

    def deltas(self) -> dict:
        """The adapters as krea2kit's internal LoRA form (:class:`~krea2kit.lora.formats.LoraDelta`
        per native name, fp32 copies), what every layout writer reads."""
        from krea2kit.lora.formats import LOKR, LORA, LoraDelta

        out = {}
        for name, ad in self.items():
            factors = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in ad.factors().items()}
            out[name] = LoraDelta(module=name, kind=LORA if ad.kind == "lora" else LOKR, factors=factors,
                                  scale=float(ad.scale))
        return out

    def lora_file(self, *, name: str = "", metadata: dict[str, str] | None = None):
        """A :class:`~krea2kit.lora.formats.LoraFile` of the current adapters (layout "krea2kit-train")."""
        from krea2kit.lora.formats import LoraFile

        deltas = self.deltas()
        return LoraFile(deltas=deltas, layout="krea2kit-train", metadata=dict(metadata or {}), name=name,
                        num_tensors=sum(len(d.factors) for d in deltas.values()))
