"""Peak host memory of one transformer load, run in a fresh process by the quantize-on-load tests
(:func:`marginal_cost`): ``python rss_probe.py FILE MODE`` prints JSON {"before": bytes,
"peak": bytes, "resident": bytes}.
MODE ``text-fp8`` / ``text-int8`` loads FILE as a text tower (every layer tapped) instead."""

import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # run as a script: tests/ for support/
from support.proc_memory import status  # noqa: E402


def rss_now() -> int:
    return status("VmRSS")


def main(path: str, mode: str) -> None:
    import torch

    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.quant.load import resident_nbytes
    from krea2kit.models.quant.onload import load_dit_quantizing

    import comfy_kitchen  # noqa: F401  (a fixed ~90 MB of kernels; not what is measured)
    from comfy_kitchen.tensor import QuantizedTensor  # noqa: F401

    torch.set_num_threads(1)
    before = rss_now()
    if mode.startswith("text-"):
        from krea2kit.models.text_encoder import load_text_tower
        from krea2kit.models.weights import open_checkpoint

        n = 1 + max(int(k.split(".")[3]) for k in open_checkpoint(path).keys() if ".layers." in k)
        model = load_text_tower(path, taps=list(range(1, n + 1)), dtype=torch.bfloat16,
                                weights_dtype=mode[len("text-"):]).tower
    elif mode == "bf16":
        model = load_dit(path, dtype=torch.bfloat16)
    else:
        model = load_dit_quantizing(path, mode, dtype=torch.bfloat16)
    # VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's from fork).
    peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "resident": resident_nbytes(model)}))


def load_in_fresh_process(path, mode: str) -> dict:
    """This script run on ``path`` in ``mode`` in a new interpreter: its JSON result."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def marginal_cost(small, large, mode: str) -> tuple[int, int]:
    """(resident bytes, peak growth) that loading ``large`` costs beyond ``small``: a process-wide
    fixed cost (allocator arenas, kernel set-up, which differ between installs) cancels."""
    a, b = load_in_fresh_process(small, mode), load_in_fresh_process(large, mode)
    return b["resident"] - a["resident"], (b["peak"] - b["before"]) - (a["peak"] - a["before"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
