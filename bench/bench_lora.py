"""Benchmark: runtime LoRA adapters vs merged weights on a mid-size Krea 2 transformer.

Config ``bench-1024`` (``bench/dit_sizes.py``: width 1024, 4 blocks, 8 heads / 2 KV heads, text
width 1024): it has 4 x 8 + 33 + 7 = 72 Linears (the full model has 264). A rank-32 LoRA on every
one of them.

Layout: the compact one (``--text`` valid text tokens, no padding, no sequence padding). The
official layout (the Krea 2 default) adds masked text padding and pads the sequence to a
multiple of 256: every Linear sees more rows, adapter and weight matmuls alike, so the
runtime/merged ratio should be similar (not measured here).

Reports, in one process on the same weights and inputs:
* forward time without adapters, with runtime adapters (hooks, low-rank factors), and with the
  LoRA merged into the weights; the runtime / merged ratio is the per-forward overhead;
* time to merge and to restore (bit-exact, originals kept on the CPU);
* extra memory: adapter factors, the merge backup, and the process peak RSS.

Run: ``python bench/bench_lora.py [--tokens 1024] [--repeats 5] [--device cpu|cuda] [--dtype float32|bfloat16]``
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    from krea2kit.lora.formats import native_to_diffusers, parse_lora_state_dict
    from krea2kit.lora.apply import attach_adapters, merge_into
    from dit_sizes import dit_size

    from krea2kit.models.dit import SingleStreamDiT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="image tokens (a square grid)")
    ap.add_argument("--text", type=int, default=64, help="text tokens")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dev = args.device

    torch.manual_seed(0)
    cfg = dit_size("bench-1024")
    dit = SingleStreamDiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1)
    dit = dit.to(dev, dtype).eval().requires_grad_(False)
    lin = {n: m for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}

    # A diffusers-layout rank-32 LoRA on every Linear (the official style LoRAs' layout).
    sd = {}
    for n, m in lin.items():
        o, i = m.weight.shape
        r = min(args.rank, o, i)
        d = native_to_diffusers(n)
        sd[f"transformer.{d}.lora_A.weight"] = torch.randn(r, i) * i ** -0.5
        sd[f"transformer.{d}.lora_B.weight"] = torch.randn(o, r) * 0.01
    lora = parse_lora_state_dict(sd, name="bench")
    lora_bytes = sum(d.numel() for d in lora.deltas.values()) * 4

    side = int(args.tokens ** 0.5)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, side * side, cfg.in_features, generator=g).to(dev, dtype)
    txt = torch.randn(1, args.text, cfg.txtlayers, cfg.txtdim, generator=g).to(dev, dtype)
    with torch.no_grad():
        feats = dit.encode_text(txt)
        rope = dit.rope_table(feats.length, side, side, dev)
    t = torch.tensor([0.5], device=dev)

    def fwd(model):
        def call():
            with torch.no_grad():
                return model(img, t, txt_features=feats, rope=rope)
        return call

    import copy

    # Three copies of the same weights: plain, runtime adapters, merged. The variants are
    # timed in interleaved rounds (min over rounds) so a busy shared CPU hits them alike.
    rt_model, mg_model = copy.deepcopy(dit), copy.deepcopy(dit)
    h = attach_adapters(rt_model, [(lora, 1.0)])
    t0 = time.perf_counter()
    merged = merge_into(mg_model, lora, 1.0, backup="cpu")
    _sync(dev)
    merge_t = time.perf_counter() - t0
    backup_bytes = sum(v.numel() * v.element_size() for v in merged._saved.values())

    print(f"config bench-1024: width {cfg.features}, {cfg.layers} blocks, {len(lin)} Linears adapted "
          f"(full Krea 2: 264), rank {args.rank}; {side * side} image + {args.text} text tokens per forward "
          f"(compact layout; text fusion excluded: once per image); {dev}, {args.dtype}, torch threads {torch.get_num_threads()}")
    variants = {"base": fwd(dit), "runtime": fwd(rt_model), "merged": fwd(mg_model)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in variants.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    base_t, rt_t, mg_t = (min(times[k]) for k in ("base", "runtime", "merged"))
    out_rt, out_mg = variants["runtime"](), variants["merged"]()
    h.detach()
    t0 = time.perf_counter()
    merged.restore()
    _sync(dev)
    restore_t = time.perf_counter() - t0
    exact = all(torch.equal(a, b) for a, b in zip(mg_model.state_dict().values(), dit.state_dict().values()))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"forward, no adapters      : {base_t * 1e3:9.2f} ms")
    print(f"forward, runtime adapters : {rt_t * 1e3:9.2f} ms")
    print(f"forward, merged weights   : {mg_t * 1e3:9.2f} ms")
    print(f"runtime / merged ratio    : {rt_t / mg_t:9.3f}x  (overhead {100 * (rt_t / mg_t - 1):+.1f}% per forward)")
    print(f"merge (72 Linears)        : {merge_t * 1e3:9.2f} ms")
    print(f"restore                   : {restore_t * 1e3:9.2f} ms  (bit-exact: {exact})")
    print(f"runtime vs merged max|diff|: {(out_rt - out_mg).abs().max().item():.2e}")
    print(f"memory: LoRA factors {lora_bytes / 2**20:.1f} MiB, merge backup {backup_bytes / 2**20:.1f} MiB (CPU), "
          f"process peak RSS {peak:.0f} MiB")
    if dev.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
