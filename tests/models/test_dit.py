"""Oracle tests for the Krea 2 transformer (krea2kit.models.dit).

* vs diffusers ``Krea2Transformer2DModel`` (0.42.1): see test_dit_loading.py (loads through
  both file layouts) and ``test_matches_diffusers_in_memory`` here;
* vs the official krea-ai/krea-2 code: golden values in tests/fixtures/krea2_golden.safetensors.

How the golden fixture was made (also in tests/fixtures/README.md):
    python tests/models/test_dit.py --make-golden <dir holding the official mmdit.py and sampling.py>
with the files of github.com/krea-ai/krea-2 at commit db3984f (fetched snapshot, kept outside this
repo; none of its code is committed). ``_make_golden`` below imports that ``mmdit.py`` and
``sampling.py``, builds ``SingleStreamDiT(SingleMMDiTConfig(features=32, tdim=16, txtdim=16, heads=2,
kvheads=1, multiplier=4, layers=2, patch=2, channels=16, txtheads=1, txtkvheads=1, txtlayers=3))``
(theta 1e3, the default), fills every parameter from ``torch.manual_seed(20260625)`` (normal,
rounded to bf16 so it is stored exactly), builds the inputs with ``sampling.prepare`` and calls
``SingleStreamDiT.forward`` in fp32 on CPU. Two runtime changes, both only to run on CPU:
``mmdit.sdpa_kernel`` is replaced so SDPA may use the math kernel instead of the forced cuDNN one,
and ``torch.compile`` is an identity decorator while the module is imported (eager calls).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from krea2kit.models.dit import (
    PRESETS,
    DiTConfig,
    SingleStreamDiT,
    TextFeatures,
    build_meta,
    image_positions,
    patchify,
    unpatchify,
)
from support.presets import DITS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "krea2_golden.safetensors"
KEYS_FILE = Path(__file__).parents[1] / "fixtures" / "keys" / "krea2_native_keys.txt"
GOLDEN_SEED = 20260625
GOLDEN_CONFIG = dict(features=32, tdim=16, txtdim=16, heads=2, kvheads=1, multiplier=4, layers=2, patch=2,
                     channels=16, txtheads=1, txtkvheads=1, txtlayers=3)
OFFICIAL_REPO = "krea-ai/krea-2"
OFFICIAL_COMMIT = "db3984f"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales and modulation tables included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("modulation.lin"):
                scale = 0.3
            else:
                scale = p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_model(seed: int = 0, preset: str = "tiny") -> SingleStreamDiT:
    return randomize(SingleStreamDiT(DITS[preset]), seed).eval().requires_grad_(False)


def tiny_inputs(cfg: DiTConfig, seed: int = 1, grid=(4, 6), L=7):
    """B=2, text padded in the middle like the official encoder ([prompt | PAD | suffix]),
    different valid lengths per row."""
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(2, L, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :2] = True
    mask[0, L - 2:] = True
    mask[1, :5] = True
    mask[1, L - 1:] = True
    latents = torch.randn(2, cfg.channels, grid[0] * cfg.patch, grid[1] * cfg.patch, generator=g)
    t = torch.tensor([0.3, 0.9])
    return latents, txt, mask, t


# ---------------------------------------------------------------------------
# (d) key set and shapes of the full model == the official file

def _expected_native_keys() -> dict[str, tuple[int, ...]]:
    """Expand the reference key list (block 0 / text block 0 shown) to all 430 tensors."""
    rows = {}
    for line in KEYS_FILE.read_text().splitlines():
        if not line or line.startswith("#") or "\t" not in line:
            continue
        name, shape = line.split("\t")
        rows[name] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    out = {}
    for name, shape in rows.items():
        if name.startswith("blocks.0."):
            for i in range(28):
                out[f"blocks.{i}." + name[len("blocks.0."):]] = shape
        elif ".layerwise_blocks.0." in name or ".refiner_blocks.0." in name:
            for i in range(2):
                out[name.replace("_blocks.0.", f"_blocks.{i}.")] = shape
        else:
            out[name] = shape
    return out


def test_full_config_state_dict_matches_official_keys():
    expected = _expected_native_keys()
    assert len(expected) == 430
    model = build_meta(PRESETS["krea2-turbo"])  # meta device: no memory
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected)
    assert got == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 12_820_073_036 == PRESETS["krea2-raw"].num_params()
    assert PRESETS["krea2-raw"] == PRESETS["krea2-turbo"]


def test_config_roundtrips_through_diffusers_config():
    for cfg in (PRESETS["krea2-raw"], *DITS.values()):
        assert DiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # diffusers' defaults are the official model
    assert DiTConfig.from_diffusers({}) == PRESETS["krea2-raw"]
    assert PRESETS["krea2-raw"].axes == (32, 48, 48) and PRESETS["krea2-raw"].mlp_dim == 16384
    assert PRESETS["krea2-raw"].txt_mlp_dim == 6912
    with pytest.raises(ValueError, match="kvheads"):
        DiTConfig(features=64, heads=2, kvheads=3)
    from krea2kit.models.dit import get_preset

    assert get_preset("krea2-turbo") is PRESETS["krea2-turbo"]
    from krea2kit.errors import PluginError

    with pytest.raises(PluginError, match="'krea3'.*krea2-raw, krea2-turbo"):
        get_preset("krea3")


def test_patchify_roundtrip_and_channel_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tok = patchify(x, 2)
    assert tok.shape == (2, 6, 12)
    # token (row 0, col 1): channels (c ph pw) of pixels rows 0-1, cols 2-3
    expect = torch.stack([x[0, c, ph, 2 + pw] for c in range(3) for ph in range(2) for pw in range(2)])
    assert torch.equal(tok[0, 1], expect)
    assert torch.equal(unpatchify(tok, (2, 3), 2), x)
    pos = image_positions((2, 3))
    assert pos[1].tolist() == [0, 0, 1] and pos[3].tolist() == [0, 1, 0]


# ---------------------------------------------------------------------------
# (a) diffusers oracle, in memory (file layouts: test_dit_loading.py)

def _diffusers_twin(model: SingleStreamDiT):
    from diffusers import Krea2Transformer2DModel

    from krea2kit.models.dit_loader import native_to_diffusers

    ref = Krea2Transformer2DModel(**model.config.to_diffusers()).eval()
    sd = {}
    for k, v in model.state_dict().items():
        dk = native_to_diffusers(k)
        sd[dk] = v.reshape(6, -1) if k.endswith("mod.lin") else v
    ref.load_state_dict(sd, strict=True)
    return ref


def diffusers_forward(ref, cfg, latents, txt, mask, t):
    gh, gw = latents.shape[2] // cfg.patch, latents.shape[3] // cfg.patch
    pos = torch.cat([torch.zeros(txt.shape[1], 3), image_positions((gh, gw)).float()])
    with torch.no_grad():
        return ref(patchify(latents, cfg.patch), txt, t, pos, mask).sample


def test_matches_diffusers_in_memory():
    model = tiny_model(3)
    ref = _diffusers_twin(model)
    latents, txt, mask, t = tiny_inputs(model.config)
    expect = diffusers_forward(ref, model.config, latents, txt, mask, t)
    gh, gw = latents.shape[2] // 2, latents.shape[3] // 2
    with torch.no_grad():
        got = model(patchify(latents), t, txt, mask, (gh, gw))
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured: 1.2e-6


# ---------------------------------------------------------------------------
# (b) golden values from the official krea-ai/krea-2 code

def _load_golden():
    from safetensors import safe_open

    with safe_open(str(FIXTURE), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    weights = {k[len("weights."):]: v.float() for k, v in tensors.items() if k.startswith("weights.")}
    return meta, weights, tensors


def test_matches_official_golden_values():
    meta, weights, t = _load_golden()
    assert meta["repo"] == OFFICIAL_REPO and meta["commit"].startswith(OFFICIAL_COMMIT)
    official = json.loads(meta["config"])
    cfg = DiTConfig(**{k: v for k, v in official.items() if k not in ("bias",)})
    assert cfg == DITS["micro"]
    model = build_meta(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval().requires_grad_(False)
    latents, txt, mask, tt = t["input.latents"], t["input.txt"], t["input.txt_mask"], t["input.t"]
    gh, gw = latents.shape[2] // 2, latents.shape[3] // 2
    # the official sampling.prepare() token order and positions == ours
    assert torch.equal(patchify(latents), t["input.img_tokens"])
    assert torch.equal(image_positions((gh, gw)).float(), t["input.pos"][0, txt.shape[1]:])
    with torch.no_grad():
        got = model(patchify(latents), tt, txt, mask, (gh, gw))
        got_keep_pad = model(patchify(latents), tt, grid_hw=(gh, gw),
                             txt_features=model.encode_text(txt, mask, drop_padding=False))
    expect = t["output.velocity"]
    assert torch.isfinite(expect).all()
    err = (got - expect).abs().max().item()
    assert err <= 1e-5, err  # measured: 1.2e-6 (outputs of magnitude ~1.2)
    assert (got_keep_pad - expect).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------
# (c) exact savings the official code does not take

def test_rope_and_text_features_computed_once_are_bit_identical():
    model = tiny_model(5)
    latents, txt, mask, t = tiny_inputs(model.config)
    gh, gw = latents.shape[2] // 2, latents.shape[3] // 2
    img = patchify(latents)
    with torch.no_grad():
        full = model(img, t, txt, mask, (gh, gw))
        feats = model.encode_text(txt, mask)
        rope = model.rope_table(feats.length, gh, gw)
        cached = model(img, t, grid_hw=(gh, gw), rope=rope, txt_features=feats)
        again = model(img, t, rope=rope, txt_features=feats)  # reused on a second step
    assert torch.equal(full, cached) and torch.equal(full, again)


def test_dropping_padded_text_tokens_is_exact():
    model = tiny_model(6)
    latents, txt, mask, t = tiny_inputs(model.config)
    gh, gw = latents.shape[2] // 2, latents.shape[3] // 2
    img = patchify(latents)
    with torch.no_grad():
        dropped = model.encode_text(txt, mask)
        kept = model.encode_text(txt, mask, drop_padding=False)
        assert dropped.length == int(mask.sum(1).max()) < kept.length
        a = model(img, t, grid_hw=(gh, gw), txt_features=dropped)
        b = model(img, t, grid_hw=(gh, gw), txt_features=kept)
        # the official padding of the sequence to a multiple of 256 with masked zero tokens at
        # position (0,0,0) (here placed after the text: the same keys, permuted)
        pad = 256 - (kept.length + img.shape[1]) % 256
        tok = torch.cat([kept.tokens, torch.zeros(2, pad, kept.tokens.shape[2])], dim=1)
        m = torch.cat([kept.mask, torch.zeros(2, pad, dtype=torch.bool)], dim=1)
        c = model(img, t, grid_hw=(gh, gw), txt_features=TextFeatures(tok, m))
        # the built-in official layout: padding appended at the end of [text | image]
        d = model(img, t, grid_hw=(gh, gw), txt_features=kept, pad_to=256)
        assert model.rope_table(kept.length, gh, gw, pad_to=256).length % 256 == 0
        # the valid tokens of each row alone (batch 1, no mask at all)
        rows = [model(img[i:i + 1], t[i:i + 1], txt[i:i + 1, mask[i]], None, (gh, gw)) for i in range(2)]
    # Equal up to fp32 summation order (fewer keys, another SDPA kernel): measured <= 1.2e-6
    # on outputs of magnitude ~3; a real error (a padded key read) shows up at ~1e-1.
    assert (a - b).abs().max().item() <= 5e-6
    assert (a - c).abs().max().item() <= 5e-6
    assert (a - d).abs().max().item() <= 5e-6
    assert (a - torch.cat(rows)).abs().max().item() <= 5e-6


def test_gqa_paths_agree(monkeypatch):
    """enable_gqa (used on CPU) and repeated K/V heads (used on CUDA) give the same output."""
    from krea2kit.models import dit

    model = tiny_model(8)
    assert model.config.heads != model.config.kvheads
    latents, txt, mask, t = tiny_inputs(model.config)
    with torch.no_grad():
        native = model(patchify(latents), t, txt, mask, (4, 6))
        monkeypatch.setattr(dit, "GQA_NATIVE_ON_CPU", False)
        repeated = model(patchify(latents), t, txt, mask, (4, 6))
    assert (native - repeated).abs().max().item() <= 1e-6  # measured: 0.0


def test_bf16_mixed_storage_runs_in_one_compute_dtype():
    model = tiny_model(7)
    for name, p in model.named_parameters():
        if ".attn." in name or ".mlp." in name:
            if not name.endswith(".scale"):
                p.data = p.data.to(torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    latents, txt, mask, t = tiny_inputs(model.config)
    with torch.no_grad():
        out = model(patchify(latents), t.to(torch.bfloat16), txt, mask, (4, 6))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# Golden fixture generation (run by hand; needs the official code outside this repo)

def _make_golden(official_dir: str, out: Path = FIXTURE) -> None:  # pragma: no cover - manual tool
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from krea2kit.models.weights import save_safetensors_atomic

    # @torch.compile -> eager while the official module is imported (CPU, no compiler needed).
    real_compile = torch.compile
    torch.compile = lambda fn=None, **kw: (lambda f: f) if fn is None else fn
    try:
        sys.path.insert(0, official_dir)
        import mmdit  # the official module
        import sampling
    finally:
        torch.compile = real_compile

    # Only change: let SDPA use the CPU math kernel instead of the forced cuDNN backend.
    mmdit.sdpa_kernel = lambda backend: sdpa_kernel([SDPBackend.MATH])

    cfg = mmdit.SingleMMDiTConfig(**GOLDEN_CONFIG)
    model = mmdit.SingleStreamDiT(cfg).eval()
    torch.manual_seed(GOLDEN_SEED)
    weights = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            scale = 0.3 if (p.ndim == 1 or name.endswith("modulation.lin")) else p.shape[-1] ** -0.5
            p.copy_((torch.randn(p.shape) * scale).to(torch.bfloat16).float())
            weights["weights." + name] = p.detach().to(torch.bfloat16).clone()
    L, gh, gw = 6, 4, 6
    txt = torch.randn(2, L, cfg.txtlayers, cfg.txtdim)
    txtmask = torch.zeros(2, L, dtype=torch.bool)
    txtmask[0, :2] = True
    txtmask[0, L - 2:] = True  # [prompt | PAD | suffix] as the official encoder makes it
    txtmask[1, :4] = True
    txtmask[1, L - 1:] = True
    latents = torch.randn(2, cfg.channels, gh * cfg.patch, gw * cfg.patch)
    t = torch.tensor([0.25, 0.875])
    img, pos, mask = sampling.prepare(latents, L, cfg.patch, txtmask)
    with torch.no_grad():
        velocity = model(img=img, context=txt, t=t, pos=pos, mask=mask)
    assert torch.isfinite(velocity).all()
    tensors = dict(weights)
    tensors.update({
        "input.latents": latents, "input.txt": txt, "input.txt_mask": txtmask, "input.t": t,
        "input.img_tokens": img, "input.pos": pos, "output.velocity": velocity,
    })
    meta = {
        "repo": OFFICIAL_REPO,
        "commit": OFFICIAL_COMMIT,
        "function": "mmdit.SingleStreamDiT.forward(img, context, t, pos, mask) with sampling.prepare inputs",
        "config": json.dumps(dict(GOLDEN_CONFIG, bias=False)),
        "seed": str(GOLDEN_SEED),
        "dtype": "float32 compute, CPU; weights stored as bf16 (exact values)",
        "patches": "mmdit.sdpa_kernel -> math backend; torch.compile -> identity during import",
        "torch": torch.__version__,
    }
    save_safetensors_atomic(tensors, out, metadata=meta)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "--make-golden":
        _make_golden(sys.argv[2])
    else:
        print("usage: python tests/models/test_dit.py --make-golden <dir with the official mmdit.py, sampling.py>")
