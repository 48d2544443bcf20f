"""The preflight refusal offers the text encoder quantized on load when it is part of the peak,
with its estimate, alone and together with a transformer change; through the API and the CLI."""

from __future__ import annotations

import pytest

from krea2kit import memory
from krea2kit.api import Session, load_recipe
from krea2kit.errors import EXIT_USAGE, RecipeError

CUDA = {"device": "cuda:0", "dtype": "bfloat16"}


def _plan(*overrides: str):
    session = Session()
    return session, session.plan(load_recipe(None, overrides=["model.preset=krea2-turbo", *overrides]),
                                 prompts=["a red ball"])


def test_override_equals_the_recipe_key():
    session, plan = _plan("model.offload=blocks")
    _, keyed = _plan("model.offload=blocks", "model.text_encoder_weights_dtype=fp8")
    by_arg = memory.estimate(plan, session.settings, **CUDA, text_encoder_weights_dtype="fp8")
    by_key = memory.estimate(keyed, session.settings, **CUDA)
    assert by_arg.phases == by_key.phases and by_arg.text_encoder_weights_dtype == "fp8"
    assert memory.estimate(plan, session.settings, **CUDA).text_encoder_weights_dtype == "auto"


def test_blocks_streamed_leave_the_text_encoder_as_the_peak_and_the_refusal_offers_it(monkeypatch):
    session, plan = _plan("model.offload=blocks")
    est = memory.estimate(plan, session.settings, **CUDA)
    assert est.peak_phase == "encoding"  # two blocks on the device: encoding the prompt is the peak
    fp8 = memory.estimate(plan, session.settings, **CUDA, text_encoder_weights_dtype="fp8")
    int8 = memory.estimate(plan, session.settings, **CUDA, text_encoder_weights_dtype="int8")
    # Qwen3-VL-4B's tapped layers: 7.84 GB in bf16, 4.31 GB with fp8 projections (the embedding
    # table stays bf16), so the encoding phase falls below the streamed denoise/decode ones
    assert fp8.peak < 0.6 * est.peak and int8.peak < 0.6 * est.peak
    options = dict(memory.alternatives(plan, session.settings, est))
    assert options['model.text_encoder_weights_dtype = "fp8"'] == fp8.peak
    assert options['model.text_encoder_weights_dtype = "int8"'] == int8.peak

    free = (est.peak + fp8.peak) // 2
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: free)
    with pytest.raises(RecipeError) as info:
        memory.preflight(plan, session.settings, **CUDA, warn=print)
    assert info.value.exit_code == EXIT_USAGE
    assert f'model.text_encoder_weights_dtype = "fp8" (≈{memory.gb(fp8.peak)})' in info.value.hint


def test_a_released_text_encoder_is_offered_only_with_the_change_that_makes_it_the_peak():
    session, plan = _plan()  # Turbo frees the encoder after encoding; the peak is the transformer's
    est = memory.estimate(plan, session.settings, **CUDA)
    assert est.peak_phase != "encoding" and est.text_encoder_released
    options = dict(memory.alternatives(plan, session.settings, est))
    assert 'model.text_encoder_weights_dtype = "fp8"' not in options  # alone it would save nothing
    pair = 'model.offload = "blocks" and model.text_encoder_weights_dtype = "fp8"'
    _, both = _plan("model.offload=blocks", "model.text_encoder_weights_dtype=fp8")
    assert options[pair] == memory.estimate(both, session.settings, **CUDA).peak
    assert options[pair] < options['model.offload = "blocks"']
    assert min(options.values()) == options[pair]  # listed first: the smallest peak


def test_no_text_encoder_option_when_the_recipe_quantizes_it_already():
    session, plan = _plan("model.offload=none", "model.text_encoder_weights_dtype=int8")
    est = memory.estimate(plan, session.settings, **CUDA)
    names = [name for name, _ in memory.alternatives(plan, session.settings, est)]
    assert names and not any("text_encoder_weights_dtype" in n for n in names)
    session, kept = _plan("model.offload=none")  # kept loaded through denoising: part of the peak
    est = memory.estimate(kept, session.settings, **CUDA)
    assert 'model.text_encoder_weights_dtype = "fp8"' in dict(memory.alternatives(kept, session.settings, est))


def test_cli_refusal_names_the_text_encoder_option(cli_inproc, monkeypatch):
    import krea2kit.pipeline as pipeline

    session, plan = _plan("model.offload=blocks")
    fp8 = memory.estimate(plan, session.settings, **CUDA, text_encoder_weights_dtype="fp8").peak
    monkeypatch.setattr(pipeline, "pick_device", lambda requested: "cuda:0")
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: fp8 + 10**8)
    monkeypatch.setattr(pipeline.Pipeline, "part", lambda *a, **k: pytest.fail("a part was loaded"))
    res = cli_inproc("run", "--prompt", "a red ball", "--set", "model.preset=krea2-turbo",
                     "--set", "model.offload=blocks", "--set", "model.dtype=bfloat16")
    assert res.code == EXIT_USAGE, res.stderr
    assert f'model.text_encoder_weights_dtype = "fp8" (≈{memory.gb(fp8)})' in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
