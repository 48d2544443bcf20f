"""Latents and prompt embeddings of a training dataset, encoded once and cached on disk.

Training never runs the VAE encoder or the text encoder per step: :func:`encode_dataset`
encodes every usable image (at its bucket size, :func:`~krea2kit.train.dataset.load_item_pixels`)
and every caption once, with the run's own VAE and text-encoder *parts* (the objects the
pipeline loads: ``vae.encode(images)`` gives the model's normalised latents,
``text_encoder.encode(texts)`` the tapped hidden states and mask, exactly as a
``krea2kit run`` conditions), and keeps them in ``cache_dir``:

* ``latents/ab/<key>.safetensors``: key = sha256 of the VAE's identity, the image file's
  sha256, the bucket and the dtype;
* ``text/ab/<key>.safetensors``: key = sha256 of the text encoder's identity, its token
  layout, the caption (trigger applied) and the dtype.

Each entry is a :class:`krea2kit.conditioning.PromptEmbeddingCache` entry (the prompt cache's
store, reused: checksum in the metadata, a bad entry deleted and recomputed, never trusted),
so changing an image, a caption, the VAE or the text-encoder weights changes the key and only
what changed is encoded again; repeats and identical captions are encoded once.

Text is kept compact: only the valid tokens (prompt + template suffix), ``(n, taps, D)``, with
the length the encoder lays them out in (512 in the official layout, where a full entry would
be 60 MB in fp32). :meth:`PromptEmbedding.padded` and :func:`collate` rebuild the encoder's
own layout ``[prompt | zeros | suffix]`` with its mask, so a training batch sees what a run
with that prompt sees.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from krea2kit.train.dataset import DatasetScan, TrainItem, load_item_pixels

LATENT_FORMAT = "krea2kit-train-latent-v1"
TEXT_FORMAT = "krea2kit-train-text-v1"


@dataclass
class PromptEmbedding:
    """One prompt's encoder output, compact: ``text`` (n, taps, D) holds the valid tokens
    (prompt then the ``suffix_len`` template-suffix tokens), ``text_mask`` (n,) is all True;
    ``length`` is the sequence length the encoder lays it out in."""

    text: torch.Tensor
    text_mask: torch.Tensor
    length: int
    suffix_len: int = 0

    def padded(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text (L, taps, D), mask (L,))`` in the encoder's layout ``[prompt | zeros | suffix]``
        (L = ``length`` or the encoder's own; at least the valid tokens)."""
        n = int(self.text.shape[0])
        length = max(int(length or self.length), n)
        if length == n:
            return self.text, torch.ones(n, dtype=torch.bool, device=self.text.device)
        prompt = n - self.suffix_len
        out = self.text.new_zeros((length, *self.text.shape[1:]))
        mask = torch.zeros(length, dtype=torch.bool, device=self.text.device)
        out[:prompt], mask[:prompt] = self.text[:prompt], True
        if self.suffix_len:
            out[length - self.suffix_len:], mask[length - self.suffix_len:] = self.text[prompt:], True
        return out, mask


@dataclass
class CachedSample:
    """One training example: ``latent`` (C, h, w) in the model's latent space, the caption's
    compact encoding (``text``, ``text_mask``; see :class:`PromptEmbedding`), the caption and
    the bucket (width, height) in pixels."""

    latent: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    caption: str
    bucket: tuple[int, int]
    length: int = 0
    suffix_len: int = 0

    @property
    def prompt(self) -> PromptEmbedding:
        return PromptEmbedding(self.text, self.text_mask, self.length or int(self.text.shape[0]), self.suffix_len)


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _suffix_len(text_encoder: Any, mask: torch.Tensor) -> int:
    """Template-suffix tokens of an encoding: the trailing run after the padding when there is
    padding (official layout), else the template's count from the encoder's tokenizer."""
    m = mask.reshape(-1).tolist()
    if False in m:
        return len(m) - (len(m) - m[::-1].index(False))
    encoder = getattr(text_encoder, "encoder", None)
    tokenize = getattr(encoder, "tokenize", None)
    if tokenize is None:
        return 0
    return int(tokenize([""], warn=False).suffix_len)


def _text_layout(text_encoder: Any) -> str:
    return str(getattr(text_encoder, "layout", ""))


def _encode_texts(text_encoder: Any, captions: Sequence[str], device, dtype) -> list[PromptEmbedding]:
    # One caption per call: in the compact layout a batch pads to its longest prompt, so the
    # layout length (and the last bits) of an entry would depend on its batch-mates.
    out: list[PromptEmbedding] = []
    with torch.inference_mode():
        for caption in captions:
            hidden, mask = text_encoder.encode([caption])
            m = mask[0].to("cpu", torch.bool)
            text = hidden[0][m.to(hidden.device)].to(device=device, dtype=dtype).clone()
            out.append(PromptEmbedding(text, torch.ones(text.shape[0], dtype=torch.bool, device=device),
                                       int(hidden.shape[1]), _suffix_len(text_encoder, m)))
    return out


def _finite(t: torch.Tensor, what: str, file: str | None = None) -> None:
    if not bool(torch.isfinite(t).all()):
        from krea2kit.errors import WeightsError

        raise WeightsError(f"the {what} produced NaN or infinite values while caching the dataset", file=file,
                           hint="check the weights (compare the file's sha256) or use model.dtype = \"float32\"")


def encode_dataset(scan: DatasetScan, *, vae: Any, text_encoder: Any, cache_dir: str | Path,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   events: Callable[..., None] | None = None) -> list[CachedSample]:
    """One :class:`CachedSample` per entry of ``scan.items`` (repeats share tensors), encoding
    only what ``cache_dir`` does not hold yet. ``vae`` / ``text_encoder`` are the pipeline's
    parts (:class:`krea2kit.contracts.VAEPart`, :class:`~krea2kit.contracts.TextEncoderPart`);
    the samples' tensors are put on ``device`` at ``dtype`` (the mask stays bool).

    ``events(name, **data)`` gets ``("stage", stage="cache", total=N)``, then
    ``("cache_progress", done=i, total=N)`` per image and ``("cache_done", latents_cached=...,
    latents_encoded=..., texts_cached=..., texts_encoded=..., corrupt=...)``.
    """
    from krea2kit.conditioning import PromptEmbeddingCache

    events = events or (lambda *a, **k: None)
    root = Path(cache_dir).expanduser()
    latent_store = PromptEmbeddingCache(root / "latents")
    text_store = PromptEmbeddingCache(root / "text")
    unique: list[TrainItem] = scan.unique
    events("stage", stage="cache", total=len(unique))

    # -- captions (each distinct caption once) --------------------------------
    te_identity = str(getattr(text_encoder, "identity", ""))
    te_dtype = str(getattr(getattr(text_encoder, "encoder", None), "dtype", dtype))
    captions = list(dict.fromkeys(item.caption for item in unique))
    prompts: dict[str, PromptEmbedding] = {}
    text_keys = {c: _key({"format": TEXT_FORMAT, "encoder": te_identity, "layout": _text_layout(text_encoder),
                          "dtype": te_dtype, "caption": c}) for c in captions}
    todo: list[str] = []
    for c in captions:
        got = text_store.get(text_keys[c])
        meta = _meta(text_store, text_keys[c]) if got is not None else None
        if got is not None and meta is not None:
            prompts[c] = PromptEmbedding(got.to(device=device, dtype=dtype),
                                         torch.ones(got.shape[0], dtype=torch.bool, device=device), *meta)
        else:
            todo.append(c)
    if todo:
        for c, emb in zip(todo, _encode_texts(text_encoder, todo, device, dtype)):
            _finite(emb.text, "text encoder")
            prompts[c] = emb
            _put(text_store, text_keys[c], emb.text, length=emb.length, suffix_len=emb.suffix_len)

    # -- images ----------------------------------------------------------------
    vae_identity = str(getattr(vae, "identity", ""))
    vae_dtype = getattr(vae, "dtype", dtype)
    vae_device = getattr(vae, "device", device)
    latents: dict[TrainItem, torch.Tensor] = {}
    encoded = 0
    for i, item in enumerate(unique):
        key = _key({"format": LATENT_FORMAT, "vae": vae_identity, "image": item.sha256,
                    "bucket": list(item.bucket), "dtype": str(vae_dtype)})
        got = latent_store.get(key)
        if got is None:
            pixels = load_item_pixels(item).unsqueeze(0).to(device=vae_device, dtype=vae_dtype)
            with torch.inference_mode():
                got = vae.encode(pixels)[0].to("cpu").clone()
            _finite(got, "VAE", str(item.image_path))
            latent_store.put(key, got)
            encoded += 1
        latents[item] = got.to(device=device, dtype=dtype)
        events("cache_progress", done=i + 1, total=len(unique))
    events("cache_done", latents_cached=len(unique) - encoded, latents_encoded=encoded,
           texts_cached=len(captions) - len(todo), texts_encoded=len(todo),
           corrupt=latent_store.corrupt + text_store.corrupt)

    out: list[CachedSample] = []
    for item in scan.items:
        p = prompts[item.caption]
        out.append(CachedSample(latent=latents[item], text=p.text, text_mask=p.text_mask, caption=item.caption,
                                bucket=item.bucket, length=p.length, suffix_len=p.suffix_len))
    return out


def _put(store: Any, key: str, tensor: torch.Tensor, *, length: int, suffix_len: int) -> None:
    """A text entry, with the layout numbers in a small JSON sidecar inside the same folder."""
    store.put(key, tensor)
    from krea2kit.files import atomic_write

    data = json.dumps({"length": int(length), "suffix_len": int(suffix_len)}).encode()
    atomic_write(store.path(key).with_suffix(".json"), lambda fp: fp.write(data), overwrite=True)


def _meta(store: Any, key: str) -> tuple[int, int] | None:
    try:
        raw = json.loads(store.path(key).with_suffix(".json").read_text())
        return int(raw["length"]), int(raw["suffix_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a missing or damaged sidecar: encode the caption again


def empty_prompt(text_encoder: Any, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> PromptEmbedding:
    """The empty prompt's encoding (caption dropout trains toward it: the unconditional
    branch guidance uses at inference, whose negative prompt defaults to "")."""
    (emb,) = _encode_texts(text_encoder, [""], device, dtype)
    return emb


def collate(samples: Sequence[CachedSample], *, drop: Sequence[bool] | None = None,
            empty: PromptEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch ``(latents (B, C, h, w), text (B, L, taps, D), mask (B, L))`` from samples of one
    bucket; where ``drop[i]`` is True the caption is replaced by ``empty`` (caption dropout).
    L is the longest layout in the batch, each prompt laid out as the encoder does."""
    if not samples:
        raise ValueError("an empty batch")
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes latent shapes {sorted(shapes)}: batch samples of one bucket")
    prompts = [empty if (drop is not None and drop[i]) else s.prompt for i, s in enumerate(samples)]
    if any(p is None for p in prompts):
        raise ValueError("caption dropout needs the empty prompt's encoding (empty=empty_prompt(...))")
    length = max(max(p.length, int(p.text.shape[0])) for p in prompts)
    padded = [p.padded(length) for p in prompts]
    return (torch.stack([s.latent for s in samples]), torch.stack([t for t, _ in padded]),
            torch.stack([m for _, m in padded]))


__all__ = ["CachedSample", "PromptEmbedding", "collate", "empty_prompt", "encode_dataset"]
