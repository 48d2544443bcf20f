"""The ``transformers`` expander backend on a tiny random Qwen3 causal LM (saved to a temporary
folder with the nano model's Qwen tokenizer): greedy output is deterministic and equals an
independent argmax loop over the model's logits; seeded sampling repeats per seed; folders
that cannot generate (the nano text encoder, a single file) are refused before any load."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from krea2kit.contracts import LoadContext
from krea2kit.errors import ExpanderError, WeightsError
from krea2kit.expander.answers import clean_answer
from krea2kit.settings import Settings

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # importing transformers: ~10 s cold
transformers = pytest.importorskip("transformers")

NANO_ENCODER = Path(__file__).resolve().parents[2] / "src/krea2kit/nano/weights/text_encoder"
SYSTEM = "Describe the picture."


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Qwen3ForCausalLM over the nano tokenizer's 614 tokens. Its head never favours a
    special token (those rows are zero, the others scaled up), so greedy decoding writes text
    to max_tokens instead of stopping at once."""
    import torch

    folder = tmp_path_factory.mktemp("tiny-qwen3")
    config = transformers.Qwen3Config(vocab_size=614, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      tie_word_embeddings=False, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[600:] = 0  # the nano tokenizer's added (special) tokens
        model.lm_head.weight[:600] *= 20
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(NANO_ENCODER / name, folder / name)
    return folder


def load(folder: Path, **expander):
    from krea2kit.expander.local_transformers import load as load_backend

    settings = Settings.model_validate({"expander": expander})
    return load_backend(None, LoadContext(role="prompt_expander", name="transformers", location=str(folder),
                                          settings=settings))


def oracle_greedy(folder: Path, prompt: str, n: int) -> str:
    """Argmax of the full forward pass, one token at a time (no cache, no generate())."""
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return clean_answer(tok.decode(out, skip_special_tokens=True))


def test_greedy_is_deterministic_and_matches_an_argmax_loop(tiny_lm):
    expander = load(tiny_lm)
    assert expander.model is None  # loading the part reads no weights: cache hits never pay for them
    first = expander.expand("a red fox", system_prompt=SYSTEM, seed=0, temperature=0.0, max_tokens=12)
    again = expander.expand("a red fox", system_prompt=SYSTEM, seed=5, temperature=0.0, max_tokens=12)
    assert first == again and first  # greedy ignores the seed
    assert first == oracle_greedy(tiny_lm, "a red fox", 12)
    assert expander.identity.startswith("transformers:") and str(tiny_lm) not in expander.identity


def test_sampling_repeats_per_seed_and_leaves_the_global_rng_alone(tiny_lm):
    import torch

    expander = load(tiny_lm)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = expander.expand("a cat", system_prompt=SYSTEM, seed=1, temperature=1.0, max_tokens=12)
    assert torch.equal(torch.rand(1), before)  # sampling ran in a forked RNG
    assert a == expander.expand("a cat", system_prompt=SYSTEM, seed=1, temperature=1.0, max_tokens=12)
    others = {expander.expand("a cat", system_prompt=SYSTEM, seed=s, temperature=1.0, max_tokens=12) for s in (2, 3, 4)}
    assert others - {a}  # another seed, another sample


def test_nano_text_encoder_is_refused_with_what_is_missing():
    with pytest.raises(WeightsError) as info:
        load(NANO_ENCODER)
    text = str(info.value)
    assert str(NANO_ENCODER) in text and "config.json" in text and "lm_head.weight" in text
    assert "Qwen3-VL-4B-Instruct" in text and "expander.weights" in text  # the fix


def test_truncated_and_single_file_models_are_refused(tiny_lm, tmp_path):
    import json

    cut = tmp_path / "cut"
    shutil.copytree(tiny_lm, cut)
    config = json.loads((cut / "config.json").read_text())
    config["num_hidden_layers"] = 4  # the file holds 2
    (cut / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"decoder layers 2\.\.3"):
        load(cut)
    with pytest.raises(WeightsError, match="single file"):
        load(tiny_lm / "model.safetensors")
    # the user config's expander.weights wins over the run's text encoder location
    assert load(NANO_ENCODER, weights=str(tiny_lm)).folder == tiny_lm


def test_missing_extra_names_it(tiny_lm, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ExpanderError, match=r"krea2kit\[expander\]"):
        load(tiny_lm)


def test_qwen3_vl_layout_with_a_tied_head(tmp_path):
    """The real folder's layout: Qwen3VLForConditionalGeneration (``model.language_model.*``,
    ``model.visual.*``), its LM head tied to the embedding (no lm_head.weight, as in
    Qwen3-VL-4B-Instruct). Accepted, run text-only with its own class, deterministic."""
    import torch

    from krea2kit.models.weights import open_checkpoint

    config = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=614, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=16),
        tie_word_embeddings=True, image_token_id=612, video_token_id=613, vision_start_token_id=609)
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(config)
    tok = transformers.AutoTokenizer.from_pretrained(str(NANO_ENCODER))
    blank = [i for i in range(600) if not tok.decode([i]).strip()]  # a tied random head repeats its input:
    with torch.no_grad():  # the template ends in "\n", so whitespace (and special tokens) never win
        table = model.get_input_embeddings().weight
        table[600:] = 0
        table[blank] = 0
        table[:600] *= 20
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(NANO_ENCODER / name, tmp_path / name)
    assert not any(k.endswith("lm_head.weight") for k in open_checkpoint(tmp_path).keys())
    expander = load(tmp_path)
    first = expander.expand("a fox", system_prompt=SYSTEM, seed=0, temperature=0.0, max_tokens=8)
    assert first and first == expander.expand("a fox", system_prompt=SYSTEM, seed=9, temperature=0.0, max_tokens=8)
    assert type(expander.model).__name__ == "Qwen3VLForConditionalGeneration"
