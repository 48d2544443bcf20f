"""CPU benchmark: krea2kit's Krea 2 transformer vs diffusers' Krea2Transformer2DModel.

Same random weights (diffusers' parameters are views of ours), mid-size config
(``bench-1024`` in bench/dit_sizes.py: width 1024, 4 blocks, 8 heads / 2 KV heads, head dim 128),
1024 image tokens (32 x 32 patches = a 512^2 image) and a 40-token prompt, fp32.

krea2kit runs in either token layout (recipe ``model.layout``): ``official``, the Krea 2
presets' default, keeps the 512 text positions (padding masked) and pads the sequence to a multiple of 256
as the reference forward does; ``compact`` drops the padding (45 text tokens).

  A  same input to both: 40 + 5 valid text tokens, no padding (kernel-for-kernel; krea2kit
     without sequence padding, i.e. compact).
  B  what each pipeline feeds: the official/diffusers encoder output, 512 text positions of which
     45 are valid. diffusers runs all 512 with a mask; krea2kit is timed in both layouts.
  C  one CFG step (g > 0) with B-style text: diffusers' pipeline runs two passes; Krea2Denoiser
     (both layouts) runs cond + uncond as one batch with cached text features and RoPE.

Time: best of a few alternating runs in this process (the machine is shared: the minimum is the
least disturbed measurement). Memory: each variant in a fresh
subprocess (glibc told to serve large blocks by mmap, so freed memory leaves RSS at once), peak
RSS during one forward minus RSS before it (activations; the weights are equal).
Then K/V head repetition vs enable_gqa at the attention call, and a per-op profile of both models
(self CPU time, which a busy shared machine disturbs less than wall time).

    python bench/bench_dit.py
    BENCH_DIT_SIZE=smoke python bench/bench_dit.py    # the same cases on a tiny model, seconds
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
SIZE = os.environ.get("BENCH_DIT_SIZE", "bench-1024")  # "smoke": a seconds-long check of the script
torch.set_num_threads(THREADS)

GRID = (32, 32)
PROMPT = 40
SUFFIX = 5
PADDED = 512


def build(seed: int = 0):
    from diffusers import Krea2Transformer2DModel

    from dit_sizes import dit_size

    from krea2kit.models.dit import SingleStreamDiT
    from krea2kit.models.dit_loader import native_to_diffusers

    cfg = dit_size(SIZE)
    ours = SingleStreamDiT(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            scale = 0.3 if (p.ndim == 1 or name.endswith("modulation.lin")) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    with torch.device("meta"):
        ref = Krea2Transformer2DModel(**cfg.to_diffusers())
    sd = {native_to_diffusers(k): (v.view(6, -1) if k.endswith("mod.lin") else v) for k, v in ours.state_dict().items()}
    ref.load_state_dict(sd, assign=True, strict=True)
    ref.eval().requires_grad_(False)
    return cfg, ours, ref


def inputs(cfg, padded: bool, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    L = PADDED if padded else PROMPT + SUFFIX
    txt = torch.randn(batch, L, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, :PROMPT] = True
    mask[:, L - SUFFIX:] = True
    lat = torch.randn(batch, cfg.channels, GRID[0] * 2, GRID[1] * 2, generator=g)
    return txt, (mask if padded else None), lat


def run_ours(model, txt, mask, lat, t=0.7, layout="compact"):
    from krea2kit.denoiser import OFFICIAL_PAD_TO
    from krea2kit.models.dit import patchify

    tt = torch.full((lat.shape[0],), t)
    if layout == "official":  # keep the masked text padding, pad the sequence like the reference
        feats = model.encode_text(txt, mask, drop_padding=False)
        return model(patchify(lat), tt, txt_features=feats, grid_hw=GRID, pad_to=OFFICIAL_PAD_TO)
    return model(patchify(lat), tt, txt, mask, GRID)


def run_ref(ref, txt, mask, lat, t=0.7):
    from krea2kit.models.dit import image_positions, patchify

    pos = torch.cat([torch.zeros(txt.shape[1], 3), image_positions(GRID).float()])
    return ref(patchify(lat), txt, torch.full((lat.shape[0],), t), pos, mask).sample


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(variant: str) -> None:
    """One variant in a fresh process: peak RSS added by one forward."""
    cfg, ours, ref = build()
    padded = "B" in variant
    txt, mask, lat = inputs(cfg, padded)
    fn = {"oursA": lambda: run_ours(ours, txt, mask, lat), "refA": lambda: run_ref(ref, txt, mask, lat),
          "oursB-official": lambda: run_ours(ours, txt, mask, lat, layout="official"),
          "oursB-compact": lambda: run_ours(ours, txt, mask, lat, layout="compact"),
          "refB": lambda: run_ref(ref, txt, mask, lat)}[variant]
    with torch.no_grad():
        # No warm-up: freed activations stay in the allocator's pools, so a second forward would
        # show almost no growth. The first forward's growth is its activation peak (plus small
        # one-time kernel set-up, alike for both).
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the high-water mark to the current RSS (Linux >= 4.0)
        before = rss_mib()
        fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"before": before, "hwm": hwm, "maxrss": peak}))


def memory(variant: str) -> float:
    # Large blocks straight from mmap and one malloc arena: freed activations go back to the OS
    # at once, so the RSS high-water mark is the live-tensor peak, not allocator caching.
    env = dict(os.environ, BENCH_THREADS=str(THREADS), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    out = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["hwm"] - data["before"]


def main() -> None:
    from krea2kit.denoiser import Krea2Denoiser

    cfg, ours, ref = build()
    print(f"config {SIZE}: {cfg.num_params() / 1e6:.1f}M params, {GRID[0] * GRID[1]} image tokens, "
          f"{PROMPT}-token prompt (+{SUFFIX} suffix), fp32, {THREADS} threads, torch {torch.__version__}")
    with torch.no_grad():
        # A: one input, no padding, so the layouts coincide; B: the padded encoder output, both layouts.
        for case, padded, layouts, reps in (("A", False, ("compact",), 8), ("B", True, ("official", "compact"), 2)):
            txt, mask, lat = inputs(cfg, padded)
            b = run_ref(ref, txt, mask, lat)
            errs = {lay: (run_ours(ours, txt, mask, lat, layout=lay) - b).abs().max().item() for lay in layouts}
            times: dict[str, list[float]] = {lay: [] for lay in (*layouts, "diffusers")}
            for _ in range(reps):  # alternate so background load hits all alike
                for lay in layouts:
                    times[lay] += timed(lambda: run_ours(ours, txt, mask, lat, layout=lay), 1)
                times["diffusers"] += timed(lambda: run_ref(ref, txt, mask, lat), 1)
            tr = min(times["diffusers"])
            for lay in layouts:
                to = min(times[lay])
                print(f"[{case}] ours ({lay}) {to:.3f} s  diffusers {tr:.3f} s  ratio diffusers/ours {tr / to:.2f}x  "
                      f"max|diff| {errs[lay]:.1e}")

        # C: one CFG step
        txt, mask, lat = inputs(cfg, True)
        untxt = torch.randn(1, PADDED, cfg.txtlayers, cfg.txtdim)
        unmask = torch.zeros(1, PADDED, dtype=torch.bool)
        unmask[:, PADDED - SUFFIX:] = True
        dens = {lay: Krea2Denoiser(ours, txt, mask, uncond_txt=untxt, uncond_mask=unmask, guidance=3.5,
                                   latent_hw=lat.shape[2:], layout=lay) for lay in ("official", "compact")}

        def ref_step():
            c = run_ref(ref, txt, mask, lat)
            u = run_ref(ref, untxt, unmask, lat)
            return c + 3.5 * (c - u)

        for den in dens.values():
            den(lat, 0.7)  # warm (RoPE tables, batched text features)
        times = {name: [] for name in (*dens, "diffusers")}
        for _ in range(2):
            for lay, den in dens.items():
                times[lay] += timed(lambda: den(lat, 0.7), 1)
            times["diffusers"] += timed(ref_step, 1)
        tr = min(times["diffusers"])
        for lay in dens:
            print(f"[C] CFG step: Krea2Denoiser ({lay}) {min(times[lay]):.3f} s  diffusers 2 passes "
                  f"{tr:.3f} s  ratio {tr / min(times[lay]):.2f}x")

        # GQA at the attention call: repeat K/V heads vs enable_gqa (case C shapes: B=2, 8 query /
        # 2 KV heads, 45 + 1024 tokens), with the key-padding mask and without one.
        import torch.nn.functional as F

        n = PROMPT + SUFFIX + GRID[0] * GRID[1]
        hd = cfg.head_dim
        q = torch.randn(2, cfg.heads, n, hd)
        k, v = torch.randn(2, cfg.kvheads, n, hd), torch.randn(2, cfg.kvheads, n, hd)
        m = torch.ones(2, 1, 1, n, dtype=torch.bool)
        m[1, ..., PROMPT - 10:PROMPT] = False
        rep = cfg.heads // cfg.kvheads
        for mask in (m, None):
            tr = timed(lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                              v.repeat_interleave(rep, 1), attn_mask=mask), 8)
            tg = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), 8)
            print(f"[GQA] {'with mask' if mask is not None else 'no mask  '}: repeat_interleave {min(tr) * 1e3:6.1f} ms"
                  f"   enable_gqa {min(tg) * 1e3:6.1f} ms")

        # Where the time goes: self CPU time per op, ours vs diffusers (best of 2 profiled
        # forwards each, case A). Less sensitive to a busy machine than wall time.
        from torch.profiler import ProfilerActivity, profile

        txt, mask, lat = inputs(cfg, False)
        prof_runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for _ in range(2):
            for name, fn in (("ours", lambda: run_ours(ours, txt, mask, lat)),
                             ("diffusers", lambda: run_ref(ref, txt, mask, lat))):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                prof_runs[name].append({e.key: e.self_cpu_time_total for e in prof.key_averages()})

        def best(name: str, key: str) -> float:
            return min(r.get(key, 0.0) for r in prof_runs[name]) / 1e3

        def total(name: str) -> float:
            return min(sum(r.values()) for r in prof_runs[name]) / 1e3

        keys = set().union(*prof_runs["ours"], *prof_runs["diffusers"])
        top = sorted(keys, key=lambda k: -max(best("ours", k), best("diffusers", k)))[:10]
        print(f"[profile] case A, self CPU ms per op (ours total {total('ours'):.0f} ms, "
              f"diffusers total {total('diffusers'):.0f} ms, ratio {total('diffusers') / total('ours'):.2f}x):")
        for k in top:
            print(f"    {k[:44]:44s} ours {best('ours', k):8.1f}   diffusers {best('diffusers', k):8.1f}")

    print("[memory] extra peak RSS during one forward (fresh process each):")
    for case, ours_variants in (("A", ("oursA",)), ("B", ("oursB-official", "oursB-compact"))):
        mr = memory("ref" + case)
        for variant in ours_variants:
            layout = variant.partition("-")[2] or "compact"
            print(f"    [{case}] ours ({layout}) {memory(variant):7.1f} MiB   diffusers {mr:7.1f} MiB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
