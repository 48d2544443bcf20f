"""Loading Krea 2 transformer weights from any of the layouts found in the wild.

Layouts, detected from the keys:

* ``native``: the official single files ``raw.safetensors`` / ``turbo.safetensors`` (bare
  native keys ``first``, ``blocks.N.attn.wq``, ``txtfusion`` ... as in krea-ai/krea-2).
* ``comfyui``: the same keys under ``diffusion_model.`` or ``model.diffusion_model.``
  (ComfyUI / Comfy-Org repacks, ai-toolkit).
* ``diffusers``: the ``transformer/`` folder of the official HF repos (``img_in``,
  ``transformer_blocks.N.attn.to_q`` ..., sharded with an index JSON and a config.json).
  The mapping is 1:1 over all 430 tensors; the one non-rename is
  ``transformer_blocks.N.scale_shift_table`` (6, F) <-> ``blocks.N.mod.lin`` (6F,). The name
  table is :mod:`krea2kit.models.key_names`.

The model is built on the meta device and each tensor is assigned once, straight from the
memory-mapped file (:func:`krea2kit.models.weights.assign_weights`), so peak memory stays
near one copy of the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from krea2kit.errors import WeightsError
from krea2kit.models.dit import DiTConfig, SingleStreamDiT, build_meta, swiglu_hidden
from krea2kit.models.key_names import (  # noqa: F401  (re-exported: the loader's public names)
    COMFY_PREFIXES,
    DIFFUSERS_COMPONENT_PREFIX,
    diffusers_to_native,
    native_to_diffusers,
)
from krea2kit.models.weights import Checkpoint, assign_weights, guess_checkpoint_kind, open_checkpoint

# Native <-> diffusers names come from the one table in krea2kit.models.key_names, shared
# with the LoRA reader. A file's layout is told by where its text-fusion projector sits.
NATIVE_SIGNATURE = "txtfusion.projector.weight"
DIFFUSERS_SIGNATURE = native_to_diffusers(NATIVE_SIGNATURE)


# ---------------------------------------------------------------------------
# Layout and config detection

def detect_layout(keys: list[str]) -> tuple[str, str]:
    """``(layout, prefix)`` with layout in {"native", "comfyui", "diffusers"}; raises WeightsError."""
    for k in keys:
        if k.endswith(NATIVE_SIGNATURE):
            prefix = k[: -len(NATIVE_SIGNATURE)]
            if prefix == "":
                return "native", ""
            if prefix in COMFY_PREFIXES:
                return "comfyui", prefix
        if k.endswith(DIFFUSERS_SIGNATURE):
            prefix = k[: -len(DIFFUSERS_SIGNATURE)]
            if prefix in ("", DIFFUSERS_COMPONENT_PREFIX):
                return "diffusers", prefix
    raise WeightsError(f"not a Krea 2 transformer: this file looks like {guess_checkpoint_kind(keys)}")


def _native_shapes(ckpt: Checkpoint, layout: str, prefix: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for k in ckpt.keys():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if layout == "diffusers":
            try:
                rest = diffusers_to_native(rest)
            except KeyError:
                continue
        shapes[rest] = tuple(ckpt.shape(k))
    return shapes


def dit_config_from_checkpoint(ckpt: Checkpoint) -> DiTConfig:
    """The config a checkpoint implies: its diffusers config.json if present, else the
    tensor shapes (head dim read from the q-norm scale, 128 in the official model)."""
    layout, prefix = detect_layout(ckpt.keys())
    if layout == "diffusers" and ckpt.config:
        try:
            return DiTConfig.from_diffusers(ckpt.config)
        except (ValueError, TypeError) as exc:
            raise WeightsError(f"config.json does not describe a valid Krea 2 transformer: {exc}",
                               file=str(ckpt.path)) from None
    s = _native_shapes(ckpt, layout, prefix)

    def shape(name: str) -> tuple[int, ...]:
        if name not in s:
            raise WeightsError(f"cannot infer the model size: tensor {name} is missing", file=str(ckpt.path),
                               hint=f"this file looks like {guess_checkpoint_kind(ckpt.keys())}")
        return s[name]

    features, in_features = shape("first.weight")
    layers = len({k.split(".")[1] for k in s if k.startswith("blocks.") and k.endswith(".mod.lin")})
    groups = {g: len({k.split(".")[2] for k in s if k.startswith(f"txtfusion.{g}.")})
              for g in ("layerwise_blocks", "refiner_blocks")}
    txtlayers = shape("txtfusion.projector.weight")[1]
    tdim = shape("tmlp.0.weight")[1]
    txtdim = shape("txtmlp.0.scale")[0]
    patch = 2  # the official patch size; the file only holds channels * patch^2
    if in_features % (patch * patch):
        raise WeightsError(f"first.weight has {in_features} inputs, not channels x 2 x 2", file=str(ckpt.path))
    if layers:
        hd = shape("blocks.0.attn.qknorm.qnorm.scale")[0]
        heads = shape("blocks.0.attn.wq.weight")[0] // hd
        kvheads = shape("blocks.0.attn.wk.weight")[0] // hd
        mlp = shape("blocks.0.mlp.gate.weight")[0]
    else:  # pragma: no cover - a transformer without blocks is not a real checkpoint
        hd, heads, kvheads, mlp = 128, features // 128, features // 128, swiglu_hidden(features, 4)
    tb = "txtfusion.layerwise_blocks.0" if groups["layerwise_blocks"] else "txtfusion.refiner_blocks.0"
    thd = shape(f"{tb}.attn.qknorm.qnorm.scale")[0]
    txtheads = shape(f"{tb}.attn.wq.weight")[0] // thd
    txtkvheads = shape(f"{tb}.attn.wk.weight")[0] // thd
    txt_mlp = shape(f"{tb}.mlp.gate.weight")[0]
    multiplier = 4
    if heads * hd != features or txtheads * thd != txtdim:
        raise WeightsError(
            f"unsupported head layout: {heads} heads of {hd} for width {features}, "
            f"{txtheads} text heads of {thd} for width {txtdim}", file=str(ckpt.path))
    try:
        return DiTConfig(
            features=features, heads=heads, kvheads=kvheads, layers=layers, multiplier=multiplier, patch=patch,
            channels=in_features // (patch * patch), tdim=tdim, txtdim=txtdim, txtheads=txtheads,
            txtkvheads=txtkvheads, txtlayers=txtlayers, txt_layerwise_blocks=groups["layerwise_blocks"],
            txt_refiner_blocks=groups["refiner_blocks"],
            mlp_hidden=None if mlp == swiglu_hidden(features, multiplier) else mlp,
            txt_mlp_hidden=None if txt_mlp == swiglu_hidden(txtdim, multiplier) else txt_mlp,
        )
    except ValueError as exc:
        raise WeightsError(f"the tensor shapes do not describe a valid Krea 2 transformer: {exc}",
                           file=str(ckpt.path)) from None


def _is_pipeline_root(p: Path) -> bool:
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "transformer").is_dir())


def _is_norm_key(native_key: str) -> bool:
    """RMSNorm scales (kept in fp32 when a dtype is forced, like diffusers' _keep_in_fp32_modules)."""
    return native_key.endswith(".scale")


def load_dit(
    path: str | os.PathLike,
    *,
    config: DiTConfig | None = None,
    dtype=None,
    device="cpu",
    keep_norms_fp32: bool = True,
) -> SingleStreamDiT:
    """Load a Krea 2 transformer from a native file, a ComfyUI file or a diffusers ``transformer/`` folder.

    config: the expected shape (e.g. ``PRESETS["krea2-turbo"]``); default: read from the
        folder's config.json, else inferred from the tensor shapes.
    dtype: cast floating tensors to this dtype. RMSNorm scales stay fp32 (as diffusers keeps
        them) unless ``keep_norms_fp32=False``, which reproduces the official sampler exactly
        (it casts the whole model, norms included, to bf16). ``None`` keeps each tensor's
        stored dtype (official file: fp32 norms/modulations/embedders, bf16 blocks).
    device: where the tensors go.
    Raises :class:`WeightsError` for a missing, corrupt, truncated or wrong file.
    """
    p = Path(path).expanduser()
    if _is_pipeline_root(p):
        raise WeightsError(
            "this is a diffusers pipeline folder, not a transformer",
            file=str(p),
            hint=f"point at its transformer/ subfolder: {p / 'transformer'}",
        )
    from krea2kit.models.quant.detect import detect_quantization, is_gguf

    if is_gguf(p):  # community GGUF files: read by krea2kit.models.quant (the gguf package)
        from krea2kit.models.quant.load import load_gguf_dit

        return load_gguf_dit(p, config=config, dtype=dtype, device=device, keep_norms_fp32=keep_norms_fp32)
    ckpt = open_checkpoint(p, what="transformer weights")
    keys = ckpt.keys()
    kind = guess_checkpoint_kind(keys)
    if "LoRA" in kind:
        raise WeightsError(f"this is {kind}, not a Krea 2 transformer", file=str(p),
                           hint="load it as a LoRA on top of the transformer instead")
    try:
        layout, prefix = detect_layout(keys)
    except WeightsError as exc:
        exc.file = str(p)
        raise
    scheme = detect_quantization(ckpt)  # ComfyUI fp8_scaled / int8 / mxfp8 / nvfp4 (krea2kit.models.quant)
    if scheme is not None:
        from krea2kit.models.quant.load import load_quantized_dit

        return load_quantized_dit(ckpt, scheme=scheme, layout=layout, prefix=prefix, config=config, dtype=dtype,
                                  device=device, keep_norms_fp32=keep_norms_fp32)
    if config is None:
        cfg = dit_config_from_checkpoint(ckpt)
    else:
        cfg = config
        implied = dit_config_from_checkpoint(ckpt) if layout == "diffusers" and ckpt.config else config
        if implied != config:
            raise WeightsError(
                "config.json in the folder does not match the requested model config",
                file=str(p),
                hint=f"the folder's config implies {implied}",
            )

    if layout == "diffusers":
        def key_map(k: str) -> str | None:
            try:
                return diffusers_to_native(k[len(prefix):])
            except KeyError:
                return "<unknown>." + k  # reported as unexpected by assign_weights

        transforms = {f"blocks.{i}.mod.lin": (lambda t: t.reshape(-1)) for i in range(cfg.layers)}
        ignore = (lambda k: not k.startswith(prefix)) if prefix else None
    else:
        def key_map(k: str) -> str | None:
            return k[len(prefix):]

        transforms = None
        ignore = (lambda k: not k.startswith(prefix)) if prefix else None

    model = build_meta(cfg)
    if layout == "diffusers":
        _check_diffusers_mod_shapes(ckpt, prefix, cfg)
    assign_weights(
        model, ckpt, key_map=key_map, transforms=transforms, dtype=dtype, device=device,
        keep_fp32=_is_norm_key if keep_norms_fp32 else None, ignore=ignore, what="transformer weights",
    )
    model.eval().requires_grad_(False)
    return model


def _check_diffusers_mod_shapes(ckpt: Checkpoint, prefix: str, cfg: DiTConfig) -> None:
    """scale_shift_table is reshaped, so check its stored (6, F) shape here for a clear error."""
    for k in ckpt.keys():
        if k.startswith(prefix + "transformer_blocks.") and k.endswith(".scale_shift_table"):
            if tuple(ckpt.shape(k)) != (6, cfg.features):
                raise WeightsError(
                    f"shape mismatch for {k}: the file has {tuple(ckpt.shape(k))}, the model expects {(6, cfg.features)}",
                    file=str(ckpt.path),
                    hint="the checkpoint and the model config disagree; check the preset or the config.json",
                )
