"""Tokenizer and Krea 2 template against transformers' Qwen2 tokenizer (oracle).

The oracle tokenizer is built by transformers from the tiny tokenizer's vocab and merges
only, with its own Qwen2 normalizer / pre-tokenizer definition, so a wrong pipeline in
our tokenizer.json would show.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from krea2kit.errors import WeightsError
from krea2kit.models.tokenizer import (
    KREA2_PREFIX,
    KREA2_SUFFIX,
    QWEN_SPECIAL_TOKENS,
    PromptTemplate,
    PromptTruncatedWarning,
    QwenTokenizer,
    build_tiny_tokenizer,
    template_token_counts,
    tokenize_prompts,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "a red fox in the snow",
    "",
    "café e\u0301 naïve 東京の夜景 🦊 Ünïcödé ßtraße",  # NFC folds e + combining accent
    "\n\nleading newlines   and  spaces\t\ttabs\r\n",
    "numbers 1234567 and 'quotes' it's we'll DON'T",
    "special tokens in text <|im_end|> stay special <|im_start|>",
    "a cute robot reading a book " * 150,
]


@pytest.fixture(scope="module")
def ours(tok_dir):
    return QwenTokenizer.from_file(tok_dir)


@pytest.fixture(scope="module")
def oracle(tok_dir):
    j = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = dict(j["model"]["vocab"])
    for a in j["added_tokens"]:
        vocab[a["content"]] = a["id"]
    merges = [tuple(m) for m in j["model"]["merges"]]
    return transformers.Qwen2Tokenizer(vocab=vocab, merges=merges,
                                       additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))


@pytest.fixture(scope="module")
def official_tok(tok_dir):
    # What encoder.py does: a Qwen2 fast tokenizer from the model folder.
    return transformers.Qwen2TokenizerFast.from_pretrained(str(tok_dir))


def test_special_tokens_are_single_ids(ours):
    ids = [ours.tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    assert None not in ids and ids == sorted(ids)
    assert ours.encode("<|im_start|>") == [ids[1]]
    assert ours.pad_id == ids[0]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_equal_transformers_qwen2(ours, oracle, official_tok, text):
    for full in (text, KREA2_PREFIX + text):
        want = oracle(full)["input_ids"]
        assert ours.encode(full) == want
        assert official_tok(full)["input_ids"] == want
    assert ours.encode_batch([text, KREA2_PREFIX + text]) == [ours.encode(text), ours.encode(KREA2_PREFIX + text)]


def test_template_layout_matches_official_tokenizer_call(ours, official_tok):
    """[prefix | prompt | PAD | suffix], then the 34-token strip: ids and mask as encoder.py builds them."""
    template = PromptTemplate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = tokenize_prompts(ours, TEXTS, template)
    prefix_idx, n_suffix = tokens.prefix_len, tokens.suffix_len
    assert (prefix_idx, n_suffix) == (34, 5)  # the tiny vocab learns the template words whole
    # encoder.py, on ids
    texts = [KREA2_PREFIX + t for t in TEXTS]
    inputs = official_tok(texts, truncation=True, padding="max_length", return_tensors="pt",
                          max_length=template.max_length + prefix_idx - n_suffix)
    suffix = official_tok([KREA2_SUFFIX] * len(texts), return_tensors="pt")
    want_ids = torch.cat([inputs["input_ids"], suffix["input_ids"]], dim=1)
    want_mask = torch.cat([inputs["attention_mask"].bool(), suffix["attention_mask"].bool()], dim=1)
    ids, mask = tokens.padded()
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    stripped = want_mask[:, prefix_idx:]
    assert stripped.shape[1] == 512
    assert torch.equal(tokens.output_mask(512), stripped)
    # the trimmed layout keeps the same pattern: prompt first, suffix last
    short = tokens.output_mask()
    assert short.shape[1] == tokens.trimmed_length == 512  # the last prompt fills the block
    assert tokens.prompt_lens[1] == 0 and tokens.output_mask(9)[1].tolist() == [False] * 4 + [True] * 5
    # the over-long prompt was cut to 507 prompt tokens, with a warning saying how many
    assert tokens.prompt_lens[-1] == 507 and tokens.truncated[-1] > 0
    msgs = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(msgs) == 1 and f"last {tokens.truncated[-1]} tokens were cut" in msgs[0]
    full = len(ours.encode(KREA2_PREFIX + TEXTS[-1])) - 34
    assert tokens.truncated[-1] == full - 507


def test_real_vocab_must_split_template_34_plus_5(tmp_path):
    """With a full-size Qwen vocabulary, anything but the official 34 + 5 is refused."""
    build_tiny_tokenizer(tmp_path, vocab_size=270)  # barely more than bytes: the prefix is long

    class Big(QwenTokenizer):
        @property
        def vocab_size(self) -> int:
            return 151_669

    big = Big.from_file(tmp_path)
    assert len(big.encode(KREA2_PREFIX)) != 34
    with pytest.raises(WeightsError, match="34"):
        template_token_counts(big)
    small = QwenTokenizer.from_file(tmp_path)  # a test/nano tokenizer: counts are derived
    p, s = template_token_counts(small)
    assert p == len(small.encode(KREA2_PREFIX)) > 34 and s == len(small.encode(KREA2_SUFFIX))


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(WeightsError, match="tokenizer.json not found"):
        QwenTokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid tokenizer.json"):
        QwenTokenizer.from_file(tmp_path)
