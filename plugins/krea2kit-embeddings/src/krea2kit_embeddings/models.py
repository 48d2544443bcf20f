"""The embedders: CLIP's image tower (open-clip-torch) and DINOv2/v3 ViTs (timm), each built
from its library's architecture config with random weights and then filled from one local
``.safetensors`` file. No code path here can download: open_clip's ``hf-hub:``/``local-dir:``
names are refused, ``pretrained`` is never a tag, and timm gets the file as the only weight
source of its pretrained config (``url`` and ``hf_hub_id`` cleared), which also runs timm's
own checkpoint filter (original facebookresearch DINOv2 key names, position-embedding
resampling).

Images are prepared as each library's evaluation transform does (shorter side resized to
``size / crop_pct`` with the model's interpolation, centre crop, mean/std normalisation),
written with PIL and numpy so nothing here depends on torchvision's transforms.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from krea2kit.errors import PluginError, RecipeError, WeightsError

from krea2kit_embeddings.options import EmbeddingsOptions

PLUGIN = "krea2kit-embeddings"
ENV = {"clip": "KREA2KIT_CLIP_WEIGHTS", "dinov2": "KREA2KIT_DINOV2_WEIGHTS", "dinov3": "KREA2KIT_DINOV3_WEIGHTS"}
# In a folder, the first of these that exists is the weights file (the names the libraries'
# Hugging Face repositories use); otherwise the folder's only .safetensors file.
FOLDER_NAMES = {"clip": ("open_clip_model.safetensors", "model.safetensors"),
                "dinov2": ("model.safetensors",), "dinov3": ("model.safetensors",)}
EXTRAS = {"clip": ("open_clip", "open-clip-torch", "clip"), "dinov2": ("timm", "timm", "dino"),
          "dinov3": ("timm", "timm", "dino")}
REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http:", "https:")
# open_clip's OpenAI CLIP normalisation, the default when a model config names none
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _options(context: Any) -> EmbeddingsOptions:
    options = getattr(context, "plugin_options", None)
    return options if isinstance(options, EmbeddingsOptions) else EmbeddingsOptions()


def weights_file(embedder: str, options: EmbeddingsOptions) -> Path:
    """The local weights file of ``embedder`` ("clip", "dinov2", "dinov3"): its option, else
    its environment variable. A ``WeightsError`` (exit 4) naming the option when there is
    none, the file is missing, or it is not a ``.safetensors`` file."""
    key = f"{embedder}_weights"
    option = f"plugins.{PLUGIN}.{key}"
    hint = (f'set [plugins.{PLUGIN}] {key} = "/path/to/{FOLDER_NAMES[embedder][0]}" in the recipe (or '
            f"${ENV[embedder]}); krea2kit never downloads weights")
    value = getattr(options, key)
    if not value:
        from krea2kit.env_values import from_env  # remembered: messages show $VAR, not its value

        value = from_env(ENV[embedder])
    if not value:
        raise WeightsError(f"the {embedder} embedder needs weights, and none were given", key=option, hint=hint)
    path = Path(value).expanduser()
    if path.is_dir():
        found = next((path / n for n in FOLDER_NAMES[embedder] if (path / n).is_file()), None)
        if found is None:
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                raise WeightsError(f"the folder {path} holds {len(candidates)} .safetensors files, none named "
                                   f"{' or '.join(FOLDER_NAMES[embedder])}", key=option, hint=hint)
            found = candidates[0]
        path = found
    if not path.is_file():
        raise WeightsError(f"the {embedder} weights {path} do not exist", key=option, hint=hint)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path.name} is not a .safetensors file: pickled checkpoints are never loaded",
                           key=option, hint="convert it with safetensors (e.g. safetensors.torch.save_file of its "
                                            "state dict) or download the .safetensors version")
    return path


@lru_cache(maxsize=8)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """12 hex digits of sha256 over the file's size, its safetensors header (tensor names,
    shapes, offsets) and three 1 MiB samples of its data: cheap on multi-GB files, and two
    fine-tunes of one architecture (same header) still differ."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        head = fh.read(8)
        digest.update(head)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest.update(fh.read(min(length, 100 << 20)))
        for at in (0.0, 0.5, 1.0):
            fh.seek(max(0, int((size - (1 << 20)) * at)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:12]


def fingerprint(path: Path) -> str:
    st = os.stat(path)
    return _fingerprint(str(path), st.st_size, st.st_mtime_ns)


def _require(embedder: str) -> Any:
    module, package, extra = EXTRAS[embedder]
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise PluginError(
            f"the {embedder} embedder needs {package}, which cannot be imported here ({type(exc).__name__}: {exc})",
            hint=f"pip install 'krea2kit-embeddings[{extra}]' with a torchvision built for your torch "
                 "(see the plugin's README)") from None


def _model_name(embedder: str, name: str) -> str:
    if name.lower().startswith(REMOTE_PREFIXES):
        raise RecipeError(f"{name!r} names a remote or folder config; only a built-in architecture name is "
                          "accepted (weights come from the *_weights file)",
                          key=f"plugins.{PLUGIN}.{embedder}_model")
    return name


def prepare(images: list, size: tuple[int, int], mean: tuple, std: tuple, *, crop_pct: float = 1.0,
            interpolation: str = "bicubic") -> Any:
    """``(n, 3, H, W)`` float32 batch: shorter side resized to ``size / crop_pct``, centre crop
    to ``size``, then ``(x - mean) / std`` on [0, 1] RGB (the libraries' eval transforms)."""
    import numpy as np
    import torch
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}.get(
        str(interpolation), Image.Resampling.BICUBIC)
    height, width = size
    target = int(math.floor(max(height, width) / crop_pct))
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    rows = []
    for image in images:
        image = image.convert("RGB")
        scale = target / min(image.size)
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             resample)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
        rows.append(torch.from_numpy((pixels - mean_a) / std_a).permute(2, 0, 1))
    return torch.stack(rows)


class TorchEmbedder:
    """A loaded network as a :class:`krea2kit.contracts.Embedder`."""

    def __init__(self, *, name: str, dim: int, encode: Callable[[Any], Any], size: tuple[int, int], mean: tuple,
                 std: tuple, crop_pct: float, interpolation: str, device: str, batch_size: int) -> None:
        self.name = name
        self.dim = int(dim)
        self._encode = encode
        self._prep = dict(size=size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
        self._device = device
        self._batch_size = batch_size

    def embed(self, images: list) -> Any:
        import torch

        if not images:
            return torch.zeros(0, self.dim)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), self._batch_size):
                batch = prepare(list(images[start:start + self._batch_size]), **self._prep).to(self._device)
                rows.append(self._encode(batch).float().cpu())
        return torch.nn.functional.normalize(torch.cat(rows), dim=1)


class _quiet_root_logger:
    """Drop warnings logged on the root logger for the duration (open_clip logs through it)."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger()
        self._filter = lambda record: record.levelno > logging.WARNING
        self._logger.addFilter(self._filter)

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_clip(options: Any, context: Any) -> TorchEmbedder:
    opts = _options(context)
    path = weights_file("clip", opts)
    name = _model_name("clip", opts.clip_model)
    open_clip = _require("clip")
    try:
        # pretrained=None and no base tower weights: built from the config alone, nothing fetched
        # (its "initialized randomly" warning is silenced: the weights are loaded just below)
        with _quiet_root_logger():
            model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False,
                                           device="cpu")
    except RuntimeError as exc:
        raise RecipeError(f"open_clip has no model {name!r} ({exc})", key=f"plugins.{PLUGIN}.clip_model",
                          hint="see open_clip.list_models()") from None
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WeightsError(f"{path.name} does not hold open_clip {name!r} weights: {str(exc).splitlines()[0]}",
                           file=str(path), key=f"plugins.{PLUGIN}.clip_weights",
                           hint="set clip_model to the architecture the file was trained as") from None
    model = model.eval().to(context.device)
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    return TorchEmbedder(
        name=f"clip:{name}:{fingerprint(path)}", dim=int(visual.output_dim),
        encode=model.encode_image, size=_pair(cfg.get("size", getattr(visual, "image_size", 224))),
        mean=tuple(cfg.get("mean", CLIP_MEAN)), std=tuple(cfg.get("std", CLIP_STD)), crop_pct=1.0,
        interpolation=str(cfg.get("interpolation", "bicubic")), device=context.device, batch_size=opts.batch_size)


def _load_dino(kind: str, context: Any) -> TorchEmbedder:
    opts = _options(context)
    path = weights_file(kind, opts)
    name = _model_name(kind, getattr(opts, f"{kind}_model"))
    timm = _require(kind)
    # The file is the pretrained config's only weight source: timm reads it (safetensors) and
    # runs the architecture's checkpoint filter; with url and hf_hub_id cleared it cannot fetch.
    # num_classes = 0 on both sides keeps timm's load strict (it relaxes it when the head
    # changes), so a file of another architecture is an error, not a half-random network.
    overlay = dict(file=str(path), url=None, hf_hub_id=None, source=None, num_classes=0)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except RuntimeError as exc:
        message = str(exc).splitlines()[0]
        if "Unknown model" in message or "Invalid pretrained tag" in message:
            raise RecipeError(f"timm has no model {name!r} ({message})", key=f"plugins.{PLUGIN}.{kind}_model",
                              hint="see timm.list_models('*dino*')") from None
        raise WeightsError(f"{path.name} does not hold timm {name!r} weights: {message}", file=str(path),
                           key=f"plugins.{PLUGIN}.{kind}_weights",
                           hint=f"set {kind}_model to the architecture the file was trained as") from None
    model = model.eval().to(context.device)
    data = importlib.import_module("timm.data").resolve_data_config({}, model=model)
    return TorchEmbedder(
        name=f"{kind}:{name}:{fingerprint(path)}", dim=int(model.num_features), encode=model,
        size=_pair(tuple(data["input_size"][1:])), mean=tuple(data["mean"]), std=tuple(data["std"]),
        crop_pct=float(data.get("crop_pct", 1.0) or 1.0), interpolation=str(data.get("interpolation", "bicubic")),
        device=context.device, batch_size=opts.batch_size)


def load_dinov2(options: Any, context: Any) -> TorchEmbedder:
    return _load_dino("dinov2", context)


def load_dinov3(options: Any, context: Any) -> TorchEmbedder:
    return _load_dino("dinov3", context)
