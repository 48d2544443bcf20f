"""Every LoRA layout of the ecosystem parses to the same ΔW per native module."""

from __future__ import annotations

import json

import pytest
import torch

from krea2kit.lora.formats import (
    LATENT_IN_FEATURES, diffusers_to_native, native_to_diffusers, parse_lora_state_dict, unflatten_native,
)
from krea2kit.errors import WeightsError

from conftest import linears, random_lora_deltas, tiny_dit


def _flat(s: str) -> str:
    return s.replace(".", "_")


def layout_state_dict(pairs, layout: str, alpha: float | None = None) -> tuple[dict, dict]:
    """Store {native: (down, up)} in a layout; alpha (same for all) where the layout has it."""
    sd, meta = {}, {}
    for n, (down, up) in pairs.items():
        d = native_to_diffusers(n)
        if layout == "diffusers":
            sd[f"transformer.{d}.lora_A.weight"], sd[f"transformer.{d}.lora_B.weight"] = down, up
        elif layout == "diffusers-bare":
            sd[f"{d}.lora_A.weight"], sd[f"{d}.lora_B.weight"] = down, up
        elif layout in ("comfyui", "peft-base", "bare-native"):
            p = {"comfyui": "diffusion_model.", "peft-base": "base_model.model.", "bare-native": ""}[layout]
            sd[f"{p}{n}.lora_A.weight"], sd[f"{p}{n}.lora_B.weight"] = down, up
            if alpha is not None:
                sd[f"{p}{n}.alpha"] = torch.tensor(alpha)
        elif layout == "kohya":
            sd[f"lora_unet_{_flat(n)}.lora_down.weight"], sd[f"lora_unet_{_flat(n)}.lora_up.weight"] = down, up
            if alpha is not None:
                sd[f"lora_unet_{_flat(n)}.alpha"] = torch.tensor(alpha)
        elif layout == "lycoris":
            sd[f"lycoris_{_flat(d)}.lora_down.weight"], sd[f"lycoris_{_flat(d)}.lora_up.weight"] = down, up
            if alpha is not None:
                sd[f"lycoris_{_flat(d)}.alpha"] = torch.tensor(alpha)
        elif layout == "krea-training":
            sd[f"{n}.lora_A"], sd[f"{n}.lora_B"] = down, up
        else:
            raise AssertionError(layout)
    if alpha is not None and layout.startswith("diffusers"):
        r = next(iter(pairs.values()))[0].shape[0]
        # modules narrower than the rank (the (1, 3) projector) get their own r via rank_pattern
        rank_pattern = {native_to_diffusers(n): p[0].shape[0] for n, p in pairs.items() if p[0].shape[0] != r}
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": r, "transformer.lora_alpha": alpha,
                                                    "transformer.rank_pattern": rank_pattern,
                                                    "transformer.target_modules": ["to_q"]})
    if alpha is not None and layout == "krea-training":
        r = next(iter(pairs.values()))[0].shape[0]
        meta.update(rank=str(r), lora_alpha=str(alpha), lora_scale="1.0")
    return sd, meta


LAYOUTS = {"diffusers": "diffusers", "diffusers-bare": "diffusers", "comfyui": "native", "peft-base": "native",
           "bare-native": "native", "kohya": "kohya", "lycoris": "lycoris", "krea-training": "krea-training"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_every_layout_gives_the_explicit_delta(layout, alpha):
    dit = tiny_dit()
    pairs = random_lora_deltas(dit, rank=4, seed=1)
    sd, meta = layout_state_dict(pairs, layout, alpha)
    lora = parse_lora_state_dict(sd, meta)
    assert lora.layout == LAYOUTS[layout]
    assert set(lora.deltas) == set(linears(dit)) and len(lora.deltas) == 56  # tiny: 16 + 32 + 8 Linears
    assert lora.unmatched == []
    for n, (down, up) in pairs.items():
        d = lora.deltas[n]
        assert d.kind == "lora" and d.rank == down.shape[0]
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        if layout == "krea-training" and alpha is not None:
            scale = alpha / 4  # one global rank in the metadata (krea-2 runtime: lora_alpha / rank)
        torch.testing.assert_close(d.dense(), scale * (up @ down), rtol=0, atol=1e-7)


def test_kohya_names_unflatten_by_vocabulary():
    assert unflatten_native("txtfusion_layerwise_blocks_1_mlp_gate") == "txtfusion.layerwise_blocks.1.mlp.gate"
    assert unflatten_native("txtfusion_refiner_blocks_0_attn_wo") == "txtfusion.refiner_blocks.0.attn.wo"
    assert unflatten_native("blocks_27_attn_gate") == "blocks.27.attn.gate"
    for flat, native in [("first", "first"), ("last_linear", "last.linear"), ("tmlp_0", "tmlp.0"), ("tmlp_2", "tmlp.2"),
                         ("tproj_1", "tproj.1"), ("txtmlp_1", "txtmlp.1"), ("txtmlp_3", "txtmlp.3"),
                         ("txtfusion_projector", "txtfusion.projector")]:
        assert unflatten_native(flat) == native
    assert unflatten_native("blocks_0_attn_qknorm") is None  # not a Linear
    assert unflatten_native("txtfusion_layerwise_blocks_0") is None


def test_module_names_agree_with_the_transformer_loader_on_all_264_linears():
    from krea2kit.models.dit import PRESETS, build_meta
    from krea2kit.models import dit_loader

    names = list(linears(build_meta(PRESETS["krea2-raw"])))
    assert len(names) == 264  # 28*8 block + 33 txtfusion + 7 standalone Linears
    for n in names:
        assert native_to_diffusers(n) == dit_loader.native_to_diffusers(n)
        assert diffusers_to_native(native_to_diffusers(n)) == n


def test_peft_metadata_alpha_and_patterns():
    dit = tiny_dit()
    pairs = random_lora_deltas(dit, rank=4, seed=2)
    sd, _ = layout_state_dict(pairs, "diffusers")
    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"transformer_blocks.0.attn.to_q": 2},
           "rank_pattern": {}, "target_modules": ["to_q"]}
    for meta_cfg in (cfg, {f"transformer.{k}": v for k, v in cfg.items()}):  # model- and pipeline-saved forms
        lora = parse_lora_state_dict(sd, {"lora_adapter_metadata": json.dumps(meta_cfg)})
        assert lora.deltas["blocks.0.attn.wq"].scale == 0.5
        assert lora.deltas["blocks.1.attn.wq"].scale == 2.0
        assert lora.deltas["txtfusion.refiner_blocks.0.attn.wq"].scale == 2.0
    rs = parse_lora_state_dict(sd, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True})})
    assert rs.deltas["first"].scale == pytest.approx(8 / 2)


def test_krea_training_metadata_scale():
    dit = tiny_dit()
    pairs = random_lora_deltas(dit, rank=4, seed=3)
    sd, _ = layout_state_dict(pairs, "krea-training")
    lora = parse_lora_state_dict(sd, {"rank": "4", "lora_alpha": "8", "lora_scale": "0.75", "trigger_word": "tarot"})
    assert lora.layout == "krea-training"
    assert all(d.scale == pytest.approx(1.5) for d in lora.deltas.values())
    assert lora.trigger_words == ["tarot"]


# ---------------------------------------------------------------------------
# fused q/k/v (SimpleTuner ``fuse_qkv_projections``): unequal sizes in the main blocks

def _rows(dense: torch.Tensor, in_f: int):
    kv = (dense.shape[0] - in_f) // 2
    return dense[:in_f], dense[in_f:in_f + kv], dense[in_f + kv:]


@pytest.mark.parametrize("block", ["transformer_blocks_1", "text_fusion_layerwise_blocks_0"])
def test_fused_qkv_lora_splits_into_q_k_v(block):
    dit = tiny_dit()
    native_head = "blocks.1" if block.startswith("transformer") else "txtfusion.layerwise_blocks.0"
    shapes = [tuple(dit.get_submodule(f"{native_head}.attn.{w}").weight.shape) for w in ("wq", "wk", "wv")]
    out = sum(s[0] for s in shapes)
    in_f = shapes[0][1]
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, in_f, generator=g), torch.randn(out, 4, generator=g)
    sd = {f"lycoris_{block}_attn_to_qkv.lora_down.weight": down, f"lycoris_{block}_attn_to_qkv.lora_up.weight": up,
          f"lycoris_{block}_attn_to_qkv.alpha": torch.tensor(2.0)}
    lora = parse_lora_state_dict(sd)
    fused = 0.5 * up @ down
    for w, expect, shape in zip(("wq", "wk", "wv"), _rows(fused, in_f), shapes):
        d = lora.deltas[f"{native_head}.attn.{w}"]
        assert d.shape == shape and d.kind == "lora"
        torch.testing.assert_close(d.dense(), expect, rtol=0, atol=1e-6)
    if block.startswith("transformer"):
        assert shapes[0][0] != shapes[1][0]  # GQA: q is wider than k/v
    assert any("fused" in n for n in lora.notes)


def test_fused_qkv_lokr_aligned_split_stays_lokr():
    # main block of tiny: q 64 rows, k/v 32 rows each -> fused (128, 64). W2 has 16 rows, so
    # both boundaries (64, 96) fall between W2 blocks and each part is kron(W1[rows], W2).
    g = torch.Generator().manual_seed(5)
    w1a, w1b = torch.randn(8, 2, generator=g), torch.randn(2, 2, generator=g)
    w2 = torch.randn(16, 32, generator=g)
    sd = {"lycoris_transformer_blocks_0_attn_to_qkv.lokr_w1_a": w1a,
          "lycoris_transformer_blocks_0_attn_to_qkv.lokr_w1_b": w1b,
          "lycoris_transformer_blocks_0_attn_to_qkv.lokr_w2": w2,
          "lycoris_transformer_blocks_0_attn_to_qkv.alpha": torch.tensor(1.0)}
    lora = parse_lora_state_dict(sd)
    fused = torch.kron(w1a @ w1b, w2) * 0.5
    assert fused.shape == (128, 64)
    for w, expect in zip(("wq", "wk", "wv"), _rows(fused, 64)):
        d = lora.deltas[f"blocks.0.attn.{w}"]
        assert d.kind == "lokr" and d.scale == 0.5
        torch.testing.assert_close(d.dense(), expect, rtol=0, atol=1e-6)


def test_fused_qkv_lokr_unaligned_boundaries_become_exact_dense_rows():
    # W2 with 48 rows: the q/k boundary (64) falls inside a W2 block.
    g = torch.Generator().manual_seed(6)
    w1 = torch.randn(2, 2, generator=g)
    w2 = torch.randn(64, 32, generator=g)  # kron -> (128, 64)
    sd = {"lycoris_transformer_blocks_0_attn_to_qkv.lokr_w1": w1[:2, :2],
          "lycoris_transformer_blocks_0_attn_to_qkv.lokr_w2": w2}
    lora = parse_lora_state_dict(sd)
    fused = torch.kron(w1, w2)
    # c = 64: boundaries 64 (ok) and 96 (not a multiple of 64) -> dense
    assert lora.deltas["blocks.0.attn.wq"].kind == "lokr"
    assert lora.deltas["blocks.0.attn.wk"].kind == "full"
    for w, expect in zip(("wq", "wk", "wv"), _rows(fused, 64)):
        torch.testing.assert_close(lora.deltas[f"blocks.0.attn.{w}"].dense(), expect, rtol=0, atol=0)


def test_fused_qkv_loha_splits_exactly():
    g = torch.Generator().manual_seed(7)
    t = {k: torch.randn(*s, generator=g) for k, s in
         {"hada_w1_a": (128, 3), "hada_w1_b": (3, 64), "hada_w2_a": (128, 3), "hada_w2_b": (3, 64)}.items()}
    sd = {f"transformer.transformer_blocks.1.attn.to_qkv.{k}": v for k, v in t.items()}
    sd["transformer.transformer_blocks.1.attn.to_qkv.alpha"] = torch.tensor(6.0)
    lora = parse_lora_state_dict(sd)
    fused = 2.0 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    for w, expect in zip(("wq", "wk", "wv"), _rows(fused, 64)):
        d = lora.deltas[f"blocks.1.attn.{w}"]
        assert d.kind == "loha"
        torch.testing.assert_close(d.dense(), expect, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# LoKr / LoHa scale conventions, DoRA axes

def test_lokr_scale_rules():
    g = torch.Generator().manual_seed(8)
    w1, w2 = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    # both halves full: scale 1 whatever alpha says (LyCORIS rank_scale)
    lora = parse_lora_state_dict({"diffusion_model.blocks.0.attn.wq.lokr_w1": w1,
                                  "diffusion_model.blocks.0.attn.wq.lokr_w2": w2,
                                  "diffusion_model.blocks.0.attn.wq.alpha": torch.tensor(123.0)})
    torch.testing.assert_close(lora.deltas["blocks.0.attn.wq"].dense(), torch.kron(w1, w2))
    # factored w1: scale = alpha / rank
    w1a, w1b = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    lora = parse_lora_state_dict({"diffusion_model.blocks.0.attn.wq.lokr_w1_a": w1a,
                                  "diffusion_model.blocks.0.attn.wq.lokr_w1_b": w1b,
                                  "diffusion_model.blocks.0.attn.wq.lokr_w2": w2,
                                  "diffusion_model.blocks.0.attn.wq.alpha": torch.tensor(1.0)})
    torch.testing.assert_close(lora.deltas["blocks.0.attn.wq"].dense(), 0.5 * torch.kron(w1a @ w1b, w2))


@pytest.mark.parametrize("key,shape,axis", [
    ("dora_scale", (64, 1), "out"),       # LyCORIS wd_on_out
    ("dora_scale", (1, 32), "in"),        # kohya-style [1, in]
    ("magnitude", (64,), "out"),          # ai-toolkit
    ("lora_magnitude_vector.weight", (64,), "out"),  # PEFT
])
def test_dora_axis_from_shape_and_math(key, shape, axis):
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(4, 32, generator=g), torch.randn(64, 4, generator=g)
    m = torch.rand(*shape, generator=g) + 0.5
    sd = {"diffusion_model.blocks.0.mlp.down.lora_A.weight": down,
          "diffusion_model.blocks.0.mlp.down.lora_B.weight": up,
          f"diffusion_model.blocks.0.mlp.down.{key}": m}
    # mlp.down of a Krea block is (features, mlp_hidden); any (64, 32) stands in for it here
    d = parse_lora_state_dict(sd).deltas["blocks.0.mlp.down"]
    assert d.magnitude_axis == axis
    w = torch.randn(64, 32, generator=g)
    merged = w + up @ down
    norm = merged.norm(dim=1, keepdim=True) if axis == "out" else merged.norm(dim=0, keepdim=True)
    expect = m.reshape(norm.shape) * merged / norm
    torch.testing.assert_close(w + d.effective_delta(w), expect, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# refusals, unmatched keys, metadata

@pytest.mark.parametrize("keys,what", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "SDXL"),
    (["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], "SDXL"),
    (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "FLUX"),
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "FLUX"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "text-encoder"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "text-encoder"),
])
def test_files_for_other_models_are_refused(keys, what):
    sd = {k: torch.zeros(2, 2) for k in keys}
    with pytest.raises(WeightsError, match=what):
        parse_lora_state_dict(sd, path="x.safetensors")


@pytest.mark.parametrize("key", ["first.weight", "diffusion_model.first.weight", "diffusion_model.first.diff"])
def test_expanded_first_control_adapter_is_refused(key):
    sd = {key: torch.zeros(64, 2 * LATENT_IN_FEATURES),
          "diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 2)}
    with pytest.raises(WeightsError, match="control"):
        parse_lora_state_dict(sd)


def test_unmatched_keys_are_listed_and_strict_refuses():
    sd = {"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 2),
          "diffusion_model.blocks.0.attn.qknorm.qnorm.lora_A.weight": torch.zeros(2, 32),
          "something_else": torch.zeros(1),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)}
    lora = parse_lora_state_dict(sd)
    assert list(lora.deltas) == ["blocks.0.attn.wq"]
    assert sorted(lora.unmatched) == sorted(k for k in sd if ".attn.wq." not in k)
    with pytest.raises(WeightsError, match="3 keys match no Krea 2 module"):
        parse_lora_state_dict(sd, strict=True)
    with pytest.raises(WeightsError, match="no Krea 2 LoRA tensors"):
        parse_lora_state_dict({"foo.bar": torch.zeros(1)})


def test_base_model_reported_and_trigger_words_read():
    sd = {"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.zeros(2, 64),
          "lora_unet_blocks_0_attn_wq.lora_up.weight": torch.zeros(64, 2)}
    lora = parse_lora_state_dict(sd, {"ss_krea2_dit_variant": "raw", "ss_base_model_version": "krea2",
                                      "trigger_words": '["vintage tarot style", "tarot"]'})
    assert "ss_krea2_dit_variant=raw" in lora.base_model and "ss_base_model_version=krea2" in lora.base_model
    assert lora.trigger_words == ["vintage tarot style", "tarot"]
    assert lora.layout == "kohya"


def test_malformed_factors_are_refused():
    with pytest.raises(WeightsError, match="do not chain"):
        parse_lora_state_dict({"diffusion_model.first.lora_A.weight": torch.zeros(2, 64),
                               "diffusion_model.first.lora_B.weight": torch.zeros(64, 3)})
    with pytest.raises(WeightsError, match="incomplete"):
        parse_lora_state_dict({"diffusion_model.first.lora_A.weight": torch.zeros(2, 64)})
    with pytest.raises(WeightsError, match="convolution"):
        parse_lora_state_dict({"lora_unet_first.lora_down.weight": torch.zeros(2, 64, 1, 1),
                               "lora_unet_first.lora_mid.weight": torch.zeros(2, 2, 3, 3),
                               "lora_unet_first.lora_up.weight": torch.zeros(64, 2, 1, 1)})
    with pytest.raises(WeightsError, match="two adapters"):
        parse_lora_state_dict({"diffusion_model.first.lora_A.weight": torch.zeros(2, 64),
                               "diffusion_model.first.lora_B.weight": torch.zeros(64, 2),
                               "transformer.img_in.lora_A.weight": torch.zeros(2, 64),
                               "transformer.img_in.lora_B.weight": torch.zeros(64, 2)})


# ---------------------------------------------------------------------------
# full-size key sets (meta tensors: names and shapes only, no memory)

def _full_model_linears() -> dict[str, tuple[int, int]]:
    from krea2kit.models.dit import PRESETS, build_meta

    return {n: tuple(m.weight.shape) for n, m in linears(build_meta(PRESETS["krea2-turbo"])).items()}


def test_official_style_lora_covers_all_264_linears_of_the_full_model():
    """The official style LoRAs: 528 ``transformer.*`` lora_A/lora_B tensors, rank 32, no alpha
    (``krea/Krea-2-LoRA-*``); and musubi-tuner's ``lora_unet_*`` + alpha for the same modules."""
    full = _full_model_linears()
    official, musubi = {}, {}
    for n, (o, i) in full.items():
        d = native_to_diffusers(n)
        official[f"transformer.{d}.lora_A.weight"] = torch.empty(32, i, device="meta")
        official[f"transformer.{d}.lora_B.weight"] = torch.empty(o, 32, device="meta")
        musubi[f"lora_unet_{_flat(n)}.lora_down.weight"] = torch.empty(16, i, device="meta")
        musubi[f"lora_unet_{_flat(n)}.lora_up.weight"] = torch.empty(o, 16, device="meta")
        musubi[f"lora_unet_{_flat(n)}.alpha"] = torch.tensor(8.0)
    assert len(official) == 528
    lora = parse_lora_state_dict(official, strict=True)
    assert lora.layout == "diffusers" and len(lora) == 264
    assert {n: d.shape for n, d in lora.deltas.items()} == full
    assert lora.ranks() == {32: 264} and lora.scales() == {1.0: 264}
    assert lora.coverage() == {"blocks": 224, "txtfusion_blocks": 32, "standalone": 8}
    kohya = parse_lora_state_dict(musubi, strict=True)
    assert kohya.layout == "kohya" and set(kohya.deltas) == set(full) and kohya.scales() == {0.5: 264}


# ---------------------------------------------------------------------------
# each layout is a registered format part

def _builtin_formats():
    from krea2kit.plugins import Host

    return Host(load_entry_points=False).registry.all("lora_format")


def test_every_builtin_layout_is_registered_through_the_hook_and_detects_its_own_files(tmp_path):
    from safetensors.torch import save_file

    from krea2kit.lora.formats import BUILTIN_LAYOUTS
    from krea2kit.contracts import LoraFormat
    from krea2kit.parts.lora_formats import open_lora

    formats = {d.name: d for d in _builtin_formats()}
    assert set(formats) == {layout.name for layout in BUILTIN_LAYOUTS}
    assert all(d.plugin == "krea2kit" for d in formats.values())
    pairs = random_lora_deltas(tiny_dit(), rank=2, seed=11)
    for layout, expect in LAYOUTS.items():
        sd, meta = layout_state_dict(pairs, layout, alpha=1.0)
        save_file(sd, str(tmp_path / f"{layout}.safetensors"), metadata=meta)
        fmt = formats[expect].load_part()
        assert isinstance(fmt, LoraFormat)
        assert fmt.detect(list(sd), meta) is True
        assert fmt.detect([], {}) is False
        assert fmt.parse(tmp_path / f"{layout}.safetensors").layout == expect
        lora = open_lora(tmp_path / f"{layout}.safetensors", list(formats.values()))
        reference = parse_lora_state_dict(sd, meta)
        assert lora.layout == expect and list(lora.deltas) == list(reference.deltas)
        for n, d in lora.deltas.items():
            torch.testing.assert_close(d.dense(), reference.deltas[n].dense(), rtol=0, atol=0)
    # a file only kohya names is not detected by the diffusers format, and the reverse
    kohya_keys = list(layout_state_dict(pairs, "kohya")[0])
    assert not formats["diffusers"].load_part().detect(kohya_keys, {})
    assert not formats["kohya"].load_part().detect(list(layout_state_dict(pairs, "diffusers")[0]), {})


def test_plugin_formats_are_asked_before_the_builtin_ones(tmp_path):
    """A plugin layout that claims the same names as a built-in one wins, because plugins
    are asked first; without it the built-in reader reads the file."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from krea2kit.lora.formats import KeyLayout, LayoutFormat, native
    from krea2kit.parts.lora_formats import ask_order, open_lora
    from krea2kit.registry import LoraFormatDescriptor

    mine = KeyLayout(name="mine", prefixes=("diffusion_model.",), to_native=native.LAYOUT.to_native)
    plugin = replace(LoraFormatDescriptor(name="zz-mine", summary="test",
                                          load=lambda options=None, context=None: LayoutFormat(mine)),
                     plugin="a-plugin")
    builtins = _builtin_formats()
    assert [d.plugin for d in ask_order(builtins + [plugin])][0] == "a-plugin"
    sd, meta = layout_state_dict(random_lora_deltas(tiny_dit(), rank=2, seed=12), "comfyui", alpha=1.0)
    save_file(sd, str(tmp_path / "c.safetensors"), metadata=meta)
    assert open_lora(tmp_path / "c.safetensors", builtins + [plugin]).layout == "mine"
    assert open_lora(tmp_path / "c.safetensors", builtins).layout == "native"


def test_a_file_no_format_detects_is_refused_with_the_reason(tmp_path):
    from safetensors.torch import save_file

    from krea2kit.parts.lora_formats import open_lora

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8)},
              str(tmp_path / "sdxl.safetensors"))
    assert not any(d.load_part().detect(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], {})
                   for d in _builtin_formats())
    with pytest.raises(WeightsError, match="SDXL"):
        open_lora(tmp_path / "sdxl.safetensors", _builtin_formats())


def test_krea_training_needs_every_pair_bare_and_unprefixed():
    """The trainer's metadata scale applies only to its own files: one ``.weight`` pair or a
    prefix makes the file native (and the metadata is not a scale then)."""
    pairs = random_lora_deltas(tiny_dit(), rank=4, seed=13)
    sd, _ = layout_state_dict(pairs, "krea-training")
    meta = {"rank": "4", "lora_alpha": "8"}
    assert parse_lora_state_dict(sd, meta).layout == "krea-training"
    one = next(k for k in sd if k.endswith(".lora_A"))
    mixed = {(k + ".weight" if k in (one, one[:-1] + "B") else k): v for k, v in sd.items()}
    lora = parse_lora_state_dict(mixed, meta)
    assert lora.layout == "native" and lora.scales() == {1.0: 56}
    assert not any("mixed" in n for n in lora.notes)  # bare and .weight names are both native spellings
