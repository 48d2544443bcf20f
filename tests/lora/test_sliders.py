"""Sliders: value -> LoRA strengths, ranges, start steps, and their effect on the transformer."""

from __future__ import annotations

import pytest
import torch

from krea2kit.lora.apply import attach_adapters
from krea2kit.lora.sliders import Slider, SliderBinding, combine_strengths
from krea2kit.errors import UsageError

from conftest import run
from test_apply import lora_from


def test_gain_and_points_mappings():
    s = Slider("age", (SliderBinding("age.safetensors", gain=0.5),
                       SliderBinding("smile", points=((-1, -2.0), (0, 0.0), (1, 1.0)))), range=(-4, 4))
    assert s.strengths(2.0) == {"age.safetensors": 1.0, "smile": 2.0}  # extrapolated beyond the last point
    assert s.strengths(-0.5) == {"age.safetensors": -0.25, "smile": -1.0}
    assert s.strengths() == {"age.safetensors": 0.0, "smile": 0.0}  # default 0
    with pytest.raises(UsageError, match="outside its range"):
        s.strengths(5)


def test_from_dict_and_validation():
    s = Slider.from_dict("detail", {"lora": "detail.safetensors", "range": [-5, 5], "default": 1, "start_step": 2})
    assert s.bindings == (SliderBinding("detail.safetensors"),) and s.default == 1.0
    fn = s.strength_fns(3.0)["detail.safetensors"]
    assert [fn(i, 8) for i in range(4)] == [0.0, 0.0, 3.0, 3.0]
    two = Slider.from_dict("mix", {"loras": ["a", {"lora": "b", "gain": -1}]})
    assert two.strengths(2) == {"a": 2.0, "b": -2.0}
    with pytest.raises(UsageError, match="unknown fields"):
        Slider.from_dict("x", {"lora": "a", "rnage": [0, 1]})
    with pytest.raises(UsageError, match="binds no LoRA|needs 'lora'"):
        Slider.from_dict("x", {"range": [0, 1]})
    with pytest.raises(UsageError, match="range"):
        Slider("x", (SliderBinding("a"),), range=(1, 1))
    with pytest.raises(UsageError, match="kind"):
        Slider("x", (SliderBinding("a"),), kind="prompt-blend")


def test_combine_adds_strengths_of_one_lora():
    a = Slider("a", (SliderBinding("l1"),), start_step=1)
    b = Slider("b", (SliderBinding("l1", gain=2), SliderBinding("l2")))
    fns = combine_strengths({"l1": 0.5}, [(a, 1.0), (b, -1.0)])
    assert fns["l1"](0, 4) == pytest.approx(0.5 - 2.0) and fns["l1"](1, 4) == pytest.approx(0.5 + 1.0 - 2.0)
    assert fns["l2"](0, 4) == -1.0


def test_slider_drives_the_transformer_linearly(dit, inputs):
    """A slider's output change is linear in its value at an adapted Linear (negative included),
    and at value 0 the transformer output is bit-identical to the base."""
    lora = lora_from(dit, 51)
    slider = Slider("style", (SliderBinding(lora.name, gain=0.5),))
    base = run(dit, inputs)
    mod = dit.blocks[1].mlp.down
    x = torch.randn(2, 3, mod.in_features, generator=torch.Generator().manual_seed(1))
    y0 = mod(x)
    fns = combine_strengths(sliders=[(slider, 0.0)])
    h = attach_adapters(dit, [(lora, fns[lora.name])])
    assert torch.equal(run(dit, inputs), base)
    h.set_strength(0, combine_strengths(sliders=[(slider, 2.0)])[lora.name])  # strength 1
    y1 = mod(x)
    for v in (-5.0, -2.0, 3.0):
        h.set_strength(0, combine_strengths(sliders=[(slider, v)])[lora.name])
        err = (mod(x) - y0 - (0.5 * v) * (y1 - y0)).abs().max().item()
        assert err <= 1e-5, (v, err)
    h.detach()
