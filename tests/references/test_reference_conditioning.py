"""Reference tokens in the transformer (krea2kit.references.conditioning), on a tiny random DiT.

The two modes are checked against an independent, written-out forward: the reference runs
through the same blocks at t = 0 on its own RoPE frame and its keys and values join the
image's attention with a log(strength) logit bias (attention mode: the reference's own
queries see only its own keys, i.e. K/V injection from a separate pass; in-context mode:
one joint sequence).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from krea2kit.denoiser import Krea2Denoiser
from krea2kit.lora.apply import StepSchedule
from krea2kit.models.dit import SingleStreamDiT, apply_rope, patchify, rope_from_positions
from krea2kit.models.offload import stream_blocks
from krea2kit.references.conditioning import ReferenceDenoiser, References, ReferenceTokens, positions
from support.presets import TINY_DIT

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = replace(TINY_DIT, layers=3)
GRID = (3, 4)  # image patch grid
REF_GRID = (2, 3)  # a reference of its own size


def random_dit(seed: int = 0) -> SingleStreamDiT:
    g = torch.Generator().manual_seed(seed)
    model = SingleStreamDiT(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if (p.ndim == 1 or name.endswith("modulation.lin")) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dit():
    return random_dit()


def latents(seed: int, grid) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, CFG.channels, grid[0] * CFG.patch, grid[1] * CFG.patch, generator=g)


def text(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1, 5, CFG.txtlayers, CFG.txtdim, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[0, 3:] = False  # padded text: the -inf part of the mask must survive
    return txt, mask


def ref(seed: int, strength: float, mode: str, frame: int = 1, grid=REF_GRID) -> ReferenceTokens:
    return ReferenceTokens(patchify(latents(seed, grid), CFG.patch), grid, frame, mode, StepSchedule(strength))


def denoisers(dit, refs: list[ReferenceTokens], *, guidance: float = 0.0, layout: str = "official"):
    txt, mask = text()
    kwargs = {"uncond_txt": text(8)[0], "uncond_mask": None} if guidance > 0 else {}
    base = Krea2Denoiser(dit, txt, mask, guidance=guidance, layout=layout,
                         latent_hw=(GRID[0] * CFG.patch, GRID[1] * CFG.patch), **kwargs)
    return base, ReferenceDenoiser.wrap(base, References(refs))


# ---------------------------------------------------------------------------------- strength 0
@pytest.mark.parametrize("mode", ["in-context", "attention"])
@pytest.mark.parametrize("guidance, layout", [(0.0, "official"), (2.0, "official"), (2.0, "compact")])
def test_strength_zero_is_no_reference_bit_for_bit(dit, mode, guidance, layout):
    x = latents(1, GRID)
    base, with_refs = denoisers(dit, [ref(2, 0.0, mode), ref(3, 0.0, mode, frame=2)], guidance=guidance, layout=layout)
    plain = base(x, 0.6)
    assert torch.equal(with_refs(x, 0.6), plain)
    # and the model hook itself: references that are all off change nothing either
    _, live = denoisers(dit, [ref(2, 1.0, mode)], guidance=guidance, layout=layout)
    assert not torch.equal(live(x, 0.6), plain)  # (the reference does act when on)


def test_a_slider_schedule_turns_a_reference_on_from_its_start_step(dit):
    x = latents(1, GRID)
    item = ref(2, 1.0, "in-context")
    item.strength = StepSchedule(1.5, 2, None)  # off before step 2
    base, with_refs = denoisers(dit, [item])
    with_refs.references.set_step(1, 4)
    assert torch.equal(with_refs(x, 0.6), base(x, 0.6))
    with_refs.references.set_step(2, 4)
    assert not torch.equal(with_refs(x, 0.6), base(x, 0.6))


# ---------------------------------------------------------------------------------- layout
def test_in_context_tokens_are_appended_with_their_frame_rope_and_t0_modulation(dit):
    txt, mask = text()
    feats = dit.encode_text(txt, mask, drop_padding=False)
    rope = dit.rope_table(feats.length, *GRID)
    t_emb, tvec = dit.time_vectors(torch.tensor([0.6]))
    x = torch.cat((feats.tokens, dit.first(patchify(latents(1, GRID), CFG.patch))), dim=1)
    length = x.shape[1]
    items = [ref(2, 2.0, "in-context"), ref(3, 0.5, "in-context", frame=5, grid=(1, 2))]
    refs = References(items)
    bool_mask = torch.cat((mask, torch.ones(1, GRID[0] * GRID[1], dtype=torch.bool)), dim=1)[:, None, None, :]
    x2, tvec2, rope2, mask2 = refs.extend(dit, x, tvec, rope, bool_mask)

    n1, n2 = REF_GRID[0] * REF_GRID[1], 2
    assert x2.shape == (1, length + n1 + n2, CFG.features)
    assert torch.equal(x2[:, :length], x)  # the model's own tokens first, untouched
    assert torch.equal(x2[:, length:length + n1], dit.first(items[0].tokens))
    # time vectors: the real t for text and image, t = 0 for the clean references
    _, tvec0 = dit.time_vectors(torch.zeros(1))
    assert torch.equal(tvec2[:, :length], tvec.expand(1, length, -1))
    assert torch.equal(tvec2[:, length:], tvec0.expand(1, n1 + n2, -1))
    # RoPE: (frame, row, col), frame = place + 1 by default, row-major on the reference's grid
    expected = [(1, r, c) for r in range(REF_GRID[0]) for c in range(REF_GRID[1])] + [(5, 0, 0), (5, 0, 1)]
    assert positions(REF_GRID, 1).tolist() == [list(map(float, p)) for p in expected[:n1]]
    want = rope_from_positions(torch.tensor(expected, dtype=torch.float64), CFG.axes, CFG.theta)
    assert torch.equal(rope2.cos[:length], rope.cos) and torch.equal(rope2.sin[:length], rope.sin)
    assert torch.equal(rope2.cos[length:], want.cos) and torch.equal(rope2.sin[length:], want.sin)
    assert rope2.txt_len == rope.txt_len
    # frame 1 differs from the image's frame 0 only on the first RoPE axis
    image_rope = rope_from_positions(torch.tensor([[0.0, 1.0, 2.0]]), CFG.axes, CFG.theta)
    ref_rope = rope_from_positions(torch.tensor([[1.0, 1.0, 2.0]]), CFG.axes, CFG.theta)
    first_axis = CFG.axes[0]
    assert torch.equal(image_rope.cos[..., first_axis:], ref_rope.cos[..., first_axis:])
    assert not torch.equal(image_rope.cos[..., :first_axis], ref_rope.cos[..., :first_axis])
    # key-wise additive mask: -inf on padded text, log(strength) on each reference's keys
    assert mask2.shape == (1, 1, 1, length + n1 + n2)
    row = mask2[0, 0, 0]
    assert torch.isinf(row[3:5]).all() and (row[3:5] < 0).all()
    assert (row[:3] == 0).all() and (row[5:length] == 0).all()
    assert torch.allclose(row[length:length + n1], torch.full((n1,), math.log(2.0)))
    assert torch.allclose(row[length + n1:], torch.full((n2,), math.log(0.5)))


def test_attention_mode_mask_keeps_reference_queries_on_their_own_keys(dit):
    txt, mask = text()
    feats = dit.encode_text(txt, mask, drop_padding=False)
    rope = dit.rope_table(feats.length, *GRID)
    _, tvec = dit.time_vectors(torch.tensor([0.6]))
    x = torch.cat((feats.tokens, dit.first(patchify(latents(1, GRID), CFG.patch))), dim=1)
    length, n = x.shape[1], REF_GRID[0] * REF_GRID[1]
    refs = References([ref(2, 3.0, "attention"), ref(3, 1.0, "attention", frame=2)])
    *_, m = refs.extend(dit, x, tvec, rope, None)
    assert m.shape == (1, 1, length + 2 * n, length + 2 * n)
    image_rows = m[0, 0, :length]
    assert torch.allclose(image_rows[:, length:length + n], torch.full((length, n), math.log(3.0)))
    assert (image_rows[:, length + n:] == 0).all()  # log(1)
    first = m[0, 0, length:length + n]
    assert torch.isinf(first[:, :length]).all() and torch.isinf(first[:, length + n:]).all()
    assert (first[:, length:length + n] == 0).all()


# ---------------------------------------------------------------------------------- oracle
def _qkv(attn, h, cos, sin, txt_len=0):
    from krea2kit.models.dit import Rope

    b, n, _ = h.shape
    hd = attn.head_dim
    q = attn.qknorm.qnorm(attn.wq(h).view(b, n, attn.heads, hd))
    k = attn.qknorm.knorm(attn.wk(h).view(b, n, attn.kvheads, hd))
    v = attn.wv(h).view(b, n, attn.kvheads, hd)
    rope = Rope(cos, sin, txt_len)
    return apply_rope(q, rope), apply_rope(k, rope), v


def _attend(attn, q, k, v, bias, h):
    """softmax(q k^T / sqrt(d) + bias) v written out, GQA by repeating K/V heads."""
    groups = attn.heads // attn.kvheads
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
    out = out.reshape(out.shape[0], out.shape[1], -1)
    return attn.wo(out * torch.sigmoid(attn.gate(h)))


def oracle(dit, img_tokens, t, txt, mask, ref_tokens, frame, strength, isolate):
    """The image velocity with one reference, written out block by block."""
    feats = dit.encode_text(txt, mask, drop_padding=True)
    rope = dit.rope_table(feats.length, *GRID)
    t_emb, tvec = dit.time_vectors(t)
    _, tvec0 = dit.time_vectors(torch.zeros(1))
    pos = positions(REF_GRID, frame)
    ref_rope = rope_from_positions(pos, CFG.axes, CFG.theta)
    x = torch.cat((feats.tokens, dit.first(img_tokens)), dim=1)
    r = dit.first(ref_tokens)
    main_bias = torch.zeros(x.shape[1])
    if feats.mask is not None:
        main_bias[~feats.mask[0]] = float("-inf")
    log_s = torch.full((r.shape[1],), math.log(strength))
    for block in dit.blocks:
        m = (tvec + block.mod.lin).chunk(6, dim=-1)
        m0 = (tvec0 + block.mod.lin).chunk(6, dim=-1)
        hx = (1 + m[0]) * block.prenorm(x) + m[1]
        hr = (1 + m0[0]) * block.prenorm(r) + m0[1]
        qx, kx, vx = _qkv(block.attn, hx, rope.cos, rope.sin)
        qr, kr, vr = _qkv(block.attn, hr, ref_rope.cos, ref_rope.sin)
        keys, values = torch.cat((kx, kr), dim=1), torch.cat((vx, vr), dim=1)
        ax = _attend(block.attn, qx, keys, values, torch.cat((main_bias, log_s)), hx)
        if isolate:  # K/V injection: the reference's own pass sees only itself
            ar = _attend(block.attn, qr, kr, vr, torch.zeros(r.shape[1]), hr)
        else:
            ar = _attend(block.attn, qr, keys, values, torch.cat((main_bias, log_s)), hr)
        x = x + m[2] * ax
        r = r + m0[2] * ar
        x = x + m[5] * block.mlp((1 + m[3]) * block.postnorm(x) + m[4])
        r = r + m0[5] * block.mlp((1 + m0[3]) * block.postnorm(r) + m0[4])
    return dit.last(x[:, feats.length:], t_emb)


@pytest.mark.parametrize("mode", ["in-context", "attention"])
@pytest.mark.parametrize("strength", [0.5, 1.0, 3.0])
def test_model_matches_the_written_out_reference_forward(dit, mode, strength):
    img = patchify(latents(1, GRID), CFG.patch)
    txt, mask = text()
    t = torch.tensor([0.6])
    item = ref(2, strength, mode, frame=2)
    with torch.no_grad():
        got = dit(img, t, txt, mask, GRID, refs=References([item]))
        want = oracle(dit, img, t, txt, mask, item.tokens, 2, strength, isolate=mode == "attention")
        plain = dit(img, t, txt, mask, GRID)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert (got - plain).abs().max() > 1e-3


def test_attention_mode_reference_does_not_depend_on_the_image(dit):
    """Attention mode is K/V injection: the reference's keys and values come from a pass of its
    own, so with two references, changing the image cannot change what one adds to the other."""
    img_a = patchify(latents(1, GRID), CFG.patch)
    txt, mask = text()
    t = torch.tensor([0.6])
    seen = []

    def grab(module, args, output):  # the reference rows of every block's key projection
        seen.append(output[:, -REF_GRID[0] * REF_GRID[1]:].clone())

    handles = [b.attn.wk.register_forward_hook(grab) for b in dit.blocks]
    try:
        with torch.no_grad():
            dit(img_a, t, txt, mask, GRID, refs=References([ref(2, 1.0, "attention")]))
            first = list(seen)
            seen.clear()
            dit(patchify(latents(9, GRID), CFG.patch), torch.tensor([0.2]), txt, mask, GRID,
                refs=References([ref(2, 1.0, "attention")]))
    finally:
        for h in handles:
            h.remove()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first, seen))


# ---------------------------------------------------------------------------------- offload
@pytest.mark.parametrize("mode", ["in-context", "attention"])
def test_references_with_streamed_blocks_give_the_resident_result_bit_for_bit(dit, mode):
    streamed = copy.deepcopy(dit)
    stream_blocks(streamed, "cpu")
    x = latents(1, GRID)
    _, resident = denoisers(dit, [ref(2, 1.5, mode)], guidance=2.0)
    _, offloaded = denoisers(streamed, [ref(2, 1.5, mode)], guidance=2.0)
    assert torch.equal(offloaded(x, 0.6), resident(x, 0.6))


# ---------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("mode", ["in-context", "attention"])
def test_runtime_lora_acts_on_reference_tokens_as_merged_weights_do(dit, mode):
    """A LoRA on ``first`` and the attention projections changes the reference tokens too:
    runtime adapters (forward hooks) give what the same LoRA merged into the weights gives."""
    from krea2kit.lora.apply import attach_adapters, merge_into
    from krea2kit.lora.formats.form import LoraDelta, LoraFile

    g = torch.Generator().manual_seed(4)
    deltas = {}
    for name in ["first", *[f"blocks.{i}.attn.{m}" for i in range(CFG.layers) for m in ("wk", "wv")]]:
        mod = dit.get_submodule(name)
        deltas[name] = LoraDelta(name, "lora", {"down": torch.randn(2, mod.in_features, generator=g) * 0.3,
                                                "up": torch.randn(mod.out_features, 2, generator=g) * 0.3})
    lora = LoraFile(deltas, "native", name="test")
    x = latents(1, GRID)
    runtime_model = copy.deepcopy(dit)
    with attach_adapters(runtime_model, [(lora, 0.8)]):
        _, with_adapters = denoisers(runtime_model, [ref(2, 1.5, mode)])
        got = with_adapters(x, 0.6)
    merged_model = copy.deepcopy(dit)
    merge_into(merged_model, [(lora, 0.8)], backup="none")
    _, merged = denoisers(merged_model, [ref(2, 1.5, mode)])
    _, without = denoisers(dit, [ref(2, 1.5, mode)])
    assert torch.allclose(got, merged(x, 0.6), atol=1e-5)
    assert (got - without(x, 0.6)).abs().max() > 1e-3
