"""One short GPU session's figures for consumer-GPU support (issue 14), as JSON on stdout.

Every figure is a ratio against a peer run in the same process, on the same synthetic weights:

  transformer   a mid-size synthetic transformer (1.3B: width 3072, 8 blocks, 24/6 heads) written
                as a bf16 safetensors file, loaded three ways: bf16, fp8 on load and int8 on load
                (``model.weights_dtype``). Per way and compute path (``model.quant_compute``: "auto",
                which takes torch._scaled_mm / torch._int_mm where the GPU has them, and
                "dequantize"): seconds per Turbo step at 1024² (official layout, guidance 0) and
                ``torch.cuda.max_memory_allocated`` over the steps, each / the bf16 run's; the
                paths the layers took; the preflight estimate (krea2kit.memory) / the measured peak.
  offload       the bf16 transformer with its blocks streamed from pinned host memory
                (``model.offload = "blocks"``): step time and peak / the resident bf16 run's, and
                the estimate / measured peak.
  vae           the Qwen-Image VAE (full-size config, random weights, bf16) decoding 1024²:
                the exact decode of layout "official" / the 2D fold (seconds and peak memory).

Runs in about 2 minutes on one H100/H200 (most of it writing and quantizing the 2.6 GB file);
``--budget`` stops before a section that would start later than that many seconds. Without
CUDA it prints ``{"skipped": "no CUDA device"}`` and exits 0. A CPU smoke run of every code
path (tiny sizes, host timings, no memory figures):

    python bench/gpu_all.py                                   # on a GPU machine
    python bench/gpu_all.py --device cpu --size smoke --side 64 --steps 2 --vae-side 64
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TEXT = 512  # text positions the official encoder hands over (memory.TEXT_TOKENS)
PROMPT = 40
TURBO_MU = 1.15
GIB = 2**30


def mid_config(size: str):
    from krea2kit.models.dit import DiTConfig

    if size == "mid":
        return DiTConfig(features=3072, heads=24, kvheads=6, layers=8)
    if size == "smoke":
        return DiTConfig(features=64, heads=2, kvheads=1, layers=2, tdim=32, txtdim=64, txtheads=2, txtkvheads=2,
                         txtlayers=3)
    from dit_sizes import dit_size

    return dit_size(size)


def write_synthetic(cfg, path: Path) -> None:
    """A bf16 file of ``cfg`` with seeded random weights (std 1/sqrt(fan-in); norms near 1)."""
    from safetensors.torch import save_file

    from krea2kit.models.dit import build_meta

    g = torch.Generator().manual_seed(0)
    state = {}
    for name, t in build_meta(cfg).state_dict().items():
        if name.endswith(".scale"):
            value = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif t.ndim == 1 or name.endswith("mod.lin"):
            value = 0.1 * torch.randn(t.shape, generator=g)
        else:
            value = torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5
        state[name] = value.to(torch.bfloat16)
    save_file(state, str(path))
    del state


class Device:
    def __init__(self, name: str):
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.dev) if self.cuda else None

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.dev) if self.cuda else None


def turbo_sigmas(steps: int) -> list[float]:
    import math

    ts = torch.linspace(1, 0, steps + 1)
    return (math.exp(TURBO_MU) / (math.exp(TURBO_MU) + (1.0 / ts - 1.0))).tolist()


def time_steps(model, d: Device, side: int, steps: int, mode: str) -> dict:
    """Seconds per denoiser call and peak memory over ``steps`` Euler steps (after a warm-up)."""
    from krea2kit.denoiser import Krea2Denoiser
    from krea2kit.models.quant.linear import describe_paths, quant_compute

    cfg = model.config
    g = torch.Generator(device=d.dev).manual_seed(0)
    txt = torch.randn(1, TEXT, cfg.txtlayers, cfg.txtdim, generator=g, device=d.dev, dtype=torch.bfloat16)
    mask = torch.zeros(1, TEXT, dtype=torch.bool, device=d.dev)
    mask[:, :PROMPT] = True
    lat = side // 8
    x = torch.randn(1, cfg.channels, lat, lat, generator=g, device=d.dev, dtype=torch.bfloat16)
    sigmas = turbo_sigmas(steps)
    with torch.inference_mode(), quant_compute(mode) as used:
        den = Krea2Denoiser(model, txt, mask, guidance=0.0, latent_hw=(lat, lat), layout="official")
        den(x, sigmas[0])  # warm-up: kernels, cuBLAS handles, the allocator's pool
        d.sync()
        if d.cuda:
            torch.cuda.reset_peak_memory_stats(d.dev)
        t0 = time.perf_counter()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * den(x, s)
        d.sync()
        seconds = (time.perf_counter() - t0) / steps
    out = {"step_s": round(seconds, 4), "peak_gib": None if d.peak() is None else round(d.peak() / GIB, 3),
           "paths": describe_paths(used) or "bf16", "finite": bool(torch.isfinite(x).all())}
    del den, x, txt
    return out


def estimate_bytes(cfg, side: int, weights_dtype: str, *, cuda: bool, resident_blocks: int | None = None) -> int:
    """The preflight's transformer terms for this run (krea2kit.memory): weights, activations,
    one dequantized layer for quantized weights, the text input held for the run."""
    from krea2kit import memory

    tokens = (side // 8 // cfg.patch) ** 2
    total = memory.dit_weight_bytes(cfg, 2, weights_dtype, resident_blocks=resident_blocks)
    total += memory.dit_activation_bytes(cfg, batch=1, text_tokens=TEXT, image_tokens=tokens, dtype_bytes=2,
                                         cuda=cuda, pad_to=256)
    if weights_dtype != "auto":
        total += memory.largest_linear_bytes(cfg, 2)
    return total + TEXT * cfg.txtlayers * cfg.txtdim * 2


def ratio(a, b):
    return None if a is None or b in (None, 0) else round(a / b, 3)


def transformer_section(args, d: Device, path: Path, cfg) -> dict:
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.quant.onload import load_dit_quantizing

    modes = ["auto", "dequantize"] if d.cuda else ["scaled-mm", "dequantize"]  # CPU: force, to run the code
    rows: dict = {}
    for wd in ("bf16", "fp8", "int8"):
        d.clean()
        t0 = time.perf_counter()
        if wd == "bf16":
            model = load_dit(path, dtype=torch.bfloat16, device=d.dev, keep_norms_fp32=False)
        else:
            model = load_dit_quantizing(path, wd, dtype=torch.bfloat16, device=d.dev, keep_norms_fp32=False)
        d.sync()
        entry = {"load_s": round(time.perf_counter() - t0, 2),
                 "weights_gib": None if d.allocated() is None else round(d.allocated() / GIB, 3),
                 "storage": getattr(model, "storage_layout", "bf16")}
        est = estimate_bytes(cfg, args.side, "auto" if wd == "bf16" else wd, cuda=d.cuda)
        for mode in (["auto"] if wd == "bf16" else modes):
            run = time_steps(model, d, args.side, args.steps, mode)
            run["estimate_gib"] = round(est / GIB, 3)
            run["estimate_over_measured"] = ratio(est, None if run["peak_gib"] is None else run["peak_gib"] * GIB)
            entry[mode] = run
        rows[wd] = entry
        del model
        d.clean()
    base = rows["bf16"]["auto"]
    for wd in ("fp8", "int8"):
        for mode in modes:
            run = rows[wd][mode]
            run["step_over_bf16"] = ratio(run["step_s"], base["step_s"])
            run["peak_over_bf16"] = ratio(run["peak_gib"], base["peak_gib"])
        a, b = rows[wd][modes[0]], rows[wd]["dequantize"]
        rows[wd][f"{modes[0]}_step_over_dequantize"] = ratio(a["step_s"], b["step_s"])
    return rows


def offload_section(args, d: Device, path: Path, cfg, resident: dict | None) -> dict:
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.offload import RESIDENT_BLOCKS, stream_blocks

    d.clean()
    model = load_dit(path, dtype=torch.bfloat16, device="cpu", keep_norms_fp32=False)
    streamer = stream_blocks(model, d.dev)
    run = time_steps(model, d, args.side, args.steps, "auto")
    est = estimate_bytes(cfg, args.side, "auto", cuda=d.cuda, resident_blocks=RESIDENT_BLOCKS)
    run["estimate_gib"] = round(est / GIB, 3)
    run["estimate_over_measured"] = ratio(est, None if run["peak_gib"] is None else run["peak_gib"] * GIB)
    run["peak_resident_blocks"] = streamer.peak_resident
    if resident:
        run["step_over_resident"] = ratio(run["step_s"], resident["step_s"])
        run["peak_over_resident"] = ratio(run["peak_gib"], resident["peak_gib"])
    streamer.remove()
    del model, streamer
    d.clean()
    return run


def vae_section(args, d: Device) -> dict:
    from krea2kit.models.vae_qwen import QwenImageVAE

    d.clean()
    torch.manual_seed(0)
    vae = QwenImageVAE().to(d.dev, torch.bfloat16).eval()
    z = torch.randn(1, vae.config.z_dim, args.vae_side // 8, args.vae_side // 8, device=d.dev, dtype=torch.bfloat16)
    out = {}
    for name, exact in (("fold", False), ("exact", True)):
        vae.exact_decode = exact
        with torch.inference_mode():
            vae.decode_raw(z, tile=None)  # warm-up
            d.sync()
            if d.cuda:
                torch.cuda.reset_peak_memory_stats(d.dev)
            t0 = time.perf_counter()
            for _ in range(args.vae_runs):
                vae.decode_raw(z, tile=None)
            d.sync()
        out[name] = {"decode_s": round((time.perf_counter() - t0) / args.vae_runs, 4),
                     "peak_gib": None if d.peak() is None else round(d.peak() / GIB, 3)}
    out["exact_over_fold_time"] = ratio(out["exact"]["decode_s"], out["fold"]["decode_s"])
    out["exact_over_fold_peak"] = ratio(out["exact"]["peak_gib"], out["fold"]["peak_gib"])
    del vae, z
    d.clean()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="mid", help="mid (1.3B), smoke, or a bench/dit_sizes.py / preset name")
    ap.add_argument("--side", type=int, default=1024, help="image side in pixels for the transformer steps")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--vae-side", type=int, default=1024)
    ap.add_argument("--vae-runs", type=int, default=2)
    ap.add_argument("--budget", type=float, default=420.0, help="start no section after this many seconds")
    ap.add_argument("--only", nargs="+", choices=["transformer", "offload", "vae"])
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_all: no CUDA device; nothing measured (CPU smoke run: --device cpu --size smoke "
              "--side 64 --steps 2 --vae-side 64)", file=sys.stderr)
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    try:
        import comfy_kitchen  # noqa: F401
    except ImportError:
        print("gpu_all: needs the quant extra: pip install 'krea2kit[quant]'", file=sys.stderr)
        return 2
    d = Device(args.device)
    start = time.perf_counter()
    sections = args.only or ["transformer", "offload", "vae"]
    cfg = mid_config(args.size)
    head = {"device": torch.cuda.get_device_name(d.dev) if d.cuda else "cpu", "torch": torch.__version__,
            "capability": list(torch.cuda.get_device_capability(d.dev)) if d.cuda else None,
            "size": args.size, "params_b": round(cfg.num_params() / 1e9, 3), "side": args.side, "steps": args.steps}
    print(json.dumps({"run": head}), flush=True)
    result: dict = {"run": head}
    with tempfile.TemporaryDirectory(prefix="krea2kit-gpu-all-") as tmp:
        path = Path(tmp) / "synthetic-bf16.safetensors"
        if {"transformer", "offload"} & set(sections):
            t0 = time.perf_counter()
            write_synthetic(cfg, path)
            head["write_s"] = round(time.perf_counter() - t0, 1)
        for name in sections:
            if time.perf_counter() - start > args.budget:
                result[name] = {"skipped": f"over the {args.budget:.0f} s budget"}
            elif name == "transformer":
                result[name] = transformer_section(args, d, path, cfg)
            elif name == "offload":
                resident = result.get("transformer", {}).get("bf16", {}).get("auto")
                result[name] = offload_section(args, d, path, cfg, resident)
            else:
                result[name] = vae_section(args, d)
            print(json.dumps({name: result[name]}), flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
