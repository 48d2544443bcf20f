"""The native Qwen3-VL text tower against transformers' Qwen3-VL (oracle), and its loader.

Measured on CPU, fp32 (tiny random config, every weight randomised, norms included):
tapped hidden states vs ``Qwen3VLTextModel`` with explicit valid-token position ids:
max abs error 0.0 for the padded official block (every position, padding included) and
1.7e-6 for the exact unpadded path (bound 1e-5). Without the explicit positions the
oracle's suffix states differ by 1.6 (the trap in the reference README).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from krea2kit.conditioning import Krea2TextEncoder, load_text_encoder
from krea2kit.errors import WeightsError
from krea2kit.models.text_encoder import (
    KREA2_TAPS,
    PRESETS,
    Qwen3TextConfig,
    Qwen3TextTower,
    config_from_dict,
    layers_needed,
    load_text_tower,
)
from krea2kit.models.tokenizer import PromptTemplate, QwenTokenizer
from support.oracles import encode_padded_reference
from support.presets import TINY_TEXT

transformers = pytest.importorskip("transformers")

TINY = TINY_TEXT
TOL = 1e-5


def hf_text_config(cfg: Qwen3TextConfig, vocab: int):
    return transformers.Qwen3VLTextConfig(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True})


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every weight random; norms around 1 (not 1 exactly) so a mis-wired norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return QwenTokenizer.from_file(tok_dir)


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    model = transformers.Qwen3VLTextModel(hf_text_config(TINY, tokenizer.vocab_size)).eval()
    randomise(model, 0)
    return model


def tower_from_hf(hf_model, taps) -> Qwen3TextTower:
    cfg = Qwen3TextConfig(**{**TINY.to_dict(), "vocab_size": hf_model.config.vocab_size,
                             "mrope_section": tuple(TINY.mrope_section)})
    tower = Qwen3TextTower.for_taps(cfg, taps)
    wanted = tower.state_dict()
    tower.load_state_dict({k: v for k, v in hf_model.state_dict().items() if k in wanted}, strict=True)
    return tower.eval()


PROMPTS = ["a red fox in the snow", "", "café 東京の夜景 🦊 naïve",
           "a cute robot reading a book " * 12]  # the last one is cut at max_length 48


def hf_states(hf_model, ids, mask):
    # The trap (reference README): transformers 5.x does not derive positions from the mask,
    # so give the valid-token positions explicitly, on the 3 mRoPE axes.
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = hf_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos[None].expand(3, -1, -1),
                       output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("taps", [(1, 3, 6), (0, 2, 4)], ids=["with-final-norm", "shallow-no-norm"])
def test_tapped_states_match_transformers(hf_model, tokenizer, taps):
    template = PromptTemplate(max_length=48)
    tower = tower_from_hf(hf_model, taps)
    assert tower.num_layers == max(taps) and (tower.norm is not None) == (max(taps) == 6)
    enc = Krea2TextEncoder(tower, tokenizer, taps=taps, template=template)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = enc.tokenize(PROMPTS)
        ids, mask = tokens.padded()
        ref = hf_states(hf_model, ids, mask)
        ref = torch.stack([ref[t] for t in taps], dim=2)[:, tokens.prefix_len:]
        ref_mask = mask[:, tokens.prefix_len:]
        # 1) the official padded block, every position (padding rows included)
        padded, pmask = encode_padded_reference(enc, PROMPTS)
        # 2) the exact path: real tokens only
        trimmed, tmask = enc.encode(PROMPTS)
    assert tokens.truncated[3] > 0 and ref_mask.sum(1).tolist()[1] == tokens.suffix_len
    assert torch.equal(pmask, ref_mask)
    err_padded = (padded - ref).abs().max().item()
    assert err_padded <= TOL, err_padded
    err_trim = 0.0
    for i in range(len(PROMPTS)):
        assert int(tmask[i].sum()) == int(ref_mask[i].sum())
        err_trim = max(err_trim, (trimmed[i][tmask[i]] - ref[i][ref_mask[i]]).abs().max().item())
    assert err_trim <= TOL, err_trim
    # the suffix really sits after the padding and differs from the prompt tokens
    assert not ref_mask[0, -tokens.suffix_len - 1] and ref_mask[0, -tokens.suffix_len:].all()


def test_text_rope_is_plain_rope_over_full_head_dim(hf_model):
    """Interleaved mRoPE with the same position on T, H, W == half-split RoPE over head_dim."""
    rot = hf_model.rotary_emb
    pos = torch.tensor([[0, 1, 2, 7, 300, 545], [5, 5, 9, 40, 41, 1000]])
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = rot(x, pos[None].expand(3, -1, -1))
    tower = Qwen3TextTower(TINY, num_layers=0, final_norm=False)
    cos, sin = tower.rope(pos, torch.float32)
    assert torch.allclose(cos[:, 0], cos_ref, atol=1e-6) and torch.allclose(sin[:, 0], sin_ref, atol=1e-6)
    # and different positions on H/W would change it (the test can fail)
    cos3, _ = rot(x, torch.stack([pos, pos + 1, pos + 2]))
    assert not torch.allclose(cos3, cos_ref)


def test_bf16_rope_frequencies_match_module_to_bf16(hf_model):
    """The official encoder casts the transformers module to bf16, rotary buffer included."""
    import copy

    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    tower = Qwen3TextTower(TINY, num_layers=0, final_norm=False)
    exact = tower.inv_freq()
    tower.inv_freq_dtype = torch.bfloat16
    rounded = tower.inv_freq()
    assert torch.equal(rounded, hf16.rotary_emb.inv_freq.float())
    assert not torch.equal(rounded, exact)


def test_bf16_matches_official_module_to_bf16(hf_model, tokenizer):
    """In bf16 the padded block equals transformers after ``.to(bfloat16)`` (what encoder.py
    runs) bit for bit, with ``official_rope``; without it the rotary phases differ. Measured:
    0.0 vs 0.078 (values up to ~6); the exact path is within 1 bf16 ulp (0.031)."""
    import copy

    taps = (1, 3, 6)
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    prompts = ["a red fox in the snow " * 8, "café"]
    errs = {}
    for official in (True, False):
        enc = Krea2TextEncoder(tower_from_hf(hf_model, taps).to(torch.bfloat16), tokenizer, taps=taps,
                               official_rope=official, template=PromptTemplate(max_length=96))
        tokens = enc.tokenize(prompts)
        ids, mask = tokens.padded()
        ref = hf_states(hf16, ids, mask)
        ref = torch.stack([ref[t] for t in taps], dim=2)[:, tokens.prefix_len:]
        got, _ = encode_padded_reference(enc, prompts)
        errs[official] = (got.float() - ref.float()).abs().max().item()
        if official:
            trimmed, tmask = enc.encode(prompts)
            rmask = mask[:, tokens.prefix_len:]
            for i in range(2):
                diff = (trimmed[i][tmask[i]].float() - ref[i][rmask[i]].float()).abs()
                assert diff.max().item() <= 0.0625 and diff.mean().item() < 2e-3
    assert errs[True] == 0.0 and errs[False] > 0.0


def test_layers_needed():
    assert layers_needed(KREA2_TAPS, 36) == (35, False)  # 35 of 36 layers, no final norm
    assert layers_needed((0,), 36) == (0, False)
    assert layers_needed((3, 36), 36) == (36, True)
    with pytest.raises(ValueError):
        layers_needed((37,), 36)
    big = PRESETS["qwen3-vl-4b"]
    assert (big.num_hidden_layers, big.hidden_size, big.intermediate_size, big.num_attention_heads,
            big.num_key_value_heads, big.head_dim, big.rope_theta, big.mrope_section) == (
        36, 2560, 9728, 32, 8, 128, 5_000_000.0, (24, 20, 20))


def test_config_from_hf_json_both_spellings():
    v457 = {"model_type": "qwen3_vl", "text_config": {
        "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 5000000, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                "rope_type": "default"}, "hidden_act": "silu"}}
    assert config_from_dict(v457) == PRESETS["qwen3-vl-4b"]
    v5 = json.loads(json.dumps(v457))
    tc = v5["text_config"]
    tc.pop("rope_theta"), tc.pop("rope_scaling")
    tc["rope_parameters"] = {"rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "rope_type": "default"}
    assert config_from_dict(v5) == PRESETS["qwen3-vl-4b"]


# ---------------------------------------------------------------------------
# Loading: HF sharded folder vs ComfyUI single file

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer, tok_dir):
    cfg = transformers.Qwen3VLConfig(
        text_config=hf_text_config(TINY, tokenizer.vocab_size).to_dict(),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, deepstack_visual_indexes=[0], num_position_embeddings=16))
    model = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    randomise(model, 1)
    d = tmp_path_factory.mktemp("hf") / "text_encoder"
    model.save_pretrained(d, max_shard_size="60KB")
    tokdir = d.parent / "tokenizer"
    tokdir.mkdir()
    for f in tok_dir.iterdir():
        (tokdir / f.name).write_bytes(f.read_bytes())
    return d, model


def test_hf_sharded_and_comfy_single_file_load_identically(hf_folder, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from krea2kit.models import weights

    folder, model = hf_folder
    assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded
    read: list[str] = []
    orig = weights.Checkpoint.iter_tensors

    def spy(self, keys=None):
        for k, t in orig(self, keys):
            read.append(k)
            yield k, t

    monkeypatch.setattr(weights.Checkpoint, "iter_tensors", spy)
    taps = (2, 5)  # 5 of 6 layers, no final norm: the Krea 2 situation in small
    enc_hf = load_text_encoder(folder, taps=taps)  # tokenizer found in ../tokenizer
    assert read and not any("visual" in k or "lm_head" in k or "layers.5." in k
                            or k.endswith("language_model.norm.weight") for k in read)
    assert enc_hf.tower.num_layers == 5 and enc_hf.tower.norm is None

    # ComfyUI layout: language under "model.", vision under "visual." (or "model.visual.")
    sd = model.state_dict()
    prompts = ["a red fox", "café 🦊", ""]
    h1, m1 = enc_hf.encode(prompts)
    for vision in ("visual.", "model.visual."):
        comfy = {}
        for k, v in sd.items():
            if k.startswith("model.language_model."):
                comfy["model." + k[len("model.language_model."):]] = v.contiguous()
            elif k.startswith("model.visual."):
                comfy[vision + k[len("model.visual."):]] = v.contiguous()
        file = tmp_path / f"qwen3vl_tiny_{vision[:-1]}.safetensors"
        save_file(comfy, str(file))
        enc_c = load_text_encoder(file, taps=taps, tokenizer_path=folder.parent / "tokenizer")
        h2, m2 = enc_c.encode(prompts)
        assert torch.equal(m1, m2) and torch.equal(h1, h2)
        assert enc_hf.identity != enc_c.identity  # different files -> different cache identity
    # and the loaded tower is the HF language model
    tokens = enc_hf.tokenize(prompts)
    ids, mask = tokens.padded()
    ref = hf_states(model.model.language_model, ids, mask)
    ref = torch.stack([ref[t] for t in taps], dim=2)[:, tokens.prefix_len:]
    pm = mask[:, tokens.prefix_len:]
    for i in range(len(prompts)):
        assert (h1[i][m1[i]] - ref[i][pm[i]]).abs().max().item() <= TOL


def test_config_json_and_shape_inference_agree(hf_folder):
    folder, _ = hf_folder
    a = load_text_tower(folder, taps=(1,))
    assert a.config_source == "config.json" and a.layout.startswith("transformers")
    shapes_cfg = a.tower.config
    from krea2kit.models.text_encoder import config_from_shapes
    from krea2kit.models.weights import open_checkpoint

    ck = open_checkpoint(folder)
    inferred = config_from_shapes({k: ck.shape(k) for k in ck.keys()}, "model.language_model.")
    assert inferred == shapes_cfg


def test_bf16_load_keeps_one_dtype(hf_folder):
    folder, _ = hf_folder
    enc = load_text_encoder(folder, taps=(2,), dtype=torch.bfloat16)
    assert {p.dtype for p in enc.tower.parameters()} == {torch.bfloat16}
    assert enc.tower.inv_freq_dtype == torch.bfloat16  # official bf16 rotary frequencies
    h, m = enc.encode(["a red fox"])
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()


def test_wrong_files_are_refused(tmp_path, hf_folder):
    from safetensors.torch import save_file

    folder, _ = hf_folder
    tok = folder.parent / "tokenizer"
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
               "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}, str(vae))
    with pytest.raises(WeightsError, match="not a Qwen3-VL text encoder.*VAE"):
        load_text_encoder(vae, tokenizer_path=tok)
    dit = tmp_path / "dit.safetensors"
    save_file({"txtfusion.projector.weight": torch.zeros(1, 12)}, str(dit))
    with pytest.raises(WeightsError, match="Krea 2 transformer"):
        load_text_encoder(dit, tokenizer_path=tok)
    qwen25 = tmp_path / "qwen25.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.self_attn.q_proj.bias": torch.zeros(4),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(qwen25))
    with pytest.raises(WeightsError, match="Qwen2.5-VL"):
        load_text_encoder(qwen25, tokenizer_path=tok)
    # no tokenizer anywhere near a single file
    lone = tmp_path / "lone"
    lone.mkdir()
    te = lone / "te.safetensors"
    te.write_bytes(next(folder.glob("*.safetensors")).read_bytes())
    with pytest.raises(WeightsError, match="tokenizer.json"):
        load_text_encoder(te)
    with pytest.raises(WeightsError, match="tokenizer.json not found"):
        load_text_encoder(folder, tokenizer_path=tmp_path / "nowhere")
    # a quantized ComfyUI-style file
    q = tmp_path / "q.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.self_attn.q_norm.weight": torch.zeros(4),
               "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(())}, str(q))
    with pytest.raises(WeightsError, match="quantized"):
        load_text_encoder(q, tokenizer_path=tok)
    # taps deeper than the model
    with pytest.raises(WeightsError, match="out of range"):
        load_text_encoder(folder, taps=KREA2_TAPS)
