"""Quickstart speed of the embedded nano model: cold start, warm per-image time, stages.

    python bench/bench_nano.py [--cold-runs 3] [--warm-images 16] [--preset krea2-nano-turbo]

Prints, on this machine's CPU:
* cold: wall time of a new ``krea2kit run`` process that imports, loads the nano parts, renders
  one image at the preset's size (128x128 for the nano), filters and writes it (``-q``, PNG to a temp dir), best and median of N runs;
  and the same process's ``python -c "import torch"`` floor, which no CLI can beat;
* warm: per-image time inside one :class:`krea2kit.api.Session` after a warm-up image, with the
  per-stage breakdown the pipeline records (text encode share, denoise, decode, filter, write);
* peer: the bare compute of the same image in the same process (text encoder, 8 transformer
  calls through the same denoiser, VAE decode; no filters, no writer, no bookkeeping), and the
  ratio pipeline / bare, which is the price of everything the pipeline adds;
* peak RSS of the benchmark process.

Token layout: the preset's own (``compact`` for both nano presets, as ``krea2kit run`` uses it);
the bare peer runs the same layout.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle above a blue square on a white background"


def cold(runs: int, preset: str) -> tuple[list[float], list[float]]:
    env = {**os.environ, "NO_COLOR": "1"}
    cli, floor = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            cmd = [sys.executable, "-m", "krea2kit", "-q", "run", "--prompt", PROMPT,
                   "--set", f'model.preset="{preset}"', "--set", f'output.dir="{tmp}"', "--set", f"seed={i}"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            cli.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True, env=env)
            floor.append(time.perf_counter() - t0)
    return cli, floor


def recipe(preset: str, *, count: int = 1, seed: int = 0, out_dir: str = "krea2kit-out") -> str:
    return (f'schema = "krea2kit.recipe/1"\nprompt = "{PROMPT}"\nseed = {seed}\ncount = {count}\n'
            f'[model]\npreset = "{preset}"\n[output]\ndir = "{out_dir}"\n')


def warm(images: int, preset: str) -> tuple[float, dict[str, float], float]:
    from krea2kit.api import Session

    session = Session()
    with tempfile.TemporaryDirectory() as tmp:
        list(session.run(session.plan(text=recipe(preset, seed=10_000, out_dir=tmp))))  # loads the parts
        t0 = time.perf_counter()
        records = list(session.run(session.plan(text=recipe(preset, count=images, out_dir=tmp))))
        per_image = (time.perf_counter() - t0) / images
    stages: dict[str, float] = {}
    for rec in records:
        for k, v in rec.timings.items():
            stages[k] = stages.get(k, 0.0) + v / len(records)
    return per_image, stages, bare(session, preset, images)


def bare(session, preset: str, images: int) -> float:
    """The same image's compute without the pipeline around it (parts from ``session``):
    text encoder, the sampler on the same denoiser, VAE decode."""
    import torch

    from krea2kit import sampling

    plan = session.plan(text=recipe(preset))
    load = dict(device="cpu", dtype="float32", events=lambda *a, **k: None)
    te, dit, vae = (session.pipeline.part(plan, role, **load) for role in ("text_encoder", "dit", "vae"))
    sigmas = sampling.flow_sigmas(plan.steps, plan.mu)
    plan_h, plan_w = plan.jobs[0].height, plan.jobs[0].width  # the preset's size (128x128 for the nano)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(images):
            cond = te.encode([PROMPT])
            f = vae.contract.factor  # the layout arrived at load, through the context
            denoise = dit.make_denoiser(cond, None, guidance=0.0, latent_size=(plan_h // f, plan_w // f))
            x = sampling.initial_noise(i, plan_h, plan_w, channels=vae.contract.channels, factor=f, device="cpu",
                                       dtype=torch.float32)
            vae.decode(sampling.euler(denoise, x, sigmas))
    return (time.perf_counter() - t0) / images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--warm-images", type=int, default=16)
    ap.add_argument("--preset", default="krea2-nano-turbo")
    args = ap.parse_args()

    cli, floor = cold(args.cold_runs, args.preset)
    print(f"cold `krea2kit run` (1 image, {args.preset}): best {min(cli):.2f} s, median {statistics.median(cli):.2f} s "
          f"over {len(cli)} runs; `import torch` alone: median {statistics.median(floor):.2f} s")
    per_image, stages, bare_s = warm(args.warm_images, args.preset)
    print(f"warm per image ({args.warm_images} images, one Session): {per_image * 1000:.0f} ms")
    print("  stages (mean ms): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in stages.items()))
    print(f"  bare compute (encode + denoise + decode, same process): {bare_s * 1000:.0f} ms; "
          f"pipeline / bare = {per_image / bare_s:.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
