"""The training memory plan: built on the inference estimator, its activation term checked
against what autograd really keeps for a nano block, its table in the README computed by it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from krea2kit.train.memory_plan import (
    adapter_params, block_activation_bytes, plan_for_recipe, readme_table, training_memory_plan,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from krea2kit.api import Session
    from krea2kit.settings import CacheSettings, Settings

    return Session(settings=Settings(cache=CacheSettings(dir=str(tmp_path_factory.mktemp("plan-cache")))))


@pytest.fixture(scope="module")
def nano_dit():
    from importlib.resources import files

    import krea2kit
    from krea2kit.models.dit_loader import load_dit

    return load_dit(str(files(krea2kit) / "nano/weights/raw")).float().requires_grad_(False)


def _saved_bytes(block, x, tvec, rope, exclude) -> int:
    """Bytes autograd keeps for the backward pass (each storage once; weights and tables excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, tvec, rope, None)
    return sum(seen.values())


def test_block_activation_term_matches_what_autograd_keeps(nano_dit, one_thread):
    cfg, block, rank = nano_dit.config, nano_dit.blocks[0], 4
    g = torch.Generator().manual_seed(0)
    adapters, handles = [], []
    for mod in block.modules():
        if isinstance(mod, torch.nn.Linear):  # a trainable LoRA on every Linear, as training adds
            down = torch.nn.Parameter(torch.randn(rank, mod.in_features, generator=g) * 0.01)
            up = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
            adapters += [down, up]
            handles.append(mod.register_forward_hook(
                lambda m, args, out, d=down, u=up: out + F.linear(F.linear(args[0], d), u)))
    try:
        for tokens in (256, 1024):
            gh = 16
            rope = nano_dit.rope_table(0, gh, tokens // gh)
            exclude = {p.untyped_storage().data_ptr() for p in [*block.parameters(), *adapters]}
            exclude |= {rope.cos.untyped_storage().data_ptr(), rope.sin.untyped_storage().data_ptr()}
            x = torch.randn(1, tokens, cfg.features, generator=g, requires_grad=True)
            tvec = torch.randn(1, 1, 6 * cfg.features, generator=g)
            measured = _saved_bytes(block, x, tvec, rope, exclude)
            predicted = tokens * block_activation_bytes(cfg.features, cfg.kvheads * cfg.head_dim, cfg.mlp_dim,
                                                        cfg.heads, rank=rank, dtype_bytes=4, cuda=False)
            assert 0.95 <= predicted / measured <= 1.10, (tokens, predicted, measured)  # measured: 1.04
    finally:
        for h in handles:
            h.remove()


def test_adapter_parameters_are_what_the_trainer_creates(nano_dit):
    from krea2kit.train.adapters import AdapterConfig, AdapterSet

    for targets in (("all",), ("attention",), ("blocks.*.mlp.*",)):
        made = AdapterSet(nano_dit, AdapterConfig(kind="lora", rank=4, alpha=4.0, targets=targets))
        try:
            assert adapter_params(nano_dit.config, 4, list(targets)) == made.num_params(), targets
        finally:
            made.detach()


def test_plan_is_the_inference_estimate_plus_training(session):
    from krea2kit.memory import estimate

    def plan(**kw):
        args = dict(resolution=1024, rank=32, session=session)
        args.update(kw)
        return training_memory_plan("krea2-raw", **args)

    base = plan()
    rows = {r.part: r for r in base.rows}
    run_plan = session.plan(text='prompt = "x"\n[model]\npreset = "krea2-raw"\n')
    est = {p.name: p.nbytes for p in estimate(run_plan, session.settings, device="cuda", dtype="bfloat16").parts}
    assert rows["transformer (frozen)"].nbytes == est["transformer weights"]  # the same estimator
    assert rows["text encoder weights"].nbytes == est["text encoder weights"]
    assert rows["LoRA weights"].nbytes == base.trainable_params * 4
    assert rows["optimizer state"].nbytes == base.trainable_params * 8  # two fp32 AdamW moments
    assert base.peak == base.phases["training"] and base.phases["caching"] < base.phases["training"]
    # every lever moves its own row the right way
    fp8, blocks = plan(weights_dtype="fp8"), plan(offload="blocks")
    assert {r.part: r for r in fp8.rows}["transformer (frozen)"].nbytes < rows["transformer (frozen)"].nbytes * 0.55
    assert blocks.peak < fp8.peak < base.peak
    no_ckpt = plan(gradient_checkpointing=False)
    assert {r.part: r for r in no_ckpt.rows}["activations"].nbytes > 5 * rows["activations"].nbytes
    assert plan(resolution=768).peak < base.peak and plan(rank=16).trainable_params * 2 == base.trainable_params
    assert plan(optimizer="adamw8bit").peak < base.peak
    assert plan(targets=["attention"]).trainable_params < base.trainable_params
    lines = "\n".join(base.lines())
    assert "transformer (frozen)" in lines and "peak" in lines
    assert base.to_json()["peak_bytes"] == base.peak


def test_plan_for_a_training_recipe(session, tmp_path):
    from krea2kit.train.schema import TrainRecipe

    recipe = TrainRecipe.model_validate({
        "base": {"preset": "krea2-nano-raw", "device": "cpu"}, "dataset": {"path": "d", "resolution": 64},
        "adapter": {"rank": 8, "targets": ["attention"]}, "gradient_checkpointing": True})
    p = plan_for_recipe(recipe, session=session)
    assert (p.preset, p.resolution, p.rank, p.gradient_checkpointing) == ("krea2-nano-raw", 64, 8, True)
    assert p.peak < 1e9 and p.trainable_params > 0
    slider = TrainRecipe.model_validate({"base": {"preset": "krea2-nano-raw"}, "slider": {
        "target": "a circle", "positive": "a large circle", "negative": "a small circle", "width": 64, "height": 64}})
    assert plan_for_recipe(slider, session=session).resolution == 64


def test_first_fit_picks_what_the_table_says(session):
    from krea2kit.train.memory_plan import first_fit

    on24 = first_fit("krea2-raw", resolution=1024, rank=32, card_gib=24, session=session)
    assert on24 is not None and on24.weights_dtype == "fp8" and on24.offload == "none"
    assert first_fit("krea2-raw", resolution=1024, rank=32, card_gib=16, session=session) is None
    streamed = first_fit("krea2-raw", resolution=1024, rank=32, card_gib=16, session=session, offload=True)
    assert streamed is not None and streamed.offload == "blocks"


@pytest.mark.slow
def test_readme_table_is_computed(session):
    table = readme_table(session=session)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert table in readme, "README.md's training memory table is stale: paste readme_table()'s output"
