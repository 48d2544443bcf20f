"""CPU: loading a synthetic full-size (12.8B) Krea 2 transformer, fp8 on load and fp8_scaled.

1. Writes a bf16 file of the ``krea2-turbo`` preset's config (12.82B parameters, 25.6 GB, native
   keys, every tensor bf16), one tensor at a time (values cut from a small seeded random pool:
   loading cost does not depend on them, and generating 12.8B normals would take minutes of a
   shared CPU).
2. In a fresh process: ``load_dit_quantizing(file, "fp8")`` (``model.weights_dtype = "fp8"``),
   then every stored tensor touched once. Reported: seconds, the process's peak RSS (VmHWM)
   and the RSS before the load, the resident model size, and peak / resident, peak / bf16 file.
3. Deletes the bf16 file, writes a full-size ComfyUI ``fp8_scaled`` file of the same config
   (fp8 e4m3 weights + ``weight_scale`` + ``comfy_quant`` for every quantizable Linear, the rest
   bf16; ``model.diffusion_model.`` prefix), and in a fresh process loads it as users load a
   downloaded file (``load_dit``), touching every tensor: seconds and peak RSS / file size.
4. Deletes the files (``--keep`` keeps them).

Refuses to start a load while less than ``--min-available-gb`` (default 16) of memory is
available (the fp8 model alone is 13.1 GB). The loads run on one thread
(``$KREA2KIT_BENCH_THREADS`` to change). Run it niced on a shared machine:

    nice -n 19 python bench/cpu_load_full.py                       # ~25 GB + 13 GB in $TMPDIR
    python bench/cpu_load_full.py --config bench-1024 --min-available-gb 2   # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
PREFIX = "model.diffusion_model."
FP8_JSON = json.dumps({"format": "float8_e4m3fn"}).encode()
POOL = 1 << 24  # elements in the random pool tensors are cut from


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _config(name: str):
    from dit_sizes import dit_size

    return dit_size(name)


def _pool(dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(POOL, generator=g) * 0.02).to(dtype) if dtype != torch.float8_e4m3fn else \
        (torch.randn(POOL, generator=g) * 100).to(dtype)  # spread over the fp8 codes (no NaN: randn is finite)


def _cut(pool, n: int, salt: int):
    """``n`` values from the pool, starting at a position that varies per tensor."""
    import torch

    start = (salt * 7919) % POOL
    reps = -(-(start + n) // POOL)
    return (pool.repeat(reps) if reps > 1 else pool)[start:start + n] if n else torch.empty(0, dtype=pool.dtype)


def _write(path: Path, entries: list[tuple[str, str, tuple, object]]) -> int:
    """Stream a safetensors file: ``entries`` = (key, dtype code, shape, make() -> bytes)."""
    sizes = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}
    header, offset = {}, 0
    for key, code, shape, _ in entries:
        n = math.prod(shape) * sizes[code]
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, _, _, make in entries:
            fh.write(make())
    os.replace(tmp, path)
    return path.stat().st_size


def write_bf16(cfg, path: Path) -> int:
    import torch

    from krea2kit.models.dit import build_meta

    pool = _pool(torch.bfloat16)
    entries = []
    for i, (k, v) in enumerate(build_meta(cfg).state_dict().items()):
        entries.append((k, "BF16", tuple(v.shape),
                        lambda n=v.numel(), i=i: _cut(pool, n, i).contiguous().view(torch.uint8).numpy().tobytes()))
    return _write(path, entries)


def write_fp8_scaled(cfg, path: Path) -> int:
    import torch
    from torch import nn

    from krea2kit.models.dit import build_meta
    from krea2kit.models.quant import keeps_full_precision

    model = build_meta(cfg)
    quant = {f"{name}.weight" for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not keeps_full_precision(name)}
    pool, pool8 = _pool(torch.bfloat16), _pool(torch.float8_e4m3fn)
    scale = torch.tensor([0.02 / 100], dtype=torch.float32).numpy().tobytes()
    entries = []
    for i, (k, v) in enumerate(model.state_dict().items()):
        n = v.numel()
        if k in quant:
            stem = PREFIX + k[: -len(".weight")]
            entries.append((f"{stem}.weight", "F8_E4M3", tuple(v.shape),
                            lambda n=n, i=i: _cut(pool8, n, i).contiguous().view(torch.uint8).numpy().tobytes()))
            entries.append((f"{stem}.weight_scale", "F32", (), lambda: scale))
            entries.append((f"{stem}.comfy_quant", "U8", (len(FP8_JSON),), lambda: FP8_JSON))
        else:
            entries.append((PREFIX + k, "BF16", tuple(v.shape),
                            lambda n=n, i=i: _cut(pool, n, i).contiguous().view(torch.uint8).numpy().tobytes()))
    return _write(path, entries)


def child(mode: str, path: str) -> None:
    import torch

    import comfy_kitchen  # noqa: F401  (imported before the measurement: a fixed ~90 MB of kernels)
    from comfy_kitchen.tensor import QuantizedTensor  # noqa: F401
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.quant.load import resident_nbytes
    from krea2kit.models.quant.onload import load_dit_quantizing

    # One thread: on a busy machine OpenMP's second thread waits for a core, and an elementwise
    # op over 1M bf16 values took 31 ms with 2 threads against 0.05 ms with one (2 shared cores).
    torch.set_num_threads(int(os.environ.get("KREA2KIT_BENCH_THREADS", "1")))
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "fp8-on-load":
        model = load_dit_quantizing(path, "fp8", dtype=torch.bfloat16)
    else:
        model = load_dit(path, dtype=torch.bfloat16)
    loaded = time.perf_counter() - t0
    with torch.no_grad():  # touch every stored tensor once, as a first forward would
        for v in list(model.parameters()) + list(model.buffers()):
            flat = v.reshape(-1).view(torch.uint8) if v.dim() else v.reshape(1).view(torch.uint8)
            flat[::4096].sum()
    print(json.dumps({"mode": mode, "load_s": round(loaded, 1), "load_touch_s": round(time.perf_counter() - t0, 1),
                      "rss_before": before, "peak_rss": _status("VmHWM"), "rss_after": _status("VmRSS"),
                      "resident": resident_nbytes(model),
                      "storage": getattr(model, "storage_layout", None)}))


def _run_child(mode: str, path: Path, min_available: float) -> dict:
    avail = _available()
    if avail < min_available * 1e9:
        raise SystemExit(f"only {avail / 1e9:.1f} GB of memory available (need {min_available} GB): not loading")
    out = subprocess.run([sys.executable, str(HERE), "--child", mode, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="krea2-turbo", help="a preset or bench/dit_sizes.py name")
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", tempfile.gettempdir()))
    ap.add_argument("--min-available-gb", type=float, default=16.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    try:
        import comfy_kitchen  # noqa: F401
    except ImportError:
        print("cpu_load_full: needs the quant extra: pip install 'krea2kit[quant]'", file=sys.stderr)
        return 2
    cfg = _config(args.config)
    bf16 = Path(args.dir) / f"krea2kit_full_{args.config}_bf16.safetensors"
    fp8 = Path(args.dir) / f"krea2kit_full_{args.config}_fp8_scaled.safetensors"
    result = {"config": args.config, "params_b": round(cfg.num_params() / 1e9, 3)}
    try:
        t0 = time.perf_counter()
        result["bf16_file_bytes"] = write_bf16(cfg, bf16)
        result["bf16_write_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"wrote": str(bf16), "bytes": result["bf16_file_bytes"], "s": result["bf16_write_s"]}),
              flush=True)
        r = _run_child("fp8-on-load", bf16, args.min_available_gb)
        r["peak_added"] = r["peak_rss"] - r["rss_before"]
        r["peak_over_resident"] = round(r["peak_rss"] / r["resident"], 3)
        r["peak_over_bf16_file"] = round(r["peak_rss"] / result["bf16_file_bytes"], 3)
        result["fp8_on_load"] = r
        print(json.dumps({"fp8_on_load": r}), flush=True)
        if not args.keep:
            bf16.unlink(missing_ok=True)
        t0 = time.perf_counter()
        result["fp8_scaled_file_bytes"] = write_fp8_scaled(cfg, fp8)
        result["fp8_scaled_write_s"] = round(time.perf_counter() - t0, 1)
        r = _run_child("fp8_scaled", fp8, args.min_available_gb)
        r["peak_added"] = r["peak_rss"] - r["rss_before"]
        r["peak_over_file"] = round(r["peak_rss"] / result["fp8_scaled_file_bytes"], 3)
        r["peak_added_over_file"] = round(r["peak_added"] / result["fp8_scaled_file_bytes"], 3)
        result["fp8_scaled"] = r
        print(json.dumps({"fp8_scaled": r}), flush=True)
    finally:
        if not args.keep:
            bf16.unlink(missing_ok=True)
            fp8.unlink(missing_ok=True)
            bf16.with_suffix(".tmp").unlink(missing_ok=True)
            fp8.with_suffix(".tmp").unlink(missing_ok=True)
    print(json.dumps(result), flush=True)
    gib = 2**30
    for name in ("fp8_on_load", "fp8_scaled"):
        r = result[name]
        print(f"{name:12s} load {r['load_s']:7.1f} s (+touch {r['load_touch_s']:7.1f} s)  peak RSS "
              f"{r['peak_rss'] / gib:6.2f} GiB (before {r['rss_before'] / gib:.2f})  resident model "
              f"{r['resident'] / gib:6.2f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(main())
