"""Transformer sizes of the benchmarks (random weights; not model presets of the package).

Imported by the bench scripts, which run as ``python bench/NAME.py`` (this folder is then
first on the import path)."""

from __future__ import annotations

from krea2kit.models.dit import PRESETS, DiTConfig

DIT_SIZES: dict[str, DiTConfig] = {
    # Mid size for CPU benchmarks: width 1024, 4 blocks, 8 heads / 2 KV heads (head dim 128).
    "bench-1024": DiTConfig(features=1024, heads=8, kvheads=2, layers=4, txtdim=1024, txtheads=8, txtkvheads=8),
    # A smoke-test size: every code path of the full model (GQA, 3 taps, 2+2 text blocks), tiny.
    "smoke": DiTConfig(features=64, heads=2, kvheads=1, layers=2, tdim=32, txtdim=64, txtheads=2, txtkvheads=2,
                       txtlayers=3),
}


def dit_size(name: str) -> DiTConfig:
    """A bench size or one of the package's presets (``krea2-turbo``, ``krea2-raw``)."""
    sizes = {**PRESETS, **DIT_SIZES}
    if name not in sizes:
        raise SystemExit(f"unknown transformer size {name!r}; choose from {', '.join(sizes)}")
    return sizes[name]
