"""Filling models from quantized files (ComfyUI layouts or GGUF): the transformer and the text tower.

The model is built on the meta device; each quantized Linear is swapped for a
:class:`~krea2kit.models.quant.linear.QuantLinear` holding the file's storage, and every tensor is
read once from the memory-mapped file, so the loaded model's resident size is the file's
size plus the full-precision layers, never the dequantized model. A quantized tensor that is
not a Linear's weight (an fp8 embedding table) is dequantized once at load, as ComfyUI's
non-Linear ops see it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from krea2kit.errors import WeightsError
from krea2kit.models.weights import Checkpoint, TensorInfo, mismatch_message, set_tensor
from krea2kit.models.quant.linear import QuantLinear

#: compute dtype when the caller forces none: ComfyUI's default for these files.
DEFAULT_COMPUTE_DTYPE = torch.bfloat16

KeyMap = Callable[[str], "str | None"]


class _Plan:
    """Where each file tensor goes: quantized modules' codecs, file key -> module key."""

    def __init__(self):
        self.codecs: dict[str, object] = {}     # module name -> codec
        self.targets: dict[str, str | None] = {}  # file key -> module key (None: not read)
        self.logical: dict[str, TensorInfo] = {}  # module key -> logical (dequantized) info
        self.layout = ""
        self.gguf = False  # GGUF storage comes as raw blocks (no dtype views to apply)


def _plan_safetensors(ckpt: Checkpoint, scheme, key_map: KeyMap, ignore) -> _Plan:
    from krea2kit.models.quant.comfy import ComfyCodec, require_comfy_kitchen

    require_comfy_kitchen(str(ckpt.path), scheme.layout)
    plan = _Plan()
    plan.layout = scheme.layout
    for stem, conf in scheme.layers.items():
        if ignore is not None and ignore(stem + ".weight"):
            continue
        mapped = key_map(stem + ".weight")
        if mapped is None:
            continue
        plan.codecs[mapped[: -len(".weight")]] = ComfyCodec(conf)
    for k in ckpt.keys():
        if k in scheme.dropped or (ignore is not None and ignore(k)):
            plan.targets[k] = None
            continue
        mapped = key_map(scheme.renames.get(k, k))
        if mapped is None:
            plan.targets[k] = None
            continue
        module, _, leaf = mapped.rpartition(".")
        codec = plan.codecs.get(module)
        if codec is None:
            plan.targets[k] = mapped
            plan.logical[mapped] = ckpt.infos[k]
        elif leaf in codec.BUFFERS:
            plan.targets[k] = f"{module}.{codec.BUFFERS[leaf]}"
            if leaf == "weight":
                info = ckpt.infos[k]
                plan.logical[mapped] = TensorInfo(codec.logical_shape(info.shape), info.dtype, info.file)
        elif leaf == "bias":
            plan.targets[k] = mapped
            plan.logical[mapped] = ckpt.infos[k]
        else:
            raise WeightsError(f"quantized layer {module} has a tensor krea2kit does not know ({leaf})",
                               file=str(ckpt.path), key=k,
                               hint="this variant of the layout is not supported yet; use the bf16 file")
    return plan


def _plan_gguf(ckpt, key_map: KeyMap) -> _Plan:
    from krea2kit.models.quant.gguf_reader import GGUFCodec

    plan = _Plan()
    plan.gguf = True
    byte_shapes = {t.name: tuple(int(x) for x in t.data.shape) for t in ckpt._reader.tensors}
    for k in ckpt.keys():
        mapped = key_map(k)
        plan.targets[k] = mapped
        if mapped is None:
            continue
        info = ckpt.infos[k]
        plan.logical[mapped] = info
        module, _, leaf = mapped.rpartition(".")
        if ckpt.is_quantized(k) and leaf == "weight" and len(info.shape) == 2:
            plan.codecs[module] = GGUFCodec(ckpt.qtypes[k], byte_shapes[k])
            plan.targets[k] = f"{module}.qweight"
        elif ckpt.is_quantized(k):  # a quantized bias / modulation table: small, dequantized once
            ckpt.dequantize_on_read.add(k)
    plan.layout = "+".join(sorted({c.name for c in plan.codecs.values()})) or "gguf-float"
    return plan


def _swap_in(model: nn.Module, module_name: str, codec, compute_dtype, file: str) -> QuantLinear | None:
    """Replace a Linear by a meta QuantLinear; ``None`` when the module is not a Linear."""
    try:
        old = model.get_submodule(module_name)
    except AttributeError:
        raise WeightsError(f"quantized tensor for {module_name}, which this model does not have",
                           file=file, key=module_name) from None
    if not isinstance(old, nn.Linear):
        return None
    new = QuantLinear(old.in_features, old.out_features, old.bias is not None, codec, compute_dtype, device="meta")
    parent_name, _, leaf = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    return new


def _up(a: int, m: int) -> int:
    return (a + m - 1) // m * m


def _check_scale(mod: QuantLinear, buffer: str, shape: tuple[int, ...], file: str, key: str) -> None:
    fmt = getattr(mod.codec, "format", None)
    n, k = mod.out_features, mod.in_features
    numel = 1
    for d in shape:
        numel *= d
    want = {
        ("float8_e4m3fn", "weight_scale"): {1},
        ("float8_e5m2", "weight_scale"): {1},
        ("int8_tensorwise", "weight_scale"): {1, n},
        ("mxfp8", "weight_scale"): {_up(n, 128) * _up(_up(k, 32) // 32, 4)},
        ("nvfp4", "weight_scale"): {_up(n, 128) * _up(_up(k, 16) // 16, 4)},
    }.get((fmt, buffer))
    if want is not None and numel not in want:
        raise WeightsError(f"{key} has shape {shape}; a {fmt} scale for a {n}x{k} weight has "
                           f"{' or '.join(str(w) for w in sorted(want))} values", file=file, key=key)


def fill_quantized(model: nn.Module, ckpt, plan: _Plan, *, dtype=None, device="cpu",
                   keep_fp32: Callable[[str], bool] | None = None, what: str = "weights") -> nn.Module:
    """Swap ``plan``'s quantized Linears into ``model`` (built on meta) and assign every tensor.

    dtype: the compute dtype of the quantized layers (default bf16) and the dtype floating
        tensors are cast to (default: kept as stored); ``keep_fp32(module_key)`` holds a
        tensor in fp32 instead (norms). Checks missing / unexpected keys and shapes first.
    """
    file = str(ckpt.path)
    gguf = plan.gguf
    compute = dtype or DEFAULT_COMPUTE_DTYPE
    quant: dict[str, QuantLinear] = {}
    eager: dict[str, object] = {}  # quantized non-Linear tensors: dequantized at load
    for name, codec in plan.codecs.items():
        mod = _swap_in(model, name, codec, compute, file)
        if mod is None:
            eager[name] = codec
        else:
            quant[name] = mod
    expected = dict(model.state_dict(keep_vars=True))
    wanted = {ck: mk for ck, mk in plan.targets.items() if mk is not None}
    eager_keys = {ck: mk for ck, mk in wanted.items() if mk.rpartition(".")[0] in eager}
    main = {mk: ck for ck, mk in wanted.items() if ck not in eager_keys}
    covered = set(main) | {f"{mk.rpartition('.')[0]}.weight" for mk in eager_keys.values()}
    unexpected = [ck for ck, mk in wanted.items() if ck not in eager_keys and mk not in expected]
    missing = [mk for mk in expected if mk not in covered]
    if missing or unexpected:
        raise WeightsError(mismatch_message(what, missing, unexpected), file=file)
    for mk, ck in main.items():
        module_name, _, leaf = mk.rpartition(".")
        stored = tuple(ckpt.infos[ck].shape)
        qmod = quant.get(module_name)
        if qmod is not None and leaf in qmod.storage_names:
            declared = qmod.codec.storage_shapes(qmod.out_features, qmod.in_features)[leaf][0]
            if gguf and leaf == "qweight":
                logical = tuple(plan.logical[f"{module_name}.weight"].shape)
                if logical != (qmod.out_features, qmod.in_features):
                    raise WeightsError(f"shape mismatch for {ck}: the file has {logical}, the model expects "
                                       f"{(qmod.out_features, qmod.in_features)}", file=file, key=ck)
                if qmod.codec.n_values() != qmod.out_features * qmod.in_features:
                    raise WeightsError(f"{ck} holds {qmod.codec.n_values()} values in its blocks, its shape "
                                       f"{logical} needs {qmod.out_features * qmod.in_features}", file=file, key=ck)
                continue
            if declared is not None and stored != tuple(declared):
                raise WeightsError(f"shape mismatch for {ck}: the file has {stored}, a {qmod.storage_layout} "
                                   f"{qmod.out_features}x{qmod.in_features} weight stores {tuple(declared)}",
                                   file=file, key=ck, hint="the checkpoint and the model config disagree")
            if declared is None:
                _check_scale(qmod, leaf, stored, file, ck)
        elif stored != tuple(expected[mk].shape):
            raise WeightsError(f"shape mismatch for {ck}: the file has {stored}, the model expects "
                               f"{tuple(expected[mk].shape)}", file=file, key=ck,
                               hint="the checkpoint and the model config disagree; check the preset or config")

    def cast(mk: str, tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            return tensor.to(torch.float32 if keep_fp32 is not None and keep_fp32(mk) else dtype)
        return tensor

    reverse = {ck: mk for mk, ck in main.items()}
    for ck, tensor in ckpt.iter_tensors(main.values()):  # one at a time, in file order
        mk = reverse[ck]
        module_name, _, leaf = mk.rpartition(".")
        qmod = quant.get(module_name)
        if qmod is not None and leaf in qmod.storage_names:
            if not gguf:
                tensor = qmod.codec.prepare(leaf, tensor, ckpt.infos[ck].dtype, file=file, key=ck)
            set_tensor(model, mk, tensor.to(device))
        elif qmod is not None and leaf == "bias":
            set_tensor(model, mk, tensor.to(device=device, dtype=compute))
        else:
            set_tensor(model, mk, cast(mk, tensor).to(device))
    for name, codec in eager.items():
        keys = [ck for ck, mk in eager_keys.items() if mk.rpartition(".")[0] == name]
        storage = {}
        for ck, tensor in ckpt.get_many(keys).items():
            leaf = eager_keys[ck].rpartition(".")[2]
            storage[leaf] = codec.prepare(leaf, tensor, ckpt.infos[ck].dtype, file=file, key=ck)
        target = expected[f"{name}.weight"]
        w = codec.dequantize(storage, tuple(target.shape), compute)
        set_tensor(model, f"{name}.weight", cast(f"{name}.weight", w).to(device))
    model.eval().requires_grad_(False)
    model.storage_layout = plan.layout
    return model


def load_quantized_dit(ckpt, *, scheme=None, layout: str, prefix: str, config=None, dtype=None,
                       device="cpu", keep_norms_fp32: bool = True):
    """A :class:`~krea2kit.models.dit.SingleStreamDiT` from a quantized checkpoint.

    ckpt: an open safetensors :class:`Checkpoint` (with its :class:`QuantScheme` in ``scheme``)
        or a :class:`~krea2kit.models.quant.gguf_reader.GGUFCheckpoint` (``scheme=None``).
    layout/prefix: from :func:`krea2kit.models.dit_loader.detect_layout` (native or comfyui).
    dtype: the compute dtype (quantized layers dequantize to it, the other tensors are cast to
        it); default bf16 for quantized layers and the stored dtype for the rest.
    """
    from krea2kit.models.dit import build_meta
    from krea2kit.models.dit_loader import dit_config_from_checkpoint

    file = str(ckpt.path)
    if layout not in ("native", "comfyui"):
        raise WeightsError(f"quantized transformers are read in the native / ComfyUI key layout, not {layout}",
                           file=file, hint="use a ComfyUI quantized file or the bf16 diffusers folder")

    def key_map(k: str) -> str | None:
        return k[len(prefix):] if k.startswith(prefix) else None

    plan = _plan_gguf(ckpt, key_map) if scheme is None else _plan_safetensors(ckpt, scheme, key_map, None)
    if config is None:
        view = Checkpoint(path=Path(file), infos=plan.logical, metadata=dict(ckpt.metadata), config=None)
        config = dit_config_from_checkpoint(view)
    model = build_meta(config)
    return fill_quantized(model, ckpt, plan, dtype=dtype, device=device,
                          keep_fp32=(lambda k: k.endswith(".scale")) if keep_norms_fp32 else None,
                          what="transformer weights")


def load_gguf_dit(path, *, config=None, dtype=None, device="cpu", keep_norms_fp32: bool = True):
    """A transformer from a GGUF file (keys in the native or ComfyUI layout)."""
    from krea2kit.models.dit_loader import detect_layout
    from krea2kit.models.quant.gguf_reader import open_gguf

    ckpt = open_gguf(path)
    try:
        layout, prefix = detect_layout(ckpt.keys())
    except WeightsError as exc:
        exc.file = str(path)
        raise
    return load_quantized_dit(ckpt, scheme=None, layout=layout, prefix=prefix, config=config, dtype=dtype,
                              device=device, keep_norms_fp32=keep_norms_fp32)


def fill_quantized_text_tower(tower: nn.Module, ckpt: Checkpoint, scheme, *, key_map: KeyMap, ignore,
                              dtype=None, device="cpu") -> nn.Module:
    """The text tower (built on meta) from a quantized ComfyUI text-encoder file (fp8_scaled ...)."""
    plan = _plan_safetensors(ckpt, scheme, key_map, ignore)
    return fill_quantized(tower, ckpt, plan, dtype=dtype, device=device, what="text-encoder weights")


def resident_nbytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (quantized storage counted as stored)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
