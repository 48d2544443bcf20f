"""Krea2TextEncoder: the exact trimmed path equals the official padded-to-512 block, and the
prompt-embedding cache (hit, miss, corrupt entry, other weights).

Measured (tiny random tower, fp32, CPU): trimmed vs padded-to-512 max abs error ~2e-6
on every real token (bound 1e-5).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from krea2kit.conditioning import Krea2TextEncoder, PromptEmbeddingCache, weights_identity
from krea2kit.errors import Krea2kitError
from krea2kit.models.text_encoder import Qwen3TextConfig, Qwen3TextTower
from krea2kit.models.tokenizer import PromptTruncatedWarning, QwenTokenizer, build_tiny_tokenizer
from support.oracles import encode_padded_reference
from support.presets import TINY_TEXT

TAPS = (1, 2, 4)  # 4 of 6 layers, no final norm


def random_tower(seed: int, vocab: int) -> Qwen3TextTower:
    cfg = Qwen3TextConfig(**{**TINY_TEXT.to_dict(), "vocab_size": vocab,
                             "mrope_section": tuple(TINY_TEXT.mrope_section)})
    tower = Qwen3TextTower.for_taps(cfg, TAPS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if "embed" not in name else 1))
    return tower.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return QwenTokenizer.from_file(d)


@pytest.fixture()
def encoder(tokenizer):
    return Krea2TextEncoder(random_tower(0, tokenizer.vocab_size), tokenizer, taps=TAPS)


PROMPTS = ["a photo of a red fox sitting in the snow, soft morning light", "",
           "café 東京 🦊", "a cute robot reading a book " * 90]


def test_trimmed_equals_padded_to_512(encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ref, ref_mask = encode_padded_reference(encoder, PROMPTS)
        short, short_mask = encoder.encode(PROMPTS[:3])  # no long prompt: L is small
        full, full_mask = encoder.encode(PROMPTS)
        fixed, fixed_mask = encoder.encode(PROMPTS[:3], length=512)
    assert ref.shape == (4, 512, len(TAPS), 64) and ref_mask.shape == (4, 512)
    tokens = encoder.tokenize(PROMPTS[:3])
    assert short.shape[1] == max(tokens.prompt_lens) + 5 < 40
    err = 0.0
    for i in range(3):
        assert int(short_mask[i].sum()) == int(ref_mask[i].sum())
        err = max(err, (short[i][short_mask[i]] - ref[i][ref_mask[i]]).abs().max().item())
        # padded slots of the exact path are zeros
        assert not short[i][~short_mask[i]].any()
    assert err <= 1e-5, err
    # length=512 gives the official layout: same mask, same real values
    assert torch.equal(fixed_mask, ref_mask[:3])
    assert (fixed[fixed_mask] - ref[:3][ref_mask[:3]]).abs().max().item() <= 1e-5
    # the long prompt fills the block: trimmed L is 512 too
    assert full.shape[1] == 512 and torch.equal(full_mask, ref_mask)
    assert (full[full_mask] - ref[ref_mask]).abs().max().item() <= 1e-5


def test_taps_deeper_than_the_tower_are_refused(encoder, tokenizer):
    with pytest.raises(ValueError, match="need 5 decoder layers"):
        Krea2TextEncoder(encoder.tower, tokenizer, taps=(1, 5))


def test_batch_composition_does_not_change_a_prompt(encoder):
    alone, m1 = encoder.encode([PROMPTS[0]])
    batch, m2 = encoder.encode([PROMPTS[2], PROMPTS[0], ""])
    assert torch.allclose(alone[0][m1[0]], batch[1][m2[1]], atol=1e-5)


def test_repeated_prompt_encoded_once(encoder, monkeypatch):
    calls = []
    orig = encoder._run_compact
    monkeypatch.setattr(encoder, "_run_compact", lambda tokens, which: calls.append(list(which)) or orig(tokens, which))
    h, m = encoder.encode(["", "a fox", ""])
    assert len(calls) == 1 and len(calls[0]) == 2
    assert torch.equal(h[0], h[2])


def test_cache_hit_miss_corrupt_and_other_weights(encoder, tokenizer, tmp_path):
    cache = PromptEmbeddingCache(tmp_path / "cache")
    prompts = ["a red fox", "", "a red fox"]
    first, mask = encoder.encode(prompts, cache=cache)
    assert (cache.hits, cache.misses) == (0, 3)
    files = sorted((tmp_path / "cache").glob("*/*.safetensors"))
    assert len(files) == 2  # one entry per distinct prompt

    # hit: the tower is not run at all
    tower = encoder.tower
    encoder.release()
    assert encoder.tower is None
    again, mask2 = encoder.encode(prompts, cache=cache)
    assert (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(again, first) and torch.equal(mask2, mask)
    with pytest.raises(Krea2kitError, match="released"):
        encoder.encode(["a prompt never seen"], cache=cache)
    encoder.tower = tower

    # corrupt entry: a flipped byte in the tensor data is caught by the checksum and recomputed
    victim = cache.path(encoder.cache_key("a red fox"))
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0xFF
    victim.write_bytes(bytes(raw))
    fixed, fixed_mask = encoder.encode(["a red fox"], cache=cache)
    assert cache.corrupt == 1
    assert torch.allclose(fixed[0][fixed_mask[0]], first[0][mask[0]], atol=1e-5)
    assert cache.get(encoder.cache_key("a red fox")) is not None  # rewritten, valid again
    # garbage file: not even safetensors
    victim.write_bytes(b"garbage")
    encoder.encode(["a red fox"], cache=cache)
    assert cache.corrupt == 2

    # a well-formed entry of the wrong shape under the key is not trusted either
    cache.put(encoder.cache_key("a red fox"), torch.zeros(3, len(TAPS), 64))
    again, again_mask = encoder.encode(["a red fox"], cache=cache)
    assert cache.corrupt == 3 and again[0][again_mask[0]].abs().sum() > 0

    # other weights: a different identity misses, and gives other values
    other = Krea2TextEncoder(random_tower(1, tokenizer.vocab_size), tokenizer, taps=TAPS)
    assert other.identity != encoder.identity
    misses = cache.misses
    o, _ = other.encode(["a red fox"], cache=cache)
    assert cache.misses == misses + 1 and not torch.allclose(o, first[:1, : o.shape[1]])
    # other taps -> other key
    assert encoder.cache_key("x") != Krea2TextEncoder(encoder.tower, tokenizer, taps=(1, 2)).cache_key("x")


def test_weights_identity_tracks_content(tmp_path):
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_file({"w": torch.zeros(1000)}, str(a / "m.safetensors"))
    save_file({"w": torch.ones(1000)}, str(b / "m.safetensors"))  # same header, other data
    ida, idb = weights_identity([a / "m.safetensors"]), weights_identity([b / "m.safetensors"])
    assert ida != idb
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "m.safetensors").write_bytes((a / "m.safetensors").read_bytes())  # a copy: same id
    assert weights_identity([tmp_path / "c" / "m.safetensors"]) == ida
