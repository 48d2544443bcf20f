"""Loading benchmark: krea2kit's load_dit vs safetensors' load_file + load_state_dict.

A synthetic ~2 GB Krea 2 checkpoint in the official single-file layout (native keys; bf16 block
matmuls, fp32 norms / modulations / embedders like the official file) is written once (streamed,
no 2 GB dict in memory), then each variant loads it in a fresh subprocess:

  load_dit          krea2kit: meta build, tensors assigned one at a time, stored dtypes kept
  load_dit bf16     the same with dtype=torch.bfloat16 (norms stay fp32)
  official          what krea-ai/krea-2 inference.py does: meta build,
                    load_state_dict(safetensors.torch.load_file(path), assign=True)
  naive             SingleStreamDiT(cfg) on CPU (fp32 init) + load_state_dict(load_file(path))

safetensors maps the file and hands out tensors backed by it, so "load" alone reads nothing;
each variant then touches every weight (one element per page), as a first forward would.
Reported: wall time of the load and of load + touch, peak RSS (VmHWM) / file size, and the peak added by the load
((VmHWM - RSS before the load) / file size). The file is in the page cache for every variant
(it was just written), so times compare memory copies, not the disk.

Token layout: none (loading only; no forward), so ``model.layout`` does not apply.

    python bench/bench_dit_load.py [--keep]      # --keep leaves the file in $TMPDIR
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CFG = dict(features=2048, heads=16, kvheads=4, layers=12, txtdim=2560, txtheads=20, txtkvheads=20)
PATH = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "krea2kit_bench_dit_2g.safetensors"


def _status(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0.0


def write_checkpoint(path: Path) -> int:
    import torch

    from krea2kit.models.dit import DiTConfig, build_meta

    cfg = DiTConfig(**CFG)
    meta = build_meta(cfg).state_dict()

    def stored_dtype(k: str):
        in_blocks = k.startswith(("blocks.", "txtfusion.")) and k.endswith(".weight") and "projector" not in k
        return torch.bfloat16 if in_blocks else torch.float32

    header, offset = {}, 0
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    for k, v in meta.items():
        dt = stored_dtype(k)
        n = v.numel() * (2 if dt == torch.bfloat16 else 4)
        header[k] = {"dtype": names[dt], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        g = torch.Generator().manual_seed(0)
        for k, v in meta.items():
            t = (torch.randn(v.shape, generator=g) * 0.02).to(stored_dtype(k))
            fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return path.stat().st_size


def child(variant: str) -> None:
    import torch

    from krea2kit.models.dit import DiTConfig, SingleStreamDiT, build_meta

    cfg = DiTConfig(**CFG)
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if variant == "load_dit":
        from krea2kit.models.dit_loader import load_dit

        model = load_dit(PATH)
    elif variant == "load_dit_bf16":
        from krea2kit.models.dit_loader import load_dit

        model = load_dit(PATH, dtype=torch.bfloat16)
    elif variant == "official":
        from safetensors.torch import load_file

        model = build_meta(cfg)
        model.load_state_dict(load_file(str(PATH)), strict=True, assign=True)
    elif variant == "naive":
        from safetensors.torch import load_file

        model = SingleStreamDiT(cfg)
        model.load_state_dict(load_file(str(PATH)), strict=True)
    else:
        raise SystemExit(f"unknown variant {variant}")
    wall = time.perf_counter() - t0
    # safetensors hands out tensors backed by the memory-mapped file: nothing is read until used.
    # Touch every weight once (as the first forward would) so the peak RSS counts real memory.
    with torch.no_grad():
        for v in model.state_dict().values():
            v.view(-1)[:: max(1, 4096 // v.element_size())].float().sum()
    touched = time.perf_counter() - t0
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    print(json.dumps({"wall": wall, "touched": touched, "before": before, "hwm": _status("VmHWM"), "rss": _status("VmRSS"),
                      "model_bytes": nbytes}))


def main() -> None:
    if not PATH.exists():
        t0 = time.perf_counter()
        size = write_checkpoint(PATH)
        print(f"wrote {PATH} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    size = PATH.stat().st_size
    print(f"checkpoint: {size / 2**30:.2f} GiB, config {CFG}")
    rows = {}
    for variant in ("load_dit", "official", "load_dit_bf16", "naive"):
        out = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True)
        if out.returncode:
            print(f"{variant}: failed\n{out.stderr[-1500:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[variant] = r
        print(f"{variant:14s} load {r['wall']:6.2f} s  load+touch {r['touched']:6.2f} s  peak RSS / file {r['hwm'] / size:5.2f}  "
              f"(peak - RSS before load) / file {(r['hwm'] - r['before']) / size:5.2f}   "
              f"model {r['model_bytes'] / 2**30:.2f} GiB")
    if "load_dit" in rows and "official" in rows:
        print(f"time ratio (load+touch) official / load_dit: {rows['official']['touched'] / rows['load_dit']['touched']:.2f}x")
    if "--keep" not in sys.argv:
        PATH.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
