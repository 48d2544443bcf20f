"""Runtime adapters and merging on the tiny Krea 2 transformer (every weight random, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from krea2kit.lora.formats import LoraFile, parse_lora_state_dict
from krea2kit.lora.apply import StepSchedule, attach_adapters, merge_into
from krea2kit.errors import WeightsError

from conftest import random_lora_deltas, run, tiny_dit
from test_formats import LAYOUTS, layout_state_dict


def lora_from(dit, seed=1, layout="comfyui", alpha=None, rank=4) -> LoraFile:
    sd, meta = layout_state_dict(random_lora_deltas(dit, rank=rank, seed=seed), layout, alpha)
    return parse_lora_state_dict(sd, meta, name=f"lora{seed}")


def mixed_lora(dit) -> LoraFile:
    """LoKr, LoHa, DoRA and a full diff (with bias) on a few modules."""
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {
        # blocks.0.mlp.up: (hidden, 64); LoKr kron((a,b),(c,d)) with b*d = 64
        "diffusion_model.blocks.0.mlp.up.lokr_w1": r(8, 4),
        "diffusion_model.blocks.0.mlp.up.lokr_w2_a": r(dit.blocks[0].mlp.up.weight.shape[0] // 8, 2),
        "diffusion_model.blocks.0.mlp.up.lokr_w2_b": r(2, 16),
        "diffusion_model.blocks.0.mlp.up.alpha": torch.tensor(1.0),
        "lora_unet_blocks_1_attn_gate.hada_w1_a": r(64, 3), "lora_unet_blocks_1_attn_gate.hada_w1_b": r(3, 64),
        "lora_unet_blocks_1_attn_gate.hada_w2_a": r(64, 3), "lora_unet_blocks_1_attn_gate.hada_w2_b": r(3, 64),
        "lora_unet_blocks_1_attn_gate.alpha": torch.tensor(1.5),
        "diffusion_model.blocks.1.attn.wo.lora_A.weight": r(4, 64), "diffusion_model.blocks.1.attn.wo.lora_B.weight": r(64, 4),
        "diffusion_model.blocks.1.attn.wo.dora_scale": torch.rand(64, 1, generator=g) + 0.5,
        "diffusion_model.last.linear.diff": r(64, 64), "diffusion_model.last.linear.diff_b": r(64),
    }
    return parse_lora_state_dict(sd, name="mixed")


def manual_edit(dit, loras_and_strengths):
    """Reference: a copy of the model with W += s * (effective ΔW) written into the weights."""
    ref = copy.deepcopy(dit)
    with torch.no_grad():
        for lora, s in loras_and_strengths:
            for name, d in lora.deltas.items():
                mod = ref.get_submodule(name)
                base = dit.get_submodule(name).weight
                mod.weight += s * d.effective_delta(base)
                if d.bias_delta() is not None:
                    mod.bias += s * d.bias_delta()
    return ref


def test_runtime_equals_edited_weights_and_detach_restores(dit, inputs):
    lora = lora_from(dit)
    base = run(dit, inputs)
    expect = run(manual_edit(dit, [(lora, 0.7)]), inputs)
    h = attach_adapters(dit, [(lora, 0.7)])
    assert len(h.modules) == 56
    got = run(dit, inputs)
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured 2.5e-6
    assert (got - base).abs().max().item() > 1e-2  # the LoRA does something
    h.detach()
    assert torch.equal(run(dit, inputs), base)


def test_stacking_several_loras_of_every_kind(dit, inputs):
    a, b, m = lora_from(dit, 1), lora_from(dit, 2, layout="kohya", alpha=2.0), mixed_lora(dit)
    spec = [(a, 0.5), (b, -1.25), (m, 0.8)]
    expect = run(manual_edit(dit, spec), inputs)
    with attach_adapters(dit, spec) as h:
        got = run(dit, inputs)
        assert h.names == ["lora1", "lora2", "mixed"]
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured 3.1e-6


def test_merge_equals_runtime_and_restore_is_bit_exact(dit, inputs):
    a, m = lora_from(dit, 3), mixed_lora(dit)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with attach_adapters(dit, [(a, 0.9), (m, 1.1)]):
        runtime = run(dit, inputs)
    merged = merge_into(dit, [(a, 0.9), (m, 1.1)])
    got = run(dit, inputs)
    err = (got - runtime).abs().max().item()
    assert err <= 1e-5, err  # measured 3.2e-6
    assert not torch.equal(dit.last.linear.bias, before["last.linear.bias"])  # diff_b merged
    merged.restore()
    after = dit.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("backup", ["cpu", "device"])
def test_restore_is_bit_exact_in_bf16(backup):
    dit = tiny_dit(5).to(torch.bfloat16)
    lora = lora_from(dit, 4)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    m = merge_into(dit, lora, strength=0.37, backup=backup)
    assert not torch.equal(dit.blocks[0].attn.wq.weight, before["blocks.0.attn.wq.weight"])
    m.restore()
    assert all(torch.equal(dit.state_dict()[k], before[k]) for k in before)


def test_restore_without_backup_subtracts(dit):
    lora = lora_from(dit, 4)
    before = dit.blocks[0].mlp.down.weight.clone()
    m = merge_into(dit, lora, strength=2.0, backup="none")
    m.restore()
    assert (dit.blocks[0].mlp.down.weight - before).abs().max().item() <= 1e-6


def test_step_ranges(dit, inputs):
    lora = lora_from(dit, 6)
    base = run(dit, inputs)
    with attach_adapters(dit, [(lora, 1.0)]):
        full = run(dit, inputs)
    h = attach_adapters(dit, [(lora, StepSchedule(1.0, start=2, end=4))])
    seen = []
    for step in range(6):
        h.set_step(step, 6)
        out = run(dit, inputs)
        seen.append("on" if torch.equal(out, full) else "off" if torch.equal(out, base) else "?")
    h.detach()
    assert seen == ["off", "off", "on", "on", "off", "off"]
    sched = StepSchedule(2.0, start=1, end=-1)  # all but the first and the last step
    assert [sched(i, 8) for i in range(8)] == [0, 2, 2, 2, 2, 2, 2, 0]


def test_strength_changes_per_image_and_per_sample(dit, inputs):
    lora = lora_from(dit, 7)
    base = run(dit, inputs)
    with attach_adapters(dit, [(lora, 1.0)]):
        full = run(dit, inputs)
    h = attach_adapters(dit, [lora])
    h.set_strength("lora7", 0.0)
    assert torch.equal(run(dit, inputs), base)
    h.set_strength(0, lambda step, total: 1.0 if step >= 1 else 0.0)
    h.set_step(1, 4)
    assert torch.equal(run(dit, inputs), full)
    # per-sample strengths: image 0 without the LoRA, image 1 with it (text fusion sees B*L rows)
    h.set_strength(0, torch.tensor([0.0, 1.0]))
    out = run(dit, inputs)
    h.set_strength(0, torch.tensor([0.0, 1.0, 1.0]))  # not one per batch row
    with pytest.raises(ValueError, match="per-sample strengths"):
        run(dit, inputs)
    h.detach()
    assert torch.equal(out[0], base[0])
    err = (out[1] - full[1]).abs().max().item()
    assert err <= 1e-6, err


@pytest.mark.parametrize("which", ["lora", "dora"])
def test_output_change_is_linear_in_strength(dit, which):
    """Slider linearity: Δy(s) = s · Δy(1) at one adapted Linear, negative values included."""
    lora = lora_from(dit, 8) if which == "lora" else mixed_lora(dit)
    name = "blocks.0.attn.wq" if which == "lora" else "blocks.1.attn.wo"
    mod = dit.get_submodule(name)
    x = torch.randn(3, 5, mod.in_features, generator=torch.Generator().manual_seed(0))
    y0 = mod(x)
    h = attach_adapters(dit, [lora])
    y1 = mod(x)
    for s in (-5.0, -1.0, 0.5, 2.0, 5.0):
        h.set_strength(0, s)
        err = (mod(x) - y0 - s * (y1 - y0)).abs().max().item()
        assert err <= 1e-5 * max(1, abs(s)), (s, err)
    h.detach()


def test_same_delta_in_every_layout_gives_identical_outputs(dit, inputs):
    pairs = random_lora_deltas(dit, rank=4, seed=9)
    outs = {}
    for layout in LAYOUTS:
        sd, meta = layout_state_dict(pairs, layout, alpha=None)
        with attach_adapters(dit, [(parse_lora_state_dict(sd, meta), 0.8)]):
            outs[layout] = run(dit, inputs)
    ref = outs["diffusers"]
    assert all(torch.equal(o, ref) for o in outs.values())


def test_wrong_shapes_and_missing_modules(dit):
    sd = {"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 128),
          "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 2)}
    with pytest.raises(WeightsError, match="model's weight is 64x64"):
        attach_adapters(dit, parse_lora_state_dict(sd))
    sd = {"diffusion_model.blocks.9.attn.wq.lora_A.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.9.attn.wq.lora_B.weight": torch.zeros(64, 2),
          "diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 2)}
    lora = parse_lora_state_dict(sd)
    with pytest.raises(WeightsError, match="not in this transformer"):
        attach_adapters(dit, lora)
    h = attach_adapters(dit, lora, missing="skip")
    assert h.modules == ["blocks.0.attn.wq"]
    h.detach()
    with pytest.raises(ValueError, match="fixed strength"):
        merge_into(dit, [(lora, StepSchedule(1.0, 2))], missing="skip")
