"""``write_lora`` round trips and the ``lora inspect`` / ``lora convert`` commands."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from krea2kit.cli.lora_cmd import lora_group, register_commands
from krea2kit.lora.convert import lora_to_state_dict, write_lora
from krea2kit.lora.formats import load_lora, parse_lora_state_dict
from krea2kit.errors import UsageError, WeightsError

from conftest import random_lora_deltas, tiny_dit
from test_formats import layout_state_dict
from test_apply import mixed_lora


def _same_deltas(a, b, atol=1e-6):
    assert set(a.deltas) == set(b.deltas)
    for n, d in a.deltas.items():
        e = b.deltas[n]
        assert e.kind == d.kind and e.shape == d.shape
        torch.testing.assert_close(e.dense(), d.dense(), rtol=1e-6, atol=atol)
        if d.bias_delta() is not None:
            torch.testing.assert_close(e.bias_delta(), d.bias_delta())
        if d.magnitude is not None:
            assert e.magnitude_axis == d.magnitude_axis
            torch.testing.assert_close(e.magnitude, d.magnitude)


@pytest.mark.parametrize("src_layout,alpha", [("diffusers", None), ("kohya", 2.0), ("lycoris", 8.0), ("comfyui", None)])
@pytest.mark.parametrize("to", ["diffusers", "native", "kohya"])
def test_lora_round_trips_through_every_layout(tmp_path, src_layout, alpha, to):
    dit = tiny_dit()
    sd, meta = layout_state_dict(random_lora_deltas(dit, rank=4, seed=41), src_layout, alpha)
    src = parse_lora_state_dict(sd, meta)
    out = write_lora(src, tmp_path / "x.safetensors", to)
    back = load_lora(out, strict=True)
    assert back.layout == to and back.unmatched == []
    _same_deltas(src, back)
    # and on to a second layout, still the same
    again = load_lora(write_lora(back, tmp_path / "y.safetensors", "kohya" if to != "kohya" else "diffusers"))
    _same_deltas(src, again)


@pytest.mark.parametrize("to", ["native", "kohya"])
def test_lycoris_kinds_dora_and_diffs_round_trip(tmp_path, to):
    src = mixed_lora(tiny_dit())
    back = load_lora(write_lora(src, tmp_path / "m.safetensors", to), strict=True)
    _same_deltas(src, back)


def test_diffusers_layout_refuses_other_kinds_and_mixtures(tmp_path):
    with pytest.raises(WeightsError, match="plain LoRA or LoKr factors only") as err:
        write_lora(mixed_lora(tiny_dit()), tmp_path / "m.safetensors", "diffusers")
    assert "dora, full, loha" in str(err.value)
    lora = mixed_lora(tiny_dit())
    lora.deltas = {k: d for k, d in lora.deltas.items() if d.kind in ("lora", "lokr") and d.magnitude is None}
    plain = parse_lora_state_dict(layout_state_dict(random_lora_deltas(tiny_dit(), rank=2, seed=44), "kohya")[0])
    for name, d in plain.deltas.items():
        lora.deltas.setdefault(name, d)  # LoKr on blocks.0.mlp.up, plain LoRA on the others
    with pytest.raises(WeightsError, match="one adapter kind per file") as err:
        write_lora(lora, tmp_path / "m.safetensors", "diffusers")
    assert "lokr x1" in str(err.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_written_keys_follow_each_layout():
    dit = tiny_dit()
    sd, meta = layout_state_dict(random_lora_deltas(dit, rank=4, seed=42), "kohya", 2.0)
    src = parse_lora_state_dict(sd, meta)
    t, m = lora_to_state_dict(src, "kohya")
    assert "lora_unet_txtfusion_layerwise_blocks_0_mlp_gate.lora_down.weight" in t
    assert float(t["lora_unet_blocks_0_attn_wq.alpha"]) == 2.0
    t, m = lora_to_state_dict(src, "native")
    assert "diffusion_model.txtfusion.refiner_blocks.1.attn.wo.lora_B.weight" in t
    assert not any(k.endswith(".alpha") for k in t)  # scale 2/4 folded into lora_B
    up = src.deltas["blocks.0.attn.wq"].factors["up"]
    torch.testing.assert_close(t["diffusion_model.blocks.0.attn.wq.lora_B.weight"], up * 0.5)
    t, m = lora_to_state_dict(src, "diffusers", dtype=torch.bfloat16)
    assert "transformer.text_fusion.layerwise_blocks.0.ff.gate.lora_A.weight" in t
    assert t["transformer.img_in.lora_A.weight"].dtype == torch.bfloat16
    assert t["transformer.img_in.lora_B.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(t["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
                               (up.float() * 0.5).to(torch.bfloat16))
    # tiny's projector has rank 1 (narrower than 4): the config keeps scale 1 for every module
    cfg = json.loads(m["lora_adapter_metadata"])
    assert cfg["transformer.r"] == cfg["transformer.lora_alpha"] == 4
    assert cfg["transformer.rank_pattern"] == cfg["transformer.alpha_pattern"] == {"text_fusion.projector": 1}


# ---------------------------------------------------------------------------
# CLI

@pytest.fixture
def kohya_file(tmp_path):
    dit = tiny_dit()
    sd, _ = layout_state_dict(random_lora_deltas(dit, rank=4, seed=43), "kohya", 2.0)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 2)
    path = tmp_path / "slider.safetensors"
    save_file(sd, str(path), metadata={"ss_base_model_version": "krea2", "ss_krea2_dit_variant": "raw",
                                       "trigger_words": "old person"})
    return path


def test_cli_inspect_text_and_json(kohya_file):
    runner = CliRunner()
    res = runner.invoke(lora_group, ["inspect", str(kohya_file)])
    assert res.exit_code == 0, res.output
    assert "layout:      kohya" in res.output and "modules:     56" in res.output
    assert "ss_krea2_dit_variant=raw" in res.output and "old person" in res.output
    assert "unmatched:   1" in res.output
    res = runner.invoke(lora_group, ["inspect", str(kohya_file), "--json"])
    info = json.loads(res.output)
    assert info["layout"] == "kohya" and info["modules"] == 56 and info["ranks"] == {"1": 1, "4": 55}
    assert info["unmatched_keys"] == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    res = runner.invoke(lora_group, ["inspect", str(kohya_file), "--strict"])
    assert isinstance(res.exception, WeightsError)


def test_cli_convert(kohya_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    res = runner.invoke(lora_group, ["convert", str(kohya_file), "--to", "diffusers", str(out), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "kohya -> diffusers" in res.output and "1 unmatched" in res.output
    with safe_open(str(out), "pt") as fh:
        keys = list(fh.keys())
        assert all(k.startswith("transformer.") for k in keys) and len(keys) == 112
        assert fh.get_tensor(keys[0]).dtype == torch.bfloat16
        assert fh.metadata()["trigger_words"] == "old person"
    res = runner.invoke(lora_group, ["convert", str(kohya_file), "--to", "native", str(out)])
    assert isinstance(res.exception, UsageError)  # exists, no --overwrite
    res = runner.invoke(lora_group, ["convert", str(kohya_file), "--to", "native", str(out), "--overwrite"])
    assert res.exit_code == 0 and load_lora(out).layout == "native"


def test_cli_refuses_other_models(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, str(path))
    res = CliRunner().invoke(lora_group, ["inspect", str(path)])
    assert isinstance(res.exception, WeightsError) and "SDXL" in str(res.exception)


def test_register_commands_adds_the_group():
    import click

    @click.group()
    def cli():
        pass

    register_commands(cli)
    assert "lora" in cli.commands
    assert set(cli.commands["lora"].commands) == {"inspect", "convert"}
