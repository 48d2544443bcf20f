"""Benchmark: krea2kit's FLUX.2 VAE decode vs diffusers 0.42.1 ``AutoencoderKLFlux2`` on CPU.

Full-size official config (84 M parameters) with random weights shared by both models.

* Time: both models run in this process on the same weights and latents, interleaved
  (ours, diffusers, diffusers, ours, ...), then once more each in the memory
  subprocesses (diffusers first), so that load from other processes on a shared machine
  hits both alike. The median wall time and the median CPU time (``process_time``,
  all threads) are reported with their ratio (diffusers / ours: > 1 means ours is
  faster). On an oversubscribed machine the CPU-time ratio is the steadier figure.
* Peak memory: one fresh subprocess per model and size decodes once; the peak resident
  set above the resident set just before the decode is reported (VmHWM after resetting
  it through /proc/self/clear_refs, so loading the weights does not mask it).

Usage: ``python bench/bench_vae_flux2.py [--sizes 512,1024] [--repeats 1] [--threads N]``
(the default, 512^2, is four 512^2 decodes: about 2-3 minutes on 2 idle cores, up to
~6 on a busy shared machine; 1024^2 costs four times as much per decode).

Token layout: none (no text tokens run here), so ``model.layout`` (official/compact) does not apply.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SEED = 0
LATENT_CHANNELS = 32
FACTOR = 8


def build(which: str):
    """The full-size model with deterministic random weights (same for both variants)."""
    from krea2kit.models.vae_flux2 import Flux2VAE, Flux2VAEConfig

    # Built on meta and filled directly: skips two default initialisations of 84 M weights.
    with torch.device("meta"):
        ours = Flux2VAE(Flux2VAEConfig.preset("flux2"))
    ours = ours.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        ours.bn.running_mean.copy_(0.3 * torch.randn(ours.bn.running_mean.shape, generator=g))
        ours.bn.running_var.copy_(0.5 + torch.rand(ours.bn.running_var.shape, generator=g))
    if which == "ours":
        return ours
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
    # The same tensors, shared (assign=True): no second copy of the weights.
    state = dict(ours.state_dict(), **{"bn.num_batches_tracked": torch.tensor(0)})
    ref.load_state_dict(state, strict=True, assign=True)
    return ref.eval()


def latents(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + size)
    return torch.randn(1, LATENT_CHANNELS, size // FACTOR, size // FACTOR, generator=g)


def runner(which: str, model):
    """A no-argument decode of raw latents (the VAE itself, no BN de-normalisation)."""
    if which == "ours":
        return lambda z: model.decode_raw(z)
    return lambda z: model.decode(z).sample


# ---------------------------------------------------------------------------
# Peak memory: one subprocess per (model, size)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(which: str, size: int) -> None:
    torch.set_grad_enabled(False)
    model = build(which)
    run = runner(which, model)
    z = latents(size)
    run(latents(64))  # warm up kernels at a small size
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _rss_kib("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    out = run(z)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = _rss_kib("VmHWM") if reset else 0
    print(json.dumps({"which": which, "size": size, "peak_delta_mib": (peak - before) / 1024 if reset else None,
                      "wall_s": wall, "cpu_s": cpu, "shape": list(out.shape)}))


def measure_memory(which: str, size: int, threads: int | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--size", str(size)]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {which} {size} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Time: both models in this process, interleaved


def measure_time(sizes: list[int], repeats: int) -> dict:
    torch.set_grad_enabled(False)
    models = {w: build(w) for w in ("ours", "diffusers")}
    runs = {w: runner(w, m) for w, m in models.items()}
    for r in runs.values():
        r(latents(64))  # warm-up
    results = {}
    for size in sizes:
        z = latents(size)
        wall = {w: [] for w in runs}
        cpu = {w: [] for w in runs}
        outs = {}
        for i in range(repeats):
            order = ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")
            for w in order:
                t0, c0 = time.perf_counter(), time.process_time()
                outs[w] = runs[w](z)
                wall[w].append(time.perf_counter() - t0)
                cpu[w].append(time.process_time() - c0)
        err = (outs["ours"] - outs["diffusers"]).abs().max().item()
        scale = outs["diffusers"].abs().max().item()
        results[size] = {"wall": wall, "cpu": cpu, "max_abs_diff": err, "out_max": scale}
        del outs
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512", help="comma-separated square image sizes (multiples of 16)")
    ap.add_argument("--repeats", type=int, default=1, help="in-process decodes per model and size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model memory subprocesses")
    ap.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.size)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    t_start = time.perf_counter()
    print(f"FLUX.2 VAE decode, full-size config, random weights, fp32, CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    timing = measure_time(sizes, args.repeats)
    for size in sizes:
        r = timing[size]
        if not args.no_memory:
            # Fresh processes, diffusers first (the in-process runs started with ours); their
            # decode times are extra samples.
            mem = {w: measure_memory(w, size, args.threads) for w in ("diffusers", "ours")}
            for w in mem:
                r["wall"][w].append(mem[w]["wall_s"])
                r["cpu"][w].append(mem[w]["cpu_s"])
        wo, wd = statistics.median(r["wall"]["ours"]), statistics.median(r["wall"]["diffusers"])
        co, cd = statistics.median(r["cpu"]["ours"]), statistics.median(r["cpu"]["diffusers"])
        fmt = lambda ts: "[" + ", ".join(f"{t:.1f}" for t in ts) + "]"  # noqa: E731
        print(f"{size}x{size}: wall median ours {wo:.1f}s  diffusers {wd:.1f}s  ratio diffusers/ours {wd / wo:.2f}x"
              f"  (samples ours {fmt(r['wall']['ours'])}, diffusers {fmt(r['wall']['diffusers'])})")
        print(f"{size}x{size}: cpu  median ours {co:.1f}s  diffusers {cd:.1f}s  ratio diffusers/ours {cd / co:.2f}x"
              f"  (samples ours {fmt(r['cpu']['ours'])}, diffusers {fmt(r['cpu']['diffusers'])})")
        print(f"{size}x{size}: max |ours - diffusers| = {r['max_abs_diff']:.2e} (output max {r['out_max']:.2f})")
        if not args.no_memory:
            mo, md = mem["ours"]["peak_delta_mib"], mem["diffusers"]["peak_delta_mib"]
            if mo is None or md is None:
                print(f"{size}x{size}: peak memory unavailable (no /proc/self/clear_refs)")
            else:
                print(f"{size}x{size}: peak RSS above the loaded model: ours {mo:.0f} MiB  diffusers {md:.0f} MiB  "
                      f"ratio diffusers/ours {md / mo:.2f}x")
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
