"""GPU benchmark: the full 12.8B Krea 2 transformer, Turbo-style sampling, krea2kit vs diffusers.

Random weights in the official config (bf16 matmuls, fp32 RMSNorm scales), built once on the GPU;
diffusers' ``Krea2Transformer2DModel`` is given views of the same tensors (no second copy). For each
size (default 1024^2 and 2048^2), 8 Euler steps at the Turbo schedule (mu = 1.15, guidance 0), with
the text as the official encoder hands it over (512 positions, a 40-token prompt + 5 suffix tokens):

  krea2kit official  Krea2Denoiser(layout="official"), the Krea 2 presets' layout: 512 text positions
                     (padding masked), sequence padded to a multiple of 256 like the reference
  krea2kit compact   Krea2Denoiser(layout="compact"): padding dropped (45 text tokens)
                     (both: text features and RoPE once per run)
  diffusers          Krea2Transformer2DModel.forward as its pipeline calls it (512 text tokens + mask)

Prints seconds per 8-step image, the ratio, peak GPU memory above the weights, achieved TFLOP/s
(dense matmul FLOPs of the tokens each one runs) and the max difference of the final latents.
Skips cleanly (exit 0) without CUDA. A CPU smoke run: ``--device cpu --preset smoke --sizes 64``
(sizes: the package's presets and bench/dit_sizes.py).

    python bench/gpu_dit.py [--sizes 1024 2048] [--steps 8] [--guidance 0] [--no-diffusers]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

PROMPT, SUFFIX, PADDED = 40, 5, 512
TURBO_MU = 1.15  # official README: Turbo runs at a fixed mu = 1.15


def turbo_sigmas(steps: int, mu: float = TURBO_MU) -> list[float]:
    """Official sampling.timesteps with a fixed mu: linspace(1, 0) time-shifted by e^mu."""
    ts = torch.linspace(1, 0, steps + 1)
    return (math.exp(mu) / (math.exp(mu) + (1.0 / ts - 1.0))).tolist()


def random_model(preset: str, device: str):
    from dit_sizes import dit_size

    from krea2kit.models.dit import build_meta

    model = build_meta(dit_size(preset)).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):  # RMSNorm scales stay fp32 (like load_dit with dtype=bf16)
                p.data = (torch.randn(p.shape, generator=g, device=device) * 0.1).float()
            else:
                std = 0.1 if p.ndim == 1 or name.endswith("modulation.lin") else p.shape[-1] ** -0.5
                p.data = (torch.randn(p.shape, generator=g, device=device) * std).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def diffusers_twin(model):
    from diffusers import Krea2Transformer2DModel

    from krea2kit.models.dit_loader import native_to_diffusers

    with torch.device("meta"):
        ref = Krea2Transformer2DModel(**model.config.to_diffusers())
    sd = {native_to_diffusers(k): (v.view(6, -1) if k.endswith("mod.lin") else v) for k, v in model.state_dict().items()}
    ref.load_state_dict(sd, assign=True, strict=True)
    return ref.eval().requires_grad_(False)


def matmul_tflop(cfg, tokens: int, txt: int, steps: int) -> float:
    """Dense FLOPs of the transformer blocks for one image (2 per MAC; attention included)."""
    f, hd = cfg.features, cfg.head_dim
    per_token = 2 * (3 * f * f + 2 * f * cfg.kvheads * hd + 3 * f * cfg.mlp_dim)
    n = tokens + txt
    attn = 2 * 2 * n * n * f
    return steps * cfg.layers * (per_token * n + attn) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=0.0, help="Krea g (0 = Turbo, no CFG)")
    ap.add_argument("--preset", default="krea2-turbo")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-diffusers", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_dit: CUDA is not available, skipping (use --device cpu --preset smoke for a smoke run)")
        return 0

    from krea2kit.denoiser import OFFICIAL_PAD_TO, Krea2Denoiser
    from krea2kit.models.dit import image_positions, padding_for, patchify, unpatchify

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    model = random_model(args.preset, args.device)
    cfg = model.config
    ref = None if args.no_diffusers else diffusers_twin(model)
    weights = torch.cuda.memory_allocated(dev) if cuda else 0
    print(f"{args.preset}: {cfg.num_params() / 1e9:.2f}B params on {torch.cuda.get_device_name(dev) if cuda else 'cpu'}, "
          f"weights {weights / 2**30:.1f} GiB, {args.steps} steps, guidance {args.guidance}")

    g = torch.Generator(device=dev).manual_seed(0)
    txt = torch.randn(1, PADDED, cfg.txtlayers, cfg.txtdim, generator=g, device=dev, dtype=torch.bfloat16)
    mask = torch.zeros(1, PADDED, dtype=torch.bool, device=dev)
    mask[:, :PROMPT] = True
    mask[:, PADDED - SUFFIX:] = True
    untxt = torch.randn(1, PADDED, cfg.txtlayers, cfg.txtdim, generator=g, device=dev, dtype=torch.bfloat16)
    unmask = torch.zeros(1, PADDED, dtype=torch.bool, device=dev)
    unmask[:, PADDED - SUFFIX:] = True
    sigmas = turbo_sigmas(args.steps)
    cfg_on = args.guidance > 0

    for size in args.sizes:
        lh = lw = size // 8
        gh, gw = lh // cfg.patch, lw // cfg.patch
        noise = torch.randn(1, cfg.channels, lh, lw, generator=g, device=dev, dtype=torch.bfloat16)

        def ours_run(layout):
            den = Krea2Denoiser(model, txt, mask, uncond_txt=untxt if cfg_on else None,
                                uncond_mask=unmask if cfg_on else None, guidance=args.guidance, latent_hw=(lh, lw),
                                layout=layout)
            x = noise.clone()
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                x = x + (s_next - s) * den(x, s)  # official Euler update, in the model dtype
            return x

        def ref_run():
            pos = torch.cat([torch.zeros(PADDED, 3, device=dev), image_positions((gh, gw), dev).float()])
            x = patchify(noise.clone(), cfg.patch)
            with torch.no_grad():
                for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                    t = torch.full((1,), s, device=dev, dtype=torch.bfloat16)
                    v = ref(x, txt, t, pos, mask).sample
                    if cfg_on:
                        u = ref(x, untxt, t, pos, unmask).sample
                        v = v + args.guidance * (v - u)
                    x = x + (s_next - s) * v
            return unpatchify(x, (gh, gw), cfg.patch)

        row = {}
        outs = {}
        runs = (("official", lambda: ours_run("official")), ("compact", lambda: ours_run("compact")),
                ("diffusers", ref_run))
        for name, fn in runs:
            if name == "diffusers" and ref is None:
                continue
            fn()  # warm-up (kernels, allocator)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            outs[name] = fn()
            sync()
            row[name] = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated(dev) - weights) / 2**30 if cuda else float("nan")
            txt_tokens = PROMPT + SUFFIX if name == "compact" else PADDED
            if name == "official":
                txt_tokens += padding_for(PADDED + gh * gw, OFFICIAL_PAD_TO)
            tflop = matmul_tflop(cfg, gh * gw, txt_tokens, args.steps) * (2 if cfg_on else 1)
            label = name if name == "diffusers" else f"krea2kit {name}"
            print(f"  {size}^2 {label:17s} {row[name]:7.2f} s/image  peak activations {peak:6.2f} GiB  "
                  f"{tflop / row[name]:7.1f} TFLOP/s ({tflop:.0f} TFLOP)")
        if "diffusers" in row:
            for layout in ("official", "compact"):
                diff = (outs[layout].float() - outs["diffusers"].float()).abs().max().item()
                print(f"  {size}^2 ratio diffusers/krea2kit {layout} {row['diffusers'] / row[layout]:.2f}x, "
                      f"max |latent diff| {diff:.3g} (bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
