"""Qwen tokenizer (through the ``tokenizers`` library) and the Krea 2 prompt template.

The official encoder (krea-ai/krea-2 ``encoder.py``) builds, per prompt::

    [ prefix (34 tokens) | prompt | PAD ... | suffix (5 tokens) ]

* ``prefix + prompt`` is tokenized as *one* string, truncated and right-padded to
  ``max_length + 34 - 5`` tokens (541 for ``max_length=512``), so at most 507 prompt
  tokens survive;
* the suffix ``<|im_end|>\\n<|im_start|>assistant\\n`` is tokenized on its own and
  appended *after* the padding;
* the first 34 positions are dropped from the encoder output, leaving 512 positions with
  a mask that is True on prompt and suffix tokens and False on padding.

This module reproduces that on token ids. :class:`TemplateTokens` keeps the compact form
(real tokens only) that the exact encoder runs, and can produce the official padded
layout for reference and tests.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from krea2kit.errors import WeightsError

# The template (krea-ai/krea-2 encoder.py: prompt_template_encode_prefix / _suffix).
KREA2_SYSTEM_PROMPT = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
                       "spatial relationships of the objects and background:")
KREA2_PREFIX = f"<|im_start|>system\n{KREA2_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
KREA2_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# Token counts of prefix and suffix with the real Qwen3-VL tokenizer
# (encoder.py: prompt_template_encode_start_idx = 34, prompt_template_encode_suffix_start_idx = 5).
KREA2_PREFIX_TOKENS = 34
KREA2_SUFFIX_TOKENS = 5
# Positions handed to the transformer (encoder.py: max_length = 512).
KREA2_MAX_LENGTH = 512
# Bump when anything that changes the ids for a prompt changes (it is part of cache keys).
TEMPLATE_VERSION = "krea2-chat-v1"

# The Qwen2/Qwen3 pre-tokenizer split pattern (transformers' Qwen2Tokenizer, Qwen's tokenizer.json).
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen's special added tokens, in id order (151643.. in the real vocab).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_PAD_TOKEN = "<|endoftext|>"  # tokenizer_config.json "pad_token" of Qwen3-VL
# A real Qwen vocabulary has ~151k entries; below this we treat a tokenizer as a test/nano one
# and derive the template token counts instead of insisting on 34 / 5.
REAL_QWEN_VOCAB_MIN = 150_000


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder reads; its end was cut."""


@dataclass(frozen=True)
class PromptTemplate:
    prefix: str = KREA2_PREFIX
    suffix: str = KREA2_SUFFIX
    max_length: int = KREA2_MAX_LENGTH
    version: str = TEMPLATE_VERSION


KREA2_TEMPLATE = PromptTemplate()


class QwenTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` (special tokens included)."""

    def __init__(self, tokenizer, *, pad_token: str = QWEN_PAD_TOKEN, source: Path | None = None):
        self.tokenizer = tokenizer
        self.source = source
        pad = tokenizer.token_to_id(pad_token)
        if pad is None:
            raise WeightsError(f"the tokenizer has no pad token {pad_token!r}",
                               file=str(source) if source else None)
        self.pad_token = pad_token
        self.pad_id = int(pad)

    @classmethod
    def from_file(cls, path) -> "QwenTokenizer":
        """Load ``tokenizer.json`` (a file, or a folder holding it)."""
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise WeightsError("tokenizer.json not found", file=str(file),
                               hint="the text encoder needs Qwen3-VL's tokenizer.json: pass its folder "
                                    "(e.g. the model's tokenizer/ folder) as the tokenizer path")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise WeightsError(f"not a valid tokenizer.json: {exc}", file=str(file)) from None
        pad = QWEN_PAD_TOKEN
        cfg = file.parent / "tokenizer_config.json"
        if cfg.is_file():
            try:
                value = json.loads(cfg.read_text()).get("pad_token")
            except (OSError, json.JSONDecodeError):
                value = None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                pad = value
        return cls(tok, pad_token=pad, source=file)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=True mirrors a transformers tokenizer call (Qwen's post-processor adds none).
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@dataclass
class TemplateTokens:
    """Token ids of a batch of prompts in the Krea 2 template, real tokens only.

    ``ids[i]`` = prefix + prompt (after truncation) + suffix, no padding. The encoder output
    keeps positions ``prefix_len:`` of each; ``prompt_lens[i]`` prompt tokens then the suffix.
    """

    ids: list[list[int]]
    prompt_lens: list[int]
    prefix_len: int
    suffix_len: int
    max_length: int
    pad_id: int
    truncated: list[int]  # tokens cut from each prompt (0 = none)

    @property
    def batch(self) -> int:
        return len(self.ids)

    @property
    def trimmed_length(self) -> int:
        """Output length of the exact path: the longest prompt plus the suffix."""
        return max(self.prompt_lens) + self.suffix_len

    def output_mask(self, length: int | None = None):
        """Bool mask (B, length) of the output layout (default: the trimmed length)."""
        import torch

        length = self.trimmed_length if length is None else length
        mask = torch.zeros(self.batch, length, dtype=torch.bool)
        for i, n in enumerate(self.prompt_lens):
            mask[i, :n] = True
            mask[i, length - self.suffix_len:] = True
        return mask

    def padded(self):
        """The official layout before the prefix strip: ids and mask (B, prefix_len + max_length).

        ``[prefix | prompt | PAD | suffix]`` exactly as encoder.py feeds the model.
        """
        import torch

        body = self.prefix_len + self.max_length - self.suffix_len
        total = body + self.suffix_len
        ids = torch.full((self.batch, total), self.pad_id, dtype=torch.long)
        mask = torch.zeros(self.batch, total, dtype=torch.bool)
        for i, seq in enumerate(self.ids):
            head = seq[: len(seq) - self.suffix_len]
            ids[i, : len(head)] = torch.tensor(head, dtype=torch.long)
            mask[i, : len(head)] = True
            ids[i, body:] = torch.tensor(seq[len(seq) - self.suffix_len:], dtype=torch.long)
            mask[i, body:] = True
        return ids, mask


def template_token_counts(tokenizer: QwenTokenizer, template: PromptTemplate = KREA2_TEMPLATE) -> tuple[int, int]:
    """(prefix, suffix) token counts, derived by tokenizing them.

    With a real Qwen vocabulary they must be the official 34 and 5; anything else means the
    tokenizer.json is not Qwen3-VL's and the strip would cut the wrong tokens.
    """
    prefix_len = len(tokenizer.encode(template.prefix))
    suffix_len = len(tokenizer.encode(template.suffix))
    official = template.prefix == KREA2_PREFIX and template.suffix == KREA2_SUFFIX
    if official and tokenizer.vocab_size >= REAL_QWEN_VOCAB_MIN:
        if (prefix_len, suffix_len) != (KREA2_PREFIX_TOKENS, KREA2_SUFFIX_TOKENS):
            raise WeightsError(
                f"the tokenizer splits the Krea 2 template into {prefix_len}+{suffix_len} tokens, "
                f"not the official {KREA2_PREFIX_TOKENS}+{KREA2_SUFFIX_TOKENS}",
                file=str(tokenizer.source) if tokenizer.source else None,
                hint="use the tokenizer.json that ships with Qwen3-VL-4B-Instruct")
    if suffix_len >= template.max_length:
        raise ValueError("max_length must be larger than the suffix")
    return prefix_len, suffix_len


def tokenize_prompts(tokenizer: QwenTokenizer, prompts: Sequence[str],
                     template: PromptTemplate = KREA2_TEMPLATE, *, warn: bool = True) -> TemplateTokens:
    """Tokenize prompts into the template; warns (PromptTruncatedWarning) when one is cut."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    prefix_len, suffix_len = template_token_counts(tokenizer, template)
    # encoder.py: truncation=True, max_length = max_length + prefix_idx - suffix tokens.
    limit = template.max_length + prefix_len - suffix_len
    suffix = tokenizer.encode(template.suffix)
    ids, lens, cut = [], [], []
    for i, body in enumerate(tokenizer.encode_batch([template.prefix + p for p in prompts])):
        over = max(0, len(body) - limit)
        if over:
            body = body[:limit]
            if warn:
                warnings.warn(PromptTruncatedWarning(
                    f"prompt {i + 1} is too long: its last {over} tokens were cut (Krea 2 reads at most "
                    f"{limit - prefix_len} prompt tokens; this one has {len(body) - prefix_len + over})"),
                    stacklevel=3)
        ids.append(body + suffix)
        lens.append(max(0, len(body) - prefix_len))
        cut.append(over)
    return TemplateTokens(ids=ids, prompt_lens=lens, prefix_len=prefix_len, suffix_len=suffix_len,
                          max_length=template.max_length, pad_id=tokenizer.pad_id, truncated=cut)


# ---------------------------------------------------------------------------
# A tiny Qwen-style tokenizer for tests and the nano model

DEFAULT_TINY_CORPUS = (
    KREA2_PREFIX + KREA2_SUFFIX,
    "a photo of a red fox sitting in the snow, soft morning light, 35mm film",
    "an oil painting of a lighthouse on a cliff at sunset, dramatic clouds, seagulls",
    "a cute robot reading a book in a cozy library, warm colors, detailed illustration",
    "the quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>/\\|-_+=*&^%$#@~`",
    "café naïve déjà vu — 東京の夜景, 🦊 emoji, Ünïcödé ßtraße",
)


def build_tiny_tokenizer(folder=None, *, vocab_size: int = 400, corpus: Iterable[str] | None = None):
    """Train a small byte-level BPE with Qwen's normalizer, pre-tokenizer and special tokens.

    Returns the ``tokenizers.Tokenizer``; when ``folder`` is given, also writes
    ``folder/tokenizer.json`` and a ``tokenizer_config.json`` naming the pad token.
    The special tokens get the ids after the trained vocabulary, in Qwen's order.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    texts = list(corpus) if corpus is not None else list(DEFAULT_TINY_CORPUS)
    # The template's words are in every corpus so the nano model sees sensible merges.
    tok.train_from_iterator(texts + [KREA2_PREFIX, KREA2_SUFFIX], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                       single_word=False) for t in QWEN_SPECIAL_TOKENS])
    if folder is not None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"pad_token": QWEN_PAD_TOKEN, "eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"}, indent=1))
    return tok


__all__ = [
    "KREA2_MAX_LENGTH", "KREA2_PREFIX", "KREA2_PREFIX_TOKENS", "KREA2_SUFFIX", "KREA2_SUFFIX_TOKENS",
    "KREA2_SYSTEM_PROMPT", "KREA2_TEMPLATE", "PromptTemplate", "PromptTruncatedWarning", "QWEN_SPECIAL_TOKENS",
    "QwenTokenizer", "TemplateTokens", "TEMPLATE_VERSION", "build_tiny_tokenizer", "template_token_counts",
    "tokenize_prompts",
]
