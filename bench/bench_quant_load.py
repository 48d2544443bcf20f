"""Quantized loading on CPU: fp8 / int8 on load from a bf16 file, and a ComfyUI fp8_scaled file.

Uses the synthetic ~2 GB Krea 2 checkpoint of ``bench_dit_load.py`` (official single-file
layout: bf16 block matmuls, fp32 norms / modulations / embedders), writes an ``fp8_scaled``
copy of it in ComfyUI's layout (streamed: comfy-kitchen quantizes one tensor at a time), then
loads each variant in a fresh subprocess and touches every weight once:

  fp8 on load     krea2kit.models.quant.onload.load_dit_quantizing(bf16 file, "fp8")
  int8 on load    the same with "int8" (ConvRot where the width allows)
  fp8_scaled      load_dit(the fp8_scaled file): QuantLinear storage from the file
  bf16            load_dit(bf16 file, dtype=bf16), for comparison

Reported: seconds (load + touch), peak RSS (VmHWM) added by the load, as a fraction of the
bf16 file and of the variant's own resident model size. Needs ``pip install 'krea2kit[quant]'``.

    python bench/bench_quant_load.py [--keep]
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dit_load import CFG, PATH, _status, write_checkpoint  # noqa: E402

FP8_PATH = PATH.with_name(PATH.stem + "_fp8_scaled.safetensors")
FP8_JSON = json.dumps({"format": "float8_e4m3fn"}).encode()


def write_fp8_scaled(src: Path, dst: Path) -> int:
    """Stream ``src`` into ComfyUI's fp8_scaled layout (model.diffusion_model. prefix)."""
    import torch
    from comfy_kitchen.tensor import QuantizedTensor

    from krea2kit.models.weights import open_checkpoint
    from krea2kit.models.quant import keeps_full_precision
    from krea2kit.models.quant.onload import stream_tensors

    ckpt = open_checkpoint(src)
    prefix = "model.diffusion_model."
    quant = {k for k, i in ckpt.infos.items()
             if k.endswith(".weight") and len(i.shape) == 2 and not keeps_full_precision(k[: -len(".weight")])}
    header, offset = {}, 0
    for k, info in ckpt.infos.items():
        if k in quant:
            stem = prefix + k[: -len(".weight")]
            n = info.shape[0] * info.shape[1]
            for name, dt, shape, size in ((f"{stem}.weight", "F8_E4M3", info.shape, n),
                                          (f"{stem}.weight_scale", "F32", (), 4),
                                          (f"{stem}.comfy_quant", "U8", (len(FP8_JSON),), len(FP8_JSON))):
                header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
        else:
            size = (2 if info.dtype == "BF16" else 4) * math.prod(info.shape)
            header[prefix + k] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = dst.with_suffix(".tmp")
    order = sorted(ckpt.infos, key=lambda k: header[prefix + k[: -len(".weight")] + ".weight" if k in quant
                                                     else prefix + k]["data_offsets"][0])
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for k, t in stream_tensors(ckpt, order):
            if k in quant:
                qt = QuantizedTensor.from_float(t, "TensorCoreFP8Layout", scale="recalculate")
                fh.write(qt._qdata.contiguous().view(torch.uint8).numpy().tobytes())
                fh.write(qt._params.scale.float().reshape(1).numpy().tobytes())
                fh.write(FP8_JSON)
            else:
                fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, dst)
    return dst.stat().st_size


def child(variant: str) -> None:
    import torch

    import comfy_kitchen  # noqa: F401  (imported before the measurement: ~90 MB of kernels)
    from comfy_kitchen.tensor import QuantizedTensor  # noqa: F401
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.quant.load import resident_nbytes
    from krea2kit.models.quant.onload import load_dit_quantizing

    before = _status("VmRSS")
    t0 = time.perf_counter()
    if variant in ("fp8", "int8"):
        model = load_dit_quantizing(PATH, variant, dtype=torch.bfloat16)
    elif variant == "fp8_scaled":
        model = load_dit(FP8_PATH, dtype=torch.bfloat16)
    else:
        model = load_dit(PATH, dtype=torch.bfloat16)
    with torch.no_grad():  # touch every stored tensor once, as a first forward would
        for v in list(model.parameters()) + list(model.buffers()):
            flat = v.reshape(-1).view(torch.uint8) if v.dim() else v.reshape(1).view(torch.uint8)
            flat[:: 4096].sum()
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "before": before, "hwm": _status("VmHWM"), "resident": resident_nbytes(model)}))


def main() -> None:
    if not PATH.exists():
        print(f"wrote {PATH} ({write_checkpoint(PATH) / 2**30:.2f} GiB)")
    if not FP8_PATH.exists():
        t0 = time.perf_counter()
        print(f"wrote {FP8_PATH} ({write_fp8_scaled(PATH, FP8_PATH) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    size = PATH.stat().st_size
    print(f"bf16 checkpoint {size / 2**30:.2f} GiB, fp8_scaled {FP8_PATH.stat().st_size / 2**30:.2f} GiB, config {CFG}")
    for variant in ("fp8", "int8", "fp8_scaled", "bf16"):
        out = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True)
        if out.returncode:
            print(f"{variant}: failed\n{out.stderr[-1500:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        added = r["hwm"] - r["before"]
        print(f"{variant:11s} {r['wall']:6.1f} s  resident {r['resident'] / 2**30:5.2f} GiB "
              f"({r['resident'] / size:4.2f} x bf16 file)  peak added {added / 2**30:5.2f} GiB "
              f"({added / size:4.2f} x bf16 file, {added / r['resident']:4.2f} x resident)")
    if "--keep" not in sys.argv:
        PATH.unlink(missing_ok=True)
        FP8_PATH.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
