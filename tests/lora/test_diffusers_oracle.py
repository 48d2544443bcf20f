"""Oracle: a LoRA loaded into diffusers' ``Krea2Transformer2DModel`` (its own PEFT path) and
into krea2kit's transformer (built by ``load_dit`` from the same saved weights) gives the same
outputs. Tiny config, fp32, every weight random (LoRA B factors too: PEFT zero-inits them).
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from krea2kit.lora.convert import write_lora  # noqa: E402
from krea2kit.lora.formats import load_lora  # noqa: E402
from krea2kit.lora.apply import attach_adapters, merge_into  # noqa: E402
from krea2kit.models.dit_loader import load_dit  # noqa: E402
from support.presets import TINY_DIT  # noqa: E402

from conftest import diffusers_run, randomize, run, tiny_inputs  # noqa: E402

# The authors' default (diffusers trainer) plus ff.gate: all Linears, as the official style LoRAs.
TARGETS = ["img_in", "final_layer.linear", "to_q", "to_k", "to_v", "to_out.0", "to_gate", "ff.gate", "ff.up",
           "ff.down", "text_fusion.projector", "txt_in.linear_1", "txt_in.linear_2", "time_embed.linear_1",
           "time_embed.linear_2", "time_mod_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import Krea2Transformer2DModel
    from peft import LoraConfig

    tmp = tmp_path_factory.mktemp("oracle")
    cfg = TINY_DIT
    torch.manual_seed(0)
    ref = randomize(Krea2Transformer2DModel(**cfg.to_diffusers()), seed=31).eval()
    ref.save_pretrained(tmp / "transformer")
    # A PEFT LoRA trained "by diffusers": r=4, alpha=8 (scale 2), projector narrower (rank 1).
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                               rank_pattern={"text_fusion.projector": 1}), adapter_name="style")
    g = torch.Generator().manual_seed(32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_lora_adapter(tmp / "peft", adapter_name="style")
    bare = tmp / "peft" / "pytorch_lora_weights.safetensors"
    # The pipeline-saved / official form: ``transformer.`` keys, component-prefixed metadata.
    from safetensors import safe_open

    with safe_open(str(bare), "pt") as fh:
        meta = fh.metadata()
    cfg_json = json.loads(meta["lora_adapter_metadata"])
    official = tmp / "official.safetensors"
    save_file({f"transformer.{k}": v for k, v in load_file(str(bare)).items()}, str(official),
              metadata={"format": "pt", "lora_adapter_metadata":
                        json.dumps({f"transformer.{k}": v for k, v in cfg_json.items()})})
    ours = load_dit(tmp / "transformer")
    return dict(tmp=tmp, cfg=cfg, bare=bare, official=official, ours=ours)


def _diffusers_with(setup, lora_path, strength: float, *, native=False):
    from diffusers import Krea2Pipeline, Krea2Transformer2DModel

    ref = Krea2Transformer2DModel.from_pretrained(setup["tmp"] / "transformer").eval()
    # diffusers' own loading path: Krea2LoraLoaderMixin.lora_state_dict (with the non-diffusers
    # converter for diffusion_model.* keys) and PeftAdapterMixin.load_lora_adapter.
    sd, meta = Krea2Pipeline.lora_state_dict(str(lora_path), return_lora_metadata=True)
    ref.load_lora_adapter(sd, prefix="transformer", adapter_name="x", metadata=meta)
    ref.set_adapters(["x"], weights=[strength])
    return ref


@pytest.mark.parametrize("strength", [1.0, 0.6, -1.5])
def test_official_form_matches_diffusers(setup, strength):
    inputs = tiny_inputs(setup["cfg"], seed=3)
    ref = _diffusers_with(setup, setup["official"], strength)
    expect = diffusers_run(ref, setup["cfg"], inputs)
    ours = setup["ours"]
    base = run(ours, inputs)
    lora = load_lora(setup["official"])
    assert lora.layout == "diffusers" and len(lora) == 56
    assert lora.deltas["txtfusion.projector"].rank == 1 and lora.deltas["txtfusion.projector"].scale == 8.0
    assert lora.deltas["blocks.0.attn.wq"].scale == 2.0
    with attach_adapters(ours, [(lora, strength)]):
        got = run(ours, inputs)
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured 0 (strength 1), 1.3e-6 (0.6), 1.9e-6 (-1.5)
    assert (expect - base).abs().max().item() > 1e-2
    with merge_into(ours, lora, strength):
        err_merged = (run(ours, inputs) - expect).abs().max().item()
    assert err_merged <= 1e-5, err_merged


def test_model_saved_bare_form_matches(setup):
    inputs = tiny_inputs(setup["cfg"], seed=4)
    expect = diffusers_run(_diffusers_with(setup, setup["official"], 1.0), setup["cfg"], inputs)
    lora = load_lora(setup["bare"])  # save_lora_adapter's form: bare diffusers names, unprefixed metadata
    with attach_adapters(setup["ours"], [lora]):
        got = run(setup["ours"], inputs)
    assert (got - expect).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["diffusers", "native"])
def test_our_converted_files_load_in_diffusers(setup, layout, tmp_path):
    """``lora convert --to diffusers|native`` output goes through diffusers' own loader (the
    native form through its ``diffusion_model.`` converter) and gives the same outputs."""
    inputs = tiny_inputs(setup["cfg"], seed=5)
    src = load_lora(setup["official"])
    # fold the scale into the factors for the native form: diffusers' converter rejects .alpha
    if layout == "native":
        for d in src.deltas.values():
            d.factors["up"] = d.factors["up"] * d.scale
            d.scale = 1.0
    out = write_lora(src, tmp_path / f"{layout}.safetensors", layout)
    ref = _diffusers_with(setup, out, 0.8)
    expect = diffusers_run(ref, setup["cfg"], inputs)
    with attach_adapters(setup["ours"], [(load_lora(out), 0.8)]):
        got = run(setup["ours"], inputs)
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured 1.4e-6
