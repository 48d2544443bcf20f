"""Krea 2 text conditioning: prompts -> tapped Qwen3-VL hidden states + mask.

:class:`Krea2TextEncoder` = the Qwen tokenizer + the native text tower + the 12 taps.
``encode(prompts)`` returns ``(hidden (B, L, taps, D), mask (B, L) bool)`` in the layout
the official encoder returns after its prefix strip: per prompt ``[prompt | PAD | suffix]``,
mask True on prompt and suffix tokens, False on padding; padded slots hold zeros.

**What the tower runs** (``exact_layout``, set from the recipe's ``model.layout`` by the
pipeline's text-encoder part):

* ``True`` (the default; the ``official`` layout): the official padded block
  ``[prefix | prompt | PAD | suffix]`` (546 tokens for max_length 512) with a key-padding
  mask and valid-token positions, bit-identical to the official encoder in any dtype.
* ``False`` (the ``compact`` layout, the nano presets'): only each prompt's real tokens
  (``prefix + prompt + suffix``, right-padded in a batch). With causal attention and
  positions that count real tokens only (``cumsum(mask) - 1``, what the official code gets
  from transformers 4.57.1) padding neither shifts nor feeds a real token, so this equals
  the padded run in exact arithmetic (fp32 to ~1e-6, not bit for bit in bf16; proved in
  ``tests/test_conditioning.py``) at a fraction of the cost for short prompts.

**What L is.** The official encoder always returns L = 512 (prompts padded to 507 tokens,
then the 5 suffix tokens). ``encode`` returns the *trimmed* length ``max_i(prompt_i) + 5``
over the batch unless ``length`` is given; the official layout passes ``length=512`` (zeros
in the padding). The transformer masks padding out, so L changes the cost and, in bf16, the
last bits of the result (which is why the official layout keeps all 512 positions).

:class:`PromptEmbeddingCache` stores one entry per prompt (independent of the batch it came
in) keyed by the encoder weights' identity, the template, taps, max_length and the prompt;
each entry carries a checksum and a bad one is recomputed, never trusted.
"""

from __future__ import annotations

import gc
import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from krea2kit.errors import Krea2kitError, WeightsError
from krea2kit.models.text_encoder import KREA2_TAPS, Qwen3TextTower, layers_needed, load_text_tower
from krea2kit.models.tokenizer import (
    KREA2_TEMPLATE,
    PromptTemplate,
    QwenTokenizer,
    TemplateTokens,
    tokenize_prompts,
)

CACHE_FORMAT = "krea2kit-prompt-embedding-v1"
# Bytes sampled from a weights file for its identity (beside its size and full header):
# enough to tell two fine-tunes with the same header apart without reading 8 GB.
_IDENTITY_SAMPLES = 32
_IDENTITY_SAMPLE_BYTES = 4096


def _sha256_bytes(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def weights_identity(files: Sequence[Path], extra: Sequence[Path] = ()) -> str:
    """A stable id of weights files: names, sizes, the full safetensors headers and sampled data.

    Cheap (a few hundred KB read for an 8 GB file); a copy or a move keeps the id (no mtime).
    ``extra`` files (the tokenizer.json) are hashed whole.
    """
    h = hashlib.sha256()
    for f in sorted(Path(x) for x in files):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            head = fh.read(8)
            (n,) = struct.unpack("<Q", head)
            h.update(fh.read(n))
            start, span = 8 + n, max(0, size - 8 - n)
            for k in range(_IDENTITY_SAMPLES):
                fh.seek(start + (span * k) // _IDENTITY_SAMPLES)
                h.update(fh.read(_IDENTITY_SAMPLE_BYTES))
    for f in sorted(Path(x) for x in extra):
        h.update(f"{f.name}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def module_identity(tower: torch.nn.Module, tokenizer: QwenTokenizer | None = None) -> str:
    """Identity of an in-memory tower (no files): shapes plus a strided sample of every tensor."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(_sha256_bytes(flat[::step]).encode())
    if tokenizer is not None:
        h.update(tokenizer.tokenizer.to_str().encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------

class PromptEmbeddingCache:
    """On-disk cache of per-prompt encoder outputs (safetensors + sha256 in the metadata).

    An entry is ``hidden`` (prompt + suffix tokens, taps, D) for one prompt. A file that
    does not parse, whose checksum or key does not match, is deleted and counted in
    ``corrupt``; the caller recomputes it.
    """

    def __init__(self, directory):
        self.dir = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    @staticmethod
    def make_key(identity: str, prompt: str, *, taps: Sequence[int], template: PromptTemplate,
                 dtype: torch.dtype, rope: str) -> str:
        payload = {
            "format": CACHE_FORMAT, "encoder": identity, "template": template.version,
            "prefix": template.prefix, "suffix": template.suffix, "max_length": template.max_length,
            "taps": [int(t) for t in taps], "dtype": str(dtype), "rope": rope, "prompt": prompt,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str, *, shape: Sequence[int] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The stored tensor, or None (miss). A bad entry (unreadable, checksum, key, or not the
        expected ``shape``/``dtype``) is deleted and counted as corrupt."""
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                hidden = fh.get_tensor("hidden")
            ok = (meta.get("format") == CACHE_FORMAT and meta.get("key") == key
                  and meta.get("sha256") == _sha256_bytes(hidden)
                  and (shape is None or tuple(hidden.shape) == tuple(shape))
                  and (dtype is None or hidden.dtype == dtype))
        except Exception:  # any unreadable file is a corrupt entry
            ok = False
        if not ok:
            self.corrupt += 1
            self.misses += 1
            p.unlink(missing_ok=True)
            return None
        self.hits += 1
        return hidden

    def put(self, key: str, hidden: torch.Tensor) -> None:
        from krea2kit.models.weights import save_safetensors_atomic

        hidden = hidden.detach().to("cpu").contiguous()
        save_safetensors_atomic({"hidden": hidden}, self.path(key),
                                metadata={"format": CACHE_FORMAT, "key": key, "sha256": _sha256_bytes(hidden)})

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        n = 0
        for f in self.dir.glob("*/*.safetensors"):
            f.unlink(missing_ok=True)
            n += 1
        return n


# ---------------------------------------------------------------------------

class Krea2TextEncoder:
    """Tokenizer + native Qwen3-VL text tower + taps -> Krea 2 text conditioning.

    ``official_rope=True`` reproduces the official encoder's bf16 rotary frequencies (it
    casts the whole transformers module, rotary buffer included, to the run dtype); it only
    matters when the tower is not fp32.
    """

    def __init__(self, tower: Qwen3TextTower, tokenizer: QwenTokenizer, *, taps: Sequence[int] = KREA2_TAPS,
                 template: PromptTemplate = KREA2_TEMPLATE, identity: str | None = None,
                 official_rope: bool = True, batch_size: int = 8, exact_layout: bool = True):
        self.tower: Qwen3TextTower | None = tower
        # Faithful first: run the official 546-token padded block (see _run_compact). False runs
        # only the real tokens (~10x less text-encoder work for short prompts, not bit-exact in bf16).
        self.exact_layout = bool(exact_layout)
        self.tokenizer = tokenizer
        self.taps = tuple(int(t) for t in taps)
        self.template = template
        self.batch_size = int(batch_size)
        need, norm = layers_needed(self.taps, tower.config.num_hidden_layers)
        if tower.num_layers < need or (norm and tower.norm is None):
            raise ValueError(f"taps {self.taps} need {need} decoder layers{' and the final norm' if norm else ''}; "
                             f"the tower has {tower.num_layers}")
        if tokenizer.vocab_size > tower.config.vocab_size:
            raise WeightsError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder embeds only "
                               f"{tower.config.vocab_size}", file=str(tokenizer.source) if tokenizer.source else None,
                               hint="the tokenizer.json does not belong to these weights")
        tower.inv_freq_dtype = tower.dtype if (official_rope and tower.dtype != torch.float32) else None
        self._rope = str(tower.inv_freq_dtype)
        self._dtype = tower.dtype
        self._device = tower.device
        self.hidden_size = tower.config.hidden_size
        self.identity = identity or module_identity(tower, tokenizer)

    # -- properties ------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_taps(self) -> int:
        return len(self.taps)

    def release(self) -> None:
        """Free the tower's weights (the pipeline encodes all prompts first). Cache hits keep working."""
        self.tower = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- encoding --------------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str], *, warn: bool = True) -> TemplateTokens:
        return tokenize_prompts(self.tokenizer, [prompts] if isinstance(prompts, str) else list(prompts),
                                self.template, warn=warn)

    def cache_key(self, prompt: str) -> str:
        identity = self.identity
        if "storage=" in identity:  # quantized layers: how they compute (model.quant_compute) changes the bits
            from krea2kit.models.quant.linear import current_mode

            identity = f"{identity} quant_compute={current_mode()}"
        return PromptEmbeddingCache.make_key(identity, prompt, taps=self.taps, template=self.template,
                                             dtype=self._dtype,
                                             rope=self._rope + ("|padded-layout" if self.exact_layout else ""))

    def _need_tower(self) -> Qwen3TextTower:
        if self.tower is None:
            raise Krea2kitError("the text encoder was released; load it again to encode new prompts")
        return self.tower

    @torch.inference_mode()
    def _run_compact(self, tokens: TemplateTokens, which: Sequence[int]) -> dict[int, torch.Tensor]:
        return self.compact_hidden(tokens, which)

    def compact_hidden(self, tokens: TemplateTokens, which: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states of prompt+suffix tokens, (n_i + suffix, taps, D), for prompts ``which``.

        ``exact_layout``: computed in the official padded layout (bit-identical to the official
        encoder in any dtype). Otherwise real tokens only, right-padded in a batch: exact in
        exact arithmetic and fp32 to ~1e-6, but not bit-identical in bf16 (different kernel
        rounding with the shorter key length).
        Runs with autograd when called outside inference mode (the nano training does).
        """
        tower = self._need_tower()
        out: dict[int, torch.Tensor] = {}
        order = sorted(which, key=lambda i: len(tokens.ids[i]))  # similar lengths share a batch
        if self.exact_layout:
            # The official block [prefix | prompt | PAD | suffix] (546 tokens), key-padding mask and
            # valid-token positions: in bf16 the attention kernels round differently with the key
            # length, so only this layout gives the official hidden states bit for bit (measured:
            # tests/test_official_e2e.py; the compact run differs by up to 0.125 at |h| ~ 2).
            for start in range(0, len(order), self.batch_size):
                group = order[start:start + self.batch_size]
                ids, mask = tokens.padded()
                ids, mask = ids[group], mask[group]
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
                hidden = tower(ids.to(self._device), taps=self.taps, position_ids=positions.to(self._device),
                               attention_mask=mask.to(self._device))
                body = ids.shape[1] - tokens.suffix_len
                for row, i in enumerate(group):
                    n = tokens.prompt_lens[i]
                    out[i] = torch.cat((hidden[row, tokens.prefix_len: tokens.prefix_len + n],
                                        hidden[row, body:])).clone()
            return out
        for start in range(0, len(order), self.batch_size):
            group = order[start:start + self.batch_size]
            s = max(len(tokens.ids[i]) for i in group)
            ids = torch.full((len(group), s), tokens.pad_id, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(tokens.ids[i])] = torch.tensor(tokens.ids[i], dtype=torch.long)
            hidden = tower(ids.to(self._device), taps=self.taps)
            for row, i in enumerate(group):
                out[i] = hidden[row, tokens.prefix_len: len(tokens.ids[i])].clone()
        return out

    def assemble(self, tokens: TemplateTokens, compact: dict[int, torch.Tensor], length: int):
        hidden = torch.zeros(tokens.batch, length, self.num_taps, self.hidden_size, dtype=self._dtype,
                             device=self._device)
        for i, n in enumerate(tokens.prompt_lens):
            c = compact[i].to(device=self._device, dtype=self._dtype)
            hidden[i, :n] = c[:n]
            hidden[i, length - tokens.suffix_len:] = c[n:]
        return hidden, tokens.output_mask(length).to(self._device)

    def encode(self, prompts: str | Sequence[str], *, cache: PromptEmbeddingCache | None = None,
               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts: ``(hidden (B, L, taps, D), mask (B, L) bool)``.

        L is ``max(prompt tokens) + suffix tokens`` over the batch, or ``length`` if given
        (at least that; ``length=template.max_length`` gives the official 512 layout).
        Over-long prompts are cut with a :class:`PromptTruncatedWarning`.
        """
        tokens = self.tokenize(prompts)
        need = tokens.trimmed_length
        if length is None:
            length = need
        elif length < need:
            raise ValueError(f"length={length} is shorter than the longest encoded prompt ({need} tokens)")
        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        compact: dict[int, torch.Tensor] = {}
        keys: dict[int, str] = {}
        if cache is not None:
            for i, p in enumerate(plist):
                keys[i] = self.cache_key(p)
                expected = (tokens.prompt_lens[i] + tokens.suffix_len, self.num_taps, self.hidden_size)
                got = cache.get(keys[i], shape=expected, dtype=self._dtype)
                if got is not None:
                    compact[i] = got
        todo = [i for i in range(len(plist)) if i not in compact]
        # Encode each distinct prompt once (the negative "" often repeats).
        firsts: dict[str, int] = {}
        for i in todo:
            firsts.setdefault(plist[i], i)
        if firsts:
            fresh = self._run_compact(tokens, list(firsts.values()))
            for i in todo:
                compact[i] = fresh[firsts[plist[i]]]
            if cache is not None:
                for i in firsts.values():
                    cache.put(keys[i], compact[i])
        return self.assemble(tokens, compact, length)


# ---------------------------------------------------------------------------

def find_tokenizer(weights_path, tokenizer_path=None) -> Path:
    """Locate tokenizer.json: the given path, else beside the weights or in a sibling ``tokenizer/``."""
    if tokenizer_path is not None:
        p = Path(tokenizer_path).expanduser()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise WeightsError("tokenizer.json not found", file=str(file),
                               hint="pass the folder that holds Qwen3-VL-4B-Instruct's tokenizer.json")
        return file
    w = Path(weights_path).expanduser()
    folder = w if w.is_dir() else w.parent
    candidates = [folder / "tokenizer.json", folder.parent / "tokenizer" / "tokenizer.json",
                  folder / "tokenizer" / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsError("no tokenizer.json next to the text-encoder weights", file=str(w),
                       hint="pass tokenizer_path= (the folder with Qwen3-VL-4B-Instruct's tokenizer.json; "
                            "ComfyUI's single-file encoders ship without one)")


def load_text_encoder(path, *, taps: Sequence[int] = KREA2_TAPS, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", tokenizer_path=None,
                      template: PromptTemplate = KREA2_TEMPLATE, official_rope: bool = True,
                      weights_dtype: str = "auto") -> Krea2TextEncoder:
    """Load tokenizer + text tower (only the layers the taps need) from an HF folder/shards or a ComfyUI file.

    ``weights_dtype="fp8" | "int8"`` quantizes a full-precision tower while loading it. The
    identity (the prompt cache's key, the images' metadata) names a quantized storage, so
    cached embeddings of the full-precision tower are never served to a quantized one.
    """
    tok_file = find_tokenizer(path, tokenizer_path)
    tokenizer = QwenTokenizer.from_file(tok_file)
    loaded = load_text_tower(path, taps=taps, dtype=dtype, device=device, weights_dtype=weights_dtype)
    identity = weights_identity(loaded.files, extra=[tok_file])
    storage = getattr(loaded.tower, "storage_layout", None)  # a quantized file, or quantized on load
    if storage:
        identity = f"{identity} storage={storage}"
    return Krea2TextEncoder(loaded.tower, tokenizer, taps=taps, template=template, identity=identity,
                            official_rope=official_rope)


__all__ = ["CACHE_FORMAT", "Krea2TextEncoder", "PromptEmbeddingCache", "find_tokenizer", "load_text_encoder",
           "module_identity", "weights_identity"]
