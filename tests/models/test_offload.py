"""Block swap (``model.offload = "blocks"``, :mod:`krea2kit.models.offload`).

On CPU the "device" is a stand-in: every use clones a block's tensors into fresh ones, so
these tests run the real schedule (copy block i+1 while block i computes, install, free)
and prove it gives the resident model's outputs bit for bit, with LoRA adapters too, and
that at most two blocks' copies exist at any time. The CUDA path differs only in where the
copies go (a side stream, pinned host memory, events).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from krea2kit.lora.apply import attach_adapters, merge_into
from krea2kit.lora.formats import parse_lora_state_dict
from krea2kit.models.dit import SingleStreamDiT, patchify
from krea2kit.models.offload import RESIDENT_BLOCKS, BlockStreamer, stream_blocks
from support.presets import TINY_DIT

CFG = replace(TINY_DIT, layers=5)  # enough blocks for a steady state between first and last


def random_dit(seed: int = 0, cfg=CFG) -> SingleStreamDiT:
    g = torch.Generator().manual_seed(seed)
    model = SingleStreamDiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if (p.ndim == 1 or name.endswith("modulation.lin")) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval().requires_grad_(False)


def inputs(seed: int = 1, cfg=CFG, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(2, 6, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    latents = torch.randn(2, cfg.channels, 3 * cfg.patch, 4 * cfg.patch, generator=g)
    x = patchify(latents, cfg.patch), torch.tensor([0.3, 0.8]), txt, mask
    return tuple(t.to(device) for t in x)


def run(model, x) -> torch.Tensor:
    tokens, t, txt, mask = x
    with torch.no_grad():
        return model(tokens, t, txt, mask, (3, 4))


def block_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


def test_streamed_blocks_give_the_resident_outputs_bit_for_bit():
    resident = random_dit()
    streamed = copy.deepcopy(resident)
    streamer = stream_blocks(streamed, "cpu", keep_log=True)
    assert streamed.block_streamer is streamer
    for seed in (1, 2):  # two calls: the second starts from the state the first left
        x = inputs(seed)
        assert torch.equal(run(streamed, x), run(resident, x))
    assert streamer.peak_resident == RESIDENT_BLOCKS


def test_schedule_copies_one_block_ahead_and_frees_each_after_use():
    model = random_dit()
    streamer = BlockStreamer(model, "cpu", keep_log=True)
    n = len(model.blocks)
    stored = [[s.stored for s in slots] for slots in streamer._slots]
    seen = []

    def inside(block, args, i):
        # Runs after the streamer's pre-hook: the block computes on fresh copies equal to
        # its stored tensors, and only it and the next block have copies alive.
        live = streamer.live_copies()
        seen.append(sorted(set(live)))
        for t, s in zip(block_tensors(block), stored[i]):
            assert t.data_ptr() != s.data_ptr() and torch.equal(t, s)

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda b, a, i=i: inside(b, a, i))
    run(model, inputs())

    # Block i+1 is copied once block i is queued (on a GPU it copies while i computes);
    # block i-1 is dropped first, so two blocks at most.
    expected = [("copy", 0), ("use", 0), ("copy", 1), ("use", 1)]
    for i in range(2, n):
        expected += [("free", i - 2), ("copy", i), ("use", i)]
    expected.append(("free", n - 2))
    assert streamer.log == expected
    assert seen == [[0]] + [[i - 1, i] for i in range(1, n)]
    assert streamer.live_copies() == [n - 1] * len(stored[n - 1])  # the last block stays until the next call
    for block, tensors in zip(model.blocks, stored):  # and the blocks point at the stored tensors
        assert [t.data_ptr() for t in block_tensors(block)] == [s.data_ptr() for s in tensors]

    streamer.log.clear()
    seen.clear()
    run(model, inputs(2))
    assert streamer.log[:5] == [("copy", 0), ("use", 0), ("free", n - 1), ("copy", 1), ("use", 1)]
    assert seen[0] == [0, n - 1] and streamer.peak_resident == RESIDENT_BLOCKS
    streamer.release()
    assert streamer.live_copies() == []


def test_an_interrupted_call_leaves_nothing_behind():
    resident = random_dit()
    streamed = copy.deepcopy(resident)
    streamer = stream_blocks(streamed, "cpu")

    def stop(block, args):
        raise KeyboardInterrupt

    handle = streamed.blocks[2].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        run(streamed, inputs())
    assert sorted(set(streamer.live_copies())) == [1, 2]  # block 2 installed, block 1 retired
    handle.remove()
    x = inputs(3)
    assert torch.equal(run(streamed, x), run(resident, x))
    streamer.release()
    assert streamer.live_copies() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streaming_is_bit_identical_and_holds_two_blocks():
    """The real path: pinned host memory, a side stream, events; peak device memory is the
    resident weights outside the blocks, two blocks and the activations."""
    cfg = replace(TINY_DIT, features=512, heads=4, kvheads=2, layers=8)
    host = random_dit(0, cfg).to(torch.bfloat16)
    x = inputs(1, cfg, "cuda")
    block_bytes = sum(t.numel() * t.element_size() for t in block_tensors(host.blocks[0]))

    resident = copy.deepcopy(host).to("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    want = run(resident, x)
    activations = torch.cuda.max_memory_allocated() - base
    del resident
    torch.cuda.empty_cache()

    streamed = copy.deepcopy(host)
    streamer = stream_blocks(streamed, "cuda")
    assert all(s.stored.is_pinned() for slots in streamer._slots for s in slots)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # later calls start with the last block of the one before still alive
        assert torch.equal(run(streamed, x), want)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 2 * block_bytes + activations + 2**20
    assert streamer.peak_resident == RESIDENT_BLOCKS
    streamer.release()
    assert torch.cuda.memory_allocated() <= base


def lora_state_dict(model: SingleStreamDiT) -> dict[str, torch.Tensor]:
    """LoRA on every block Linear, DoRA on one (it reads the base weight), a full diff outside the blocks."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, mod in model.named_modules():
        if name.startswith("blocks.") and isinstance(mod, torch.nn.Linear):
            o, i = mod.weight.shape
            sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(3, i, generator=g) * 0.2
            sd[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(o, 3, generator=g) * 0.05
    o = model.blocks[1].attn.wo.weight.shape[0]
    sd["diffusion_model.blocks.1.attn.wo.dora_scale"] = torch.rand(o, 1, generator=g) + 0.5
    sd["diffusion_model.last.linear.diff"] = torch.randn(*model.last.linear.weight.shape, generator=g) * 0.05
    return sd


@pytest.mark.parametrize("attach_first", [False, True], ids=["stream-then-attach", "attach-then-stream"])
def test_lora_adapters_on_streamed_blocks_equal_lora_on_the_resident_model(attach_first):
    resident = random_dit()
    streamed = copy.deepcopy(resident)
    lora = parse_lora_state_dict(lora_state_dict(resident), name="offload-test")
    ref = attach_adapters(resident, [(lora, 0.8)])
    if attach_first:
        handle = attach_adapters(streamed, [(lora, 0.8)])
        stream_blocks(streamed, "cpu")
    else:
        stream_blocks(streamed, "cpu")
        handle = attach_adapters(streamed, [(lora, 0.8)])
    x = inputs()
    with_lora = run(resident, x)
    assert torch.equal(run(streamed, x), with_lora)
    plain = random_dit()
    assert not torch.equal(run(plain, x), with_lora)  # the LoRA changes the output
    handle.set_strength(0, 0.3)
    ref.set_strength(0, 0.3)
    assert torch.equal(run(streamed, x), run(resident, x))
    handle.detach()
    ref.detach()
    assert torch.equal(run(streamed, x), run(plain, x))


def test_merged_lora_between_runs_changes_the_stored_blocks_and_restores_them():
    resident = random_dit()
    streamed = copy.deepcopy(resident)
    stream_blocks(streamed, "cpu")
    lora = parse_lora_state_dict(lora_state_dict(resident), name="offload-test")
    x = inputs()
    before = run(streamed, x)
    with merge_into(resident, [(lora, 0.5)]), merge_into(streamed, [(lora, 0.5)]):
        assert torch.equal(run(streamed, x), run(resident, x))
    assert torch.equal(run(streamed, x), before)


def test_weights_outside_the_blocks_stay_resident_and_blocks_are_stored_on_the_host():
    model = random_dit()
    streamer = BlockStreamer(model, "cpu")
    inside = {id(t) for b in model.blocks for t in block_tensors(b)}
    outside = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside]
    assert outside and all(t.device.type == "cpu" for t in outside)
    assert sum(len(slots) for slots in streamer._slots) == len(inside)
    streamer.remove()
    x = inputs()
    assert torch.equal(run(model, x), run(random_dit(), x))  # hooks gone, weights unchanged


@pytest.mark.parametrize("weights_dtype", ["auto", "int8"])
def test_the_transformer_part_streams_its_blocks_when_asked(weights_dtype):
    """parts/dit.py: ``LoadContext.offload = "blocks"`` gives a streamed module, quantized
    layers (their codes and scales are buffers) included, with the resident module's outputs."""
    from pathlib import Path

    from krea2kit.contracts import LoadContext
    from krea2kit.parts.dit import load

    if weights_dtype != "auto":
        pytest.importorskip("comfy_kitchen")
    weights = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights" / "turbo"
    context = LoadContext(role="dit", name="krea2", location=str(weights), weights_dtype=weights_dtype)
    resident = load(None, context).module
    part = load(None, replace(context, offload="blocks"))
    streamer = part.module.block_streamer
    assert len(streamer.blocks) == len(resident.blocks) and not hasattr(resident, "block_streamer")
    if weights_dtype == "int8":
        assert any(not s.is_param for slots in streamer._slots for s in slots)  # quantized codes stream too
    x = inputs(4, part.module.config)
    assert torch.equal(run(part.module, x), run(resident, x))


# -- through the CLI on the nano model ---------------------------------------------------------

RECIPE = """
seed = 5
width = 64
height = 64
[[prompts]]
text = "a red circle on a white background"
[sampler]
steps = 2
[output]
dir = "out"
name = "{name}"
"""


def test_cli_blocks_offload_gives_the_default_pixels_and_records_the_mode(cli_inproc, tmp_path, monkeypatch):
    from PIL import Image

    import krea2kit.models.offload as offload
    from krea2kit.output.metadata import read_image_metadata

    streamers = []

    def spy(model, device, **kwargs):  # the real streamer, remembered
        streamers.append(real(model, device, **kwargs))
        return streamers[-1]

    real = offload.stream_blocks
    monkeypatch.setattr(offload, "stream_blocks", spy)
    (tmp_path / "r.toml").write_text(RECIPE)
    resident = cli_inproc("run", "r.toml", "-q", "--set", 'output.name="resident"')
    assert resident.code == 0, resident.stderr
    assert streamers == []
    streamed = cli_inproc("run", "r.toml", "-q", "--set", 'model.offload="blocks"', "--set", 'output.name="streamed"')
    assert streamed.code == 0, streamed.stderr
    assert len(streamers) == 1 and streamers[0].peak_resident == RESIDENT_BLOCKS
    assert resident.stdout.split() == ["out/resident.png"] and streamed.stdout.split() == ["out/streamed.png"]
    with Image.open(tmp_path / "out/resident.png") as a, Image.open(tmp_path / "out/streamed.png") as b:
        assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    record = read_image_metadata(tmp_path / "out/streamed.png")
    assert record["krea2kit"]["recipe"]["model"]["offload"] == "blocks"


def test_cli_dry_run_counts_two_blocks_on_the_device(cli_inproc):
    import json

    def memory(*extra):
        res = cli_inproc("run", "--dry-run", "--json", "--prompt", "a cat", "--set", "model.preset=krea2-turbo",
                  "--set", "model.device=cuda", *extra)
        assert res.code == 0, res.stderr
        return json.loads(res.stdout.splitlines()[0])["memory"]

    from krea2kit.memory import dit_weight_bytes
    from krea2kit.models.dit import PRESETS

    cfg = PRESETS["krea2-turbo"]
    full = dit_weight_bytes(cfg, 2)
    per_block = (full - dit_weight_bytes(cfg, 2, resident_blocks=0)) // cfg.layers
    default, streamed = memory(), memory("--set", 'model.offload="blocks"')
    assert default["parts"]["transformer weights"] == full and not default["blocks_streamed"]
    assert streamed["parts"]["transformer weights"] == full - (cfg.layers - RESIDENT_BLOCKS) * per_block
    assert streamed["blocks_streamed"] and streamed["text_encoder_released"]
    assert streamed["peak_bytes"] < default["peak_bytes"] / 3


def test_preflight_offers_block_swap_where_quantizing_is_not_enough(monkeypatch):
    from krea2kit import memory
    from krea2kit.api import Session, load_recipe
    from krea2kit.errors import RecipeError

    session = Session()
    plan = session.plan(load_recipe(None, overrides=["model.preset=krea2-turbo"]), prompts=["a cat"])
    fp8 = memory.estimate(plan, session.settings, device="cuda:0", dtype="bfloat16", weights_dtype="fp8")
    blocks = memory.estimate(plan, session.settings, device="cuda:0", dtype="bfloat16", stream_blocks=True)
    assert blocks.peak < fp8.peak
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: (blocks.peak + fp8.peak) // 2)  # a 12 GB card
    with pytest.raises(RecipeError) as info:
        memory.preflight(plan, session.settings, device="cuda:0", dtype="bfloat16", warn=print)
    hint = info.value.hint
    fits, _, alone = hint.partition("; not enough alone: ")
    assert fits.startswith("set ") and f'model.offload = "blocks" (≈{memory.gb(blocks.peak)})' in fits
    assert f'model.weights_dtype = "fp8" (≈{memory.gb(fp8.peak)})' in alone
    streamed = session.plan(load_recipe(None, overrides=["model.preset=krea2-turbo", 'model.offload="blocks"']),
                            prompts=["a cat"])
    assert memory.preflight(streamed, session.settings, device="cuda:0", dtype="bfloat16", warn=print).peak \
        == blocks.peak
