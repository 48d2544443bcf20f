"""The built-in Krea 2 transformer as a pipeline part (:class:`krea2kit.contracts.DiTPart`)."""

from __future__ import annotations

from typing import Any

from krea2kit.contracts import LoadContext


class DiTPart:
    """A loaded :class:`~krea2kit.models.dit.SingleStreamDiT` and how to make a denoiser."""

    def __init__(self, module: Any, identity: str, *, layout: str = "official") -> None:
        self.module = module
        self.identity = identity
        self.layout = layout
        config = module.config
        self.patch_size = int(config.patch)
        self.in_channels = int(config.channels)
        self.text_shape = (int(config.txtlayers), int(config.txtdim))

    def make_denoiser(self, cond, uncond, *, guidance: float, latent_size: tuple[int, int]):
        """``denoise(x, sigma)`` for one image: text features and RoPE computed once, cond
        and uncond batched when guidance is on (Krea convention; the plan converts)."""
        from krea2kit.denoiser import Krea2Denoiser

        txt, mask = cond
        kwargs = {}
        if uncond is not None:
            kwargs = {"uncond_txt": uncond[0], "uncond_mask": uncond[1]}
        return Krea2Denoiser(self.module, txt, mask, guidance=guidance, convention="krea",
                             latent_hw=tuple(latent_size), layout=self.layout, **kwargs)


def load(options: None, context: LoadContext) -> DiTPart:
    import torch

    from krea2kit.models.dit import get_preset
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.parts import weights_fingerprint

    cfg = get_preset(context.config) if context.config else None
    dtype = getattr(torch, context.dtype)
    # Block swap: load into host memory; the streamer moves what stays resident to the device.
    streamed = context.offload == "blocks"
    device = "cpu" if streamed else context.device
    # The official sampler casts the whole model to its dtype, norm scales included
    # (krea-ai/krea-2 inference.py); keeping them fp32 would not reproduce its images.
    if context.weights_dtype in ("fp8", "int8"):
        from krea2kit.models.quant.onload import load_dit_quantizing

        module = load_dit_quantizing(context.location, context.weights_dtype, config=cfg, dtype=dtype,
                                     device=device, keep_norms_fp32=False)
    else:
        module = load_dit(context.location, config=cfg, dtype=dtype, device=device, keep_norms_fp32=False)
    module.eval()
    if streamed:
        from krea2kit.models.offload import stream_blocks

        stream_blocks(module, context.device)
    identity = weights_fingerprint(context.location)
    storage = getattr(module, "storage_layout", None)  # quantized files (krea2kit.models.quant): fp8_scaled, gguf-Q8_0 ...
    if storage:
        identity = f"{identity} storage={storage} compute={QUANT_COMPUTE_PATH}"
    return DiTPart(module, identity, layout=context.layout)


#: How quantized layers compute by default ("auto" on the CPU: QuantLinear dequantizes one layer
#: to the compute dtype, then a plain matmul). The path a run actually took (model.quant_compute:
#: fp8 torch._scaled_mm / int8 torch._int_mm where the device has them) replaces it in the
#: images' metadata (Pipeline.record_quant_compute).
QUANT_COMPUTE_PATH = "dequantize-per-layer"
