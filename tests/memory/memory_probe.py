"""Measured peak memory of one transformer load and one denoiser call, in a fresh process
(run by tests/memory/test_memory.py): ``python memory_probe.py FILE TXT_TOKENS IMAGE_SIDE BATCH [DTYPE]``
prints JSON {"weights": bytes, "activations": bytes}.

Method: the resident set (``VmRSS``) and its high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) of this process. The parent sets ``MALLOC_MMAP_THRESHOLD_`` low, so
glibc gives every tensor above 64 KiB its own mapping and a freed tensor leaves the resident
set at once (otherwise freed heap pages stay counted and the peak depends on history).
tracemalloc cannot be used: torch's CPU allocator is not Python's.
"""

import gc
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # run as a script: tests/ for support/
from support.proc_memory import reset_peak, status  # noqa: E402


def main(path: str, txt_tokens: int, side: int, batch: int, dtype_name: str = "float32") -> None:
    import torch

    from krea2kit.denoiser import Krea2Denoiser
    from krea2kit.models.dit_loader import load_dit

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype_name)
    load_dit(path, dtype=dtype)  # warm-up, dropped at once: the loader's first use maps code pages too
    gc.collect()
    before = status("VmRSS")
    model = load_dit(path, dtype=dtype).eval()
    for t in model.state_dict().values():  # fault in every page (a memory-mapped file counts when read)
        t.sum()
    weights = status("VmRSS") - before
    cfg = model.config
    latent = side // 8
    txt = torch.randn(1, txt_tokens, cfg.txtlayers, cfg.txtdim, generator=g).to(dtype)
    x = torch.randn(batch, cfg.channels, latent, latent, generator=g).to(dtype)
    kwargs = {"uncond_txt": txt.clone(), "guidance": 3.0} if batch == 2 else {}
    with torch.inference_mode():
        # Warm up at the smallest size: the first call maps code pages and kernel workspaces
        # (tens of MB, once per process) that are not activations.
        Krea2Denoiser(model, txt[:, :2], latent_hw=(2, 2), layout="compact", **{
            k: (v[:, :2] if k == "uncond_txt" else v) for k, v in kwargs.items()})(x[:1, :, :2, :2], 0.5)
        reset_peak()
        base = status("VmRSS")
        denoise = Krea2Denoiser(model, txt, latent_hw=(latent, latent), layout="compact", **kwargs)
        v = denoise(x[:1], 0.5)
        peak = status("VmHWM")
    print(json.dumps({"weights": weights, "activations": peak - base, "out": list(v.shape)}))


def vae(folder: str, side: int) -> None:
    """``python memory_probe.py vae FOLDER SIDE``: the peak of one VAE decode (fp32, untiled)."""
    import torch

    from krea2kit.models.vae_qwen import load_qwen_vae

    torch.set_num_threads(1)
    model = load_qwen_vae(folder, dtype=torch.float32)
    z = torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.decode(z[:, :, :2, :2], tile=None)  # warm-up, as above
        reset_peak()
        base = status("VmRSS")
        out = model.decode(z, tile=None)
        peak = status("VmHWM")
    print(json.dumps({"activations": peak - base, "out": list(out.shape)}))


if __name__ == "__main__":
    if sys.argv[1] == "vae":
        vae(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
