"""Qwen-Image VAE decode: krea2kit's native 2D network vs diffusers' 3D formulation.

    python bench/bench_vae_qwen.py                   # ~7 min on 2 busy cores
    python bench/bench_vae_qwen.py --sizes 512 1024  # also diffusers at 1024^2 (~6 more minutes)
    python bench/bench_vae_qwen.py --real-tiled      # also a real tiled 2048^2 decode (~15 min on CPU)
    python bench/bench_vae_qwen.py --exact           # only: fold vs exact (layout "official") vs diffusers,
                                                     # 256^2 in fp32 and bf16 (~3 min on 2 busy cores)

Default: 512^2 ours vs diffusers; ours untiled 1024^2 and tiled 768^2 (same per-tile
peak as a tiled 2048^2); the activation-memory model for every size.

Full-size official config, random weights (every tensor, seeded), fp32 on CPU. Both
models load the same safetensors file. Each (variant, size) runs in its own subprocess:
wall time of one decode after a small warm-up, and the peak resident memory of the
decode (the kernel's VmHWM is reset just before it, so loading does not count) next to
the RSS before it.

The activation-memory table runs both models on the meta device under a dispatch mode
that tracks live storages (exact bookkeeping of every tensor the ops allocate, no
compute), so it covers sizes too slow to run here: untiled 1024^2/2048^2 and the tiled
2048^2 decode. Real RSS is higher than that count by allocator slack and weights.

Token layout: none (no text tokens run here), so ``model.layout`` (official/compact) does not apply.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------
# memory helpers

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class LiveStorageTracker:
    """Counts bytes of live tensor storages created by ops (works on the meta device)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self.mode = _Mode()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self._keys.discard(key)
        self.live -= n

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._keys:  # a view or an in-place result
            return
        n = st.nbytes()
        self._keys.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, n)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


# ---------------------------------------------------------------------------
# worker (one variant, one size, in its own process)

def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    h = w = args.size // 8
    z = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(123))
    dtype = getattr(torch, args.dtype)
    z = z.to(dtype)
    if args.variant in ("ours", "exact"):
        from krea2kit.models.vae_qwen import load_qwen_vae

        vae = load_qwen_vae(args.weights, dtype=dtype)
        vae.exact_decode = args.variant == "exact"
        tile = None if args.tile == "none" else int(args.tile) if args.tile.isdigit() else args.tile

        def run(lat):
            return vae.decode_raw(lat, tile=tile)
    else:
        from diffusers import AutoencoderKLQwenImage
        from safetensors.torch import load_file

        with torch.device("meta"):
            ref = AutoencoderKLQwenImage()
        ref.load_state_dict(load_file(args.weights), assign=True)
        ref.eval().to(dtype)

        def run(lat):
            with torch.no_grad():
                return ref.decode(lat[:, :, None]).sample[:, :, 0]

    run(z[:, :, :8, :8])  # warm-up (oneDNN primitives, allocator)
    rss_before = _status_kb("VmRSS") or 0
    reset = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(z)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_kb()
    if args.out:
        torch.save(out.contiguous(), args.out)
    print(json.dumps({"variant": args.variant, "size": args.size, "tile": args.tile, "seconds": dt, "cpu_seconds": cpu,
                      "rss_before_mib": rss_before / 1024, "peak_mib": peak / 1024, "peak_reset": reset}))


def _spawn(variant: str, size: int, weights: Path, out: Path | None, threads: int, tile: str = "none",
           dtype: str = "float32") -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--variant", variant, "--size", str(size), "--weights",
           str(weights), "--threads", str(threads), "--tile", tile, "--dtype", dtype]
    if out is not None:
        cmd += ["--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {variant} {size} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# parent

def _make_weights(path: Path) -> None:
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file

    ref = AutoencoderKLQwenImage()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            else:
                p.copy_(r / (p[0].numel() ** 0.5))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))


def _activation_table() -> list[tuple[str, float]]:
    from diffusers import AutoencoderKLQwenImage

    from krea2kit.models.vae_qwen import QwenImageVAE, QwenVAEConfig

    with torch.device("meta"):
        ours = QwenImageVAE(QwenVAEConfig())
        ref = AutoencoderKLQwenImage()
    rows = []
    cases = [("ours", 512, None), ("diffusers", 512, None), ("ours", 1024, None), ("diffusers", 1024, None),
             ("ours", 2048, None), ("diffusers", 2048, None), ("ours", 768, 512), ("ours", 2048, "auto"),
             ("exact", 1024, None)]
    for variant, size, tile in cases:
        z = torch.zeros(1, 16, size // 8, size // 8, device="meta")
        tr = LiveStorageTracker()
        ours.exact_decode = variant == "exact"  # layout "official": diffusers' 3D arithmetic
        with tr, torch.no_grad():
            if variant in ("ours", "exact"):
                out = ours.decode_raw(z, tile=tile)
            else:
                out = ref.decode(z[:, :, None]).sample
        del out
        label = f"{variant:9s} {size}^2" + (f" tiled ({tile}: 512 px tiles, 128 px overlap)" if tile else " untiled")
        rows.append((label, tr.peak / 2**30))
    return rows


def _exact_bench(args: argparse.Namespace) -> None:
    """The price of layout "official"'s exact decode (diffusers' 3D arithmetic) over the fold."""
    size = args.exact_size
    print(f"torch {torch.__version__}, {args.threads} threads, CPU; full Qwen-Image VAE config, random weights, {size}^2")
    print(f"  {'case':24s} {'wall s':>8s} {'CPU s':>8s}  vs diffusers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "qwen_vae_random.safetensors"
        _make_weights(weights)
        for dtype in ("float32", "bfloat16"):
            runs = {v: _spawn(v, size, weights, tmp / f"{v}_{dtype}.pt", args.threads, dtype=dtype)
                    for v in ("ours", "exact", "diffusers")}
            ref = torch.load(tmp / f"diffusers_{dtype}.pt").float()
            for v, r in runs.items():
                out = torch.load(tmp / f"{v}_{dtype}.pt").float()
                d = (out - ref).abs().max().item()
                print(f"  {v + ' ' + dtype:24s} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f}  "
                      + ("bit-identical" if d == 0 else f"max abs diff {d:.2e}"), flush=True)
            e, o, d = runs["exact"], runs["ours"], runs["diffusers"]
            print(f"  -> {dtype}: exact costs {e['seconds'] / o['seconds']:.2f}x the fold's wall time, "
                  f"{e['cpu_seconds'] / o['cpu_seconds']:.2f}x its CPU time (diffusers: "
                  f"{d['cpu_seconds'] / e['cpu_seconds']:.2f}x the exact path's CPU time)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--real-tiled", action="store_true", help="also run a real tiled 2048^2 decode (slow on CPU)")
    ap.add_argument("--no-tiled-check", action="store_true", help="skip the real untiled-1024^2 / tiled-768^2 runs")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--exact", action="store_true",
                    help="only compare the fold, the exact decode path (layout 'official') and diffusers")
    ap.add_argument("--exact-size", type=int, default=256)
    ap.add_argument("--variant", choices=["ours", "exact", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--tile", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    if args.exact:
        _exact_bench(args)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, CPU; full Qwen-Image VAE config, random weights")
    print("\nActivation peak (meta-device live-storage count, no compute; excludes weights):")
    for label, gib in _activation_table():
        print(f"  {label:60s} {gib:7.3f} GiB")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "qwen_vae_random.safetensors"
        _make_weights(weights)
        print("\nReal decode, one subprocess per run (peak = VmHWM during the decode):")
        print(f"  {'case':28s} {'wall s':>9s} {'CPU s':>8s} {'RSS before':>11s} {'peak RSS':>9s} {'peak-before':>12s}")
        results = {}
        for size in args.sizes:
            for variant in ("ours", "diffusers"):
                r = _spawn(variant, size, weights, tmp / f"{variant}_{size}.pt", args.threads)
                results[(variant, size)] = r
                print(f"  {variant + ' ' + str(size) + '^2':28s} {r['seconds']:9.1f} {r['cpu_seconds']:8.1f} {r['rss_before_mib']:9.0f} M"
                      f" {r['peak_mib']:7.0f} M {r['peak_mib'] - r['rss_before_mib']:10.0f} M", flush=True)
            a = torch.load(tmp / f"ours_{size}.pt")
            b = torch.load(tmp / f"diffusers_{size}.pt")
            o, d = results[("ours", size)], results[("diffusers", size)]
            print(f"  -> {size}^2: ours is {d['seconds'] / o['seconds']:.2f}x faster (wall), "
                  f"{d['cpu_seconds'] / o['cpu_seconds']:.2f}x less CPU time; peak RSS ratio ours/diffusers "
                  f"{o['peak_mib'] / d['peak_mib']:.2f} (decode-only {(o['peak_mib'] - o['rss_before_mib']) / max(1.0, d['peak_mib'] - d['rss_before_mib']):.2f}); "
                  f"max abs diff {(a - b).abs().max().item():.2e}", flush=True)
        # Tiled vs untiled memory, for real. A tiled decode's peak is one tile's pass plus
        # the float32 output accumulator, whatever the image size: the 768^2 run below
        # (2 x 2 tiles of 512 px, 128 px overlap: the auto-tiling setup) has the same
        # per-tile peak as a 2048^2 one (5 x 5 tiles), which costs ~6x a 1024^2 decode of
        # CPU time; --real-tiled runs that one too.
        tiled_cases = [] if args.no_tiled_check else [(1024, "none"), (768, "512")]
        if args.real_tiled:
            tiled_cases.append((2048, "auto"))
        for size, tile in tiled_cases:
            if (size, tile) == (1024, "none") and ("ours", 1024) in results:
                r = results[("ours", 1024)]
            else:
                r = _spawn("ours", size, weights, None, args.threads, tile)
            label = f"ours {size}^2 " + ("untiled" if tile == "none" else f"tiled ({tile})")
            print(f"  {label:28s} {r['seconds']:9.1f} {r['cpu_seconds']:8.1f} {r['rss_before_mib']:9.0f} M"
                  f" {r['peak_mib']:7.0f} M {r['peak_mib'] - r['rss_before_mib']:10.0f} M", flush=True)


if __name__ == "__main__":
    main()
