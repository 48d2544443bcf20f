"""Reading safetensors checkpoints: one file, a sharded folder, or a prefixed file.

Shared by every model loader (transformer, text encoder, VAEs, LoRAs):

* :func:`open_checkpoint` opens a ``.safetensors`` file or a folder (diffusers
  ``*.safetensors.index.json`` shards, or a folder holding one file) lazily: only the
  headers are read; tensors are read one at a time from the memory-mapped file.
* :func:`guess_checkpoint_kind` says what a set of keys looks like, so a wrong file gets
  "this looks like a VAE" instead of 400 lines of missing keys.
* :func:`assign_weights` fills a module built on the meta device, so peak host memory
  stays near one copy of the weights; each tensor keeps its stored dtype unless a
  dtype is forced.

Never loads pickles: ``.bin``/``.pt``/``.ckpt`` files are refused.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from krea2kit.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightsError("not a safetensors file (too short to hold a header)", file=str(path))
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise WeightsError(
                    "not a safetensors file (no valid header)",
                    file=str(path),
                    hint="krea2kit reads .safetensors weights only; pickled .bin/.pt/.ckpt files are never loaded",
                )
            raw = fh.read(n)
    except OSError as exc:
        raise WeightsError(f"cannot read weights: {exc.strerror or exc}", file=str(path)) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError("not a safetensors file (header is not JSON)", file=str(path)) from None
    if not isinstance(header, dict):
        raise WeightsError("not a safetensors file (header is not a JSON object)", file=str(path))
    data_len = size - 8 - n
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2:
            raise WeightsError(f"corrupt safetensors header (entry {key!r})", file=str(path))
        end = max(end, int(offsets[1]))
    if end > data_len:
        raise WeightsError(
            f"truncated file: the header describes {end} bytes of tensors but only {data_len} are present",
            file=str(path),
            hint="the download or copy was probably interrupted; fetch the file again",
        )
    return header


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16", "F32"
    file: Path


@dataclass
class Checkpoint:
    """A lazily read set of tensors, possibly spread over several files."""

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # a diffusers config.json beside the weights, if any

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def get(self, key: str) -> "torch.Tensor":
        """Read one tensor (from the memory-mapped file)."""
        return self.get_many([key])[key]

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield ``(key, tensor)`` one at a time, grouped by file."""
        from safetensors import safe_open

        wanted = list(self.infos) if keys is None else list(keys)
        by_file: dict[Path, list[str]] = {}
        for k in wanted:
            by_file.setdefault(self.infos[k].file, []).append(k)
        for f, ks in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for k in ks:
                        yield k, fh.get_tensor(k)
            except WeightsError:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise WeightsError(f"cannot read tensors: {exc}", file=str(f)) from None

    def get_many(self, keys: Iterable[str]) -> dict[str, "torch.Tensor"]:
        return dict(self.iter_tensors(keys))


def _open_file(path: Path) -> Checkpoint:
    header = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    infos = {k: TensorInfo(tuple(v["shape"]), v["dtype"], path) for k, v in header.items()}
    return Checkpoint(path=path, infos=infos, metadata=dict(meta))


def _load_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"config.json is not valid JSON: {exc}", file=str(cfg)) from None


def open_checkpoint(path: str | os.PathLike, *, what: str = "weights") -> Checkpoint:
    """Open a safetensors file, or a folder holding shards with an index JSON or one file.

    Raises :class:`WeightsError` with a clear message for every bad case.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{what} not found", file=str(p), hint="check the path: a run recipe's [model.weights], a training recipe's "
                                                    "base.weights, or the user config's [weights.<preset>]")
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise WeightsError(
                "pickled checkpoints are never loaded (they can run arbitrary code)",
                file=str(p),
                hint="convert the file to .safetensors first",
            )
        if p.name.endswith(".index.json"):
            return _open_index(p)
        ckpt = _open_file(p)
        return ckpt
    # A folder: a diffusers component folder (sharded or not) or a folder with one file.
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise WeightsError(f"several index files in the folder: {', '.join(i.name for i in indexes)}", file=str(p))
    if indexes:
        ckpt = _open_index(indexes[0])
    else:
        files = sorted(p.glob("*.safetensors"))
        if not files:
            hint = None
            if any(p.glob(f"*{s}") for s in PICKLE_SUFFIXES):
                hint = "the folder holds only pickled weights, which krea2kit never loads; convert them to .safetensors"
            raise WeightsError("no .safetensors file in the folder", file=str(p), hint=hint)
        if len(files) > 1:
            raise WeightsError(
                f"{len(files)} .safetensors files and no index JSON: cannot tell which to load",
                file=str(p),
                hint="point at one file, or add the *.safetensors.index.json that came with the shards",
            )
        ckpt = _open_file(files[0])
    ckpt.path = p
    ckpt.config = _load_config(p)
    return ckpt


def _open_index(index: Path) -> Checkpoint:
    try:
        data = json.loads(index.read_text())
        weight_map: dict[str, str] = data["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(f"not a valid safetensors index: {exc}", file=str(index)) from None
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / shard_name
        if not shard.is_file():
            raise WeightsError(f"shard {shard_name} listed in the index is missing", file=str(index))
        part = _open_file(shard)
        metadata.update(part.metadata)
        infos.update(part.infos)
    missing = [k for k in weight_map if k not in infos]
    if missing:
        raise WeightsError(f"{len(missing)} tensors named in the index are in no shard (e.g. {missing[0]})", file=str(index))
    return Checkpoint(path=index, infos=infos, metadata=metadata, config=_load_config(index.parent))


# ---------------------------------------------------------------------------
# What does a checkpoint look like?

def common_prefix(keys: Iterable[str], candidates: Iterable[str]) -> str:
    """The first candidate prefix that every key starts with ("" if none)."""
    keys = list(keys)
    for prefix in candidates:
        if prefix and keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


LORA_MARKERS = (".lora_", "lora_down", "lora_up", ".lokr_", ".hada_", "lora_unet_", "lycoris_")
VAE_PREFIXES = ("decoder.", "encoder.", "conv1.", "conv2.", "quant_conv", "post_quant_conv", "first_stage_model.")
QWEN_VAE_MARKERS = ("time_conv", "resample", ".residual.", "middle.", "mid_block.resnets.0.norm1.gamma")


def guess_checkpoint_kind(keys: Iterable[str]) -> str:
    """A person-readable guess at what a set of checkpoint keys is."""
    keys = list(keys)
    if not keys:
        return "an empty checkpoint"

    def has(pred) -> bool:
        return any(pred(k) for k in keys)

    if has(lambda k: any(m in k for m in LORA_MARKERS)):
        return "a text-encoder LoRA" if has(lambda k: "lora_te" in k or "text_model" in k) else "a LoRA"
    if has(lambda k: k.endswith("txtfusion.projector.weight")):
        return "a Krea 2 transformer (native keys)"
    if has(lambda k: k.endswith("text_fusion.projector.weight")):
        return "a Krea 2 transformer (diffusers keys)"
    if has(lambda k: "language_model" in k or k.endswith("embed_tokens.weight")):
        return "a Qwen3-VL text encoder"
    if has(lambda k: k.startswith(VAE_PREFIXES)):
        if has(lambda k: k.startswith("bn.") or "bn.running_mean" in k):
            return "a FLUX.2 VAE"
        if has(lambda k: any(m in k for m in QWEN_VAE_MARKERS)):
            return "a Qwen-Image / Wan VAE"
        return "a VAE"
    if has(lambda k: k.startswith(("transformer_blocks.", "double_blocks.", "single_blocks."))):
        return "another diffusion transformer (not Krea 2)"
    if has(lambda k: k.startswith(("model.diffusion_model.input_blocks", "input_blocks."))):
        return "a UNet checkpoint (Stable Diffusion family)"
    return "an unrecognised checkpoint"


def summarize_names(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------
# Filling a meta-device module

def assign_weights(
    module: "torch.nn.Module",
    checkpoint: Checkpoint,
    *,
    key_map: Callable[[str], str | None] | None = None,
    transforms: Mapping[str, Callable[["torch.Tensor"], "torch.Tensor"]] | None = None,
    dtype: "torch.dtype | None" = None,
    device: "str | torch.device" = "cpu",
    keep_fp32: Callable[[str], bool] | None = None,
    ignore: Callable[[str], bool] | None = None,
    what: str = "weights",
) -> None:
    """Assign every parameter/buffer of ``module`` (built on the meta device) from ``checkpoint``.

    ``key_map`` maps a checkpoint key to a module key (``None`` drops it); ``transforms``
    reshape a tensor by module key; ``ignore`` marks checkpoint keys that are expected
    but not used (e.g. vision-tower weights). Missing/unexpected keys and shape
    mismatches raise one :class:`WeightsError` with a summary. Tensors keep their stored
    dtype unless ``dtype`` is given; then names where ``keep_fp32(name)`` holds (norms) are
    held in fp32 instead, whatever their stored dtype.
    """
    import torch

    expected = dict(module.state_dict(keep_vars=True))
    plan: dict[str, str] = {}
    unexpected: list[str] = []
    for ck in checkpoint.keys():
        if ignore is not None and ignore(ck):
            continue
        mk = key_map(ck) if key_map else ck
        if mk is None:
            continue
        if mk in expected:
            plan[mk] = ck
        else:
            unexpected.append(ck)
    missing = [k for k in expected if k not in plan]
    if missing or unexpected:
        raise WeightsError(
            mismatch_message(what, missing, unexpected),
            file=str(checkpoint.path),
            hint=f"this file looks like {guess_checkpoint_kind(checkpoint.keys())}",
        )
    transforms = transforms or {}
    for mk, ck in plan.items():
        target = expected[mk]
        stored = checkpoint.infos[ck].shape
        want = tuple(target.shape)
        if mk not in transforms and tuple(stored) != want:
            raise WeightsError(
                f"shape mismatch for {ck}: the file has {tuple(stored)}, the model expects {want}",
                file=str(checkpoint.path),
                hint="the checkpoint and the model config disagree; check the preset or the config.json",
            )
    # Assign in file order, one tensor at a time (peak memory ~ one copy of the weights).
    reverse = {ck: mk for mk, ck in plan.items()}
    for ck, tensor in checkpoint.iter_tensors(plan.values()):
        mk = reverse[ck]
        if mk in transforms:
            tensor = transforms[mk](tensor)
            if tuple(tensor.shape) != tuple(expected[mk].shape):
                raise WeightsError(
                    f"shape mismatch for {ck}: {tuple(tensor.shape)} after conversion, expected {tuple(expected[mk].shape)}",
                    file=str(checkpoint.path),
                )
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if keep_fp32 and keep_fp32(mk) else dtype)
        tensor = tensor.to(device)
        set_tensor(module, mk, tensor)


def mismatch_message(what: str, missing: Iterable[str], unexpected: Iterable[str]) -> str:
    """"the <what> do not match the model: N missing (...); M unexpected (...)", the parts
    that are non-empty, each list summarised."""
    missing, unexpected, parts = list(missing), list(unexpected), []
    if missing:
        parts.append(f"{len(missing)} missing ({summarize_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({summarize_names(unexpected)})")
    return f"the {what} do not match the model: " + "; ".join(parts)


def set_tensor(module: "torch.nn.Module", name: str, tensor: "torch.Tensor") -> None:
    """Put ``tensor`` in place of the parameter (frozen) or buffer ``name`` of ``module``
    (replacing a meta-device placeholder without copying)."""
    import torch

    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:  # pragma: no cover - state_dict() only lists parameters and buffers
        raise KeyError(name)


def save_safetensors_atomic(tensors: Mapping[str, "torch.Tensor"], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Write a safetensors file atomically (hidden temp file in the same folder, then its final
    name in one step; :mod:`krea2kit.files`). ``overwrite=False`` refuses an existing
    file (:class:`~krea2kit.files.NameTaken`, exit 2) instead of replacing it."""
    from safetensors.torch import save_file

    from krea2kit.files import atomic_save

    state = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata=dict(metadata or {})),
                       overwrite=overwrite, hint="pass --overwrite to replace it")
