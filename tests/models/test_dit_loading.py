"""Loading the Krea 2 transformer: every layout, dtypes, config inference, bad files.

The diffusers oracle here goes through files: a diffusers ``Krea2Transformer2DModel`` (0.42.1)
with every weight random is written with ``save_pretrained`` (sharded, with config.json) and as a
native single file, both are loaded with ``load_dit`` and compared with diffusers' own forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from krea2kit.errors import WeightsError
from krea2kit.models.dit import PRESETS, DiTConfig, image_positions, patchify
from krea2kit.models.dit_loader import (
    detect_layout,
    diffusers_to_native,
    dit_config_from_checkpoint,
    load_dit,
    native_to_diffusers,
)
from krea2kit.models.weights import open_checkpoint, save_safetensors_atomic
from support.presets import DITS

KEYS_DIR = Path(__file__).parents[1] / "fixtures" / "keys"


def _random_diffusers(cfg: DiTConfig, seed: int = 0):
    from diffusers import Krea2Transformer2DModel

    ref = Krea2Transformer2DModel(**cfg.to_diffusers()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.3 if (p.ndim == 1 or "scale_shift_table" in name) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return ref


def _native_state(ref) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in ref.state_dict().items():
        nk = diffusers_to_native(k)
        out[nk] = v.reshape(-1) if nk.endswith(".mod.lin") else v
    return out


def _inputs(cfg: DiTConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    L, gh, gw = 8, 4, 5
    txt = torch.randn(2, L, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :3] = True
    mask[0, -2:] = True  # [prompt | PAD | suffix]
    mask[1, :6] = True
    mask[1, -1:] = True
    latents = torch.randn(2, cfg.channels, gh * cfg.patch, gw * cfg.patch, generator=g)
    return latents, txt, mask, torch.tensor([0.15, 0.8]), (gh, gw)


def _ours(model, latents, txt, mask, t, grid):
    with torch.no_grad():
        return model(patchify(latents), t, txt, mask, grid)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    cfg = DITS["tiny"]
    root = tmp_path_factory.mktemp("dit")
    ref = _random_diffusers(cfg)
    pipe = root / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "Krea2Pipeline"}))
    ref.save_pretrained(pipe / "transformer", max_shard_size="500KB")  # sharded + index + config.json
    native = _native_state(ref)
    save_safetensors_atomic(native, root / "native.safetensors")
    save_safetensors_atomic({"diffusion_model." + k: v for k, v in native.items()}, root / "comfy.safetensors")
    full = {"model.diffusion_model." + k: v for k, v in native.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)  # a full ComfyUI checkpoint
    save_safetensors_atomic(full, root / "comfy_full.safetensors")
    return {"cfg": cfg, "ref": ref, "root": root, "pipe": pipe, "native": native}


def test_oracle_diffusers_through_both_file_layouts(tiny_files):
    cfg, ref = tiny_files["cfg"], tiny_files["ref"]
    assert len(list((tiny_files["pipe"] / "transformer").glob("*.safetensors"))) > 1  # really sharded
    latents, txt, mask, t, grid = _inputs(cfg)
    pos = torch.cat([torch.zeros(txt.shape[1], 3), image_positions(grid).float()])
    with torch.no_grad():
        expect = ref(patchify(latents), txt, t, pos, mask).sample
    for path in (tiny_files["root"] / "native.safetensors", tiny_files["pipe"] / "transformer"):
        model = load_dit(path)
        assert model.config == cfg
        err = (_ours(model, latents, txt, mask, t, grid) - expect).abs().max().item()
        assert err <= 1e-5, (path, err)  # measured: 1.4e-6


def test_all_layouts_give_identical_outputs(tiny_files):
    root = tiny_files["root"]
    args = _inputs(tiny_files["cfg"], seed=2)
    outs = []
    for path in (root / "native.safetensors", root / "comfy.safetensors", root / "comfy_full.safetensors",
                 tiny_files["pipe"] / "transformer", tiny_files["pipe"] / "transformer" /
                 "diffusion_pytorch_model.safetensors.index.json"):
        outs.append(_ours(load_dit(path), *args))
    for o in outs[1:]:
        assert torch.equal(outs[0], o)
    layouts = [detect_layout(open_checkpoint(root / n).keys()) for n in
               ("native.safetensors", "comfy.safetensors", "comfy_full.safetensors")]
    assert layouts == [("native", ""), ("comfyui", "diffusion_model."), ("comfyui", "model.diffusion_model.")]


def test_dtypes_kept_or_forced(tmp_path, tiny_files):
    # like the official file: bf16 block matmuls, fp32 norms / modulations / embedders
    mixed = {k: (v.to(torch.bfloat16) if k.startswith(("blocks.", "txtfusion.")) and k.endswith(".weight")
                 and "projector" not in k else v) for k, v in tiny_files["native"].items()}
    save_safetensors_atomic(mixed, tmp_path / "mixed.safetensors")
    model = load_dit(tmp_path / "mixed.safetensors")
    got = {k: v.dtype for k, v in model.state_dict().items()}
    assert got == {k: v.dtype for k, v in mixed.items()}
    assert model.compute_dtype == torch.bfloat16
    out = _ours(model, *_inputs(model.config))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

    forced = load_dit(tmp_path / "mixed.safetensors", dtype=torch.float16)
    for k, v in forced.state_dict().items():
        assert v.dtype == (torch.float32 if k.endswith(".scale") else torch.float16), k
    allhalf = load_dit(tmp_path / "mixed.safetensors", dtype=torch.float16, keep_norms_fp32=False)
    assert {v.dtype for v in allhalf.state_dict().values()} == {torch.float16}

    # A file stored all in fp16 (the shipped nano transformers): norms are still held in fp32.
    save_safetensors_atomic({k: v.half() for k, v in tiny_files["native"].items()}, tmp_path / "half.safetensors")
    upcast = load_dit(tmp_path / "half.safetensors", dtype=torch.float32)
    assert {v.dtype for v in upcast.state_dict().values()} == {torch.float32}
    lowered = load_dit(tmp_path / "half.safetensors", dtype=torch.bfloat16)
    for k, v in lowered.state_dict().items():
        assert v.dtype == (torch.float32 if k.endswith(".scale") else torch.bfloat16), k


def test_config_inferred_from_shapes_and_config_json(tmp_path, tiny_files):
    assert dit_config_from_checkpoint(open_checkpoint(tiny_files["root"] / "native.safetensors")) == DITS["tiny"]
    assert dit_config_from_checkpoint(open_checkpoint(tiny_files["pipe"] / "transformer")) == DITS["tiny"]
    # a diffusers file without config.json: shapes through the key mapping
    ref = tiny_files["ref"]
    save_safetensors_atomic(ref.state_dict(), tmp_path / "noconfig" / "model.safetensors")
    assert dit_config_from_checkpoint(open_checkpoint(tmp_path / "noconfig")) == DITS["tiny"]
    # non-formula MLP width and a head dim that is not features/heads-derived survive inference
    odd = DiTConfig(features=64, heads=4, kvheads=2, layers=1, tdim=8, txtdim=32, txtheads=2, txtkvheads=1,
                    txtlayers=2, mlp_hidden=96, txt_mlp_hidden=40)
    from krea2kit.models.dit import SingleStreamDiT

    save_safetensors_atomic(SingleStreamDiT(odd).state_dict(), tmp_path / "odd.safetensors")
    assert load_dit(tmp_path / "odd.safetensors").config == odd


def test_key_mapping_covers_the_full_model():
    from krea2kit.models.dit import build_meta

    native = list(build_meta(PRESETS["krea2-raw"]).state_dict())
    diff = [native_to_diffusers(k) for k in native]
    assert len(set(diff)) == 430
    assert [diffusers_to_native(k) for k in diff] == native
    ref_file = KEYS_DIR / "krea2_diffusers_keys.txt"
    listed = {line.split("\t")[0] for line in ref_file.read_text().splitlines() if "\t" in line}
    assert listed
    assert {k for k in diff if k.startswith(("transformer_blocks.0.", "text_fusion.layerwise_blocks.0.",
                                            "text_fusion.refiner_blocks.0."))
            or not k.startswith(("transformer_blocks.", "text_fusion.layerwise", "text_fusion.refiner"))} == listed
    # module paths and LoRA suffixes (used by the LoRA loader)
    assert native_to_diffusers("blocks.3.attn.wq") == "transformer_blocks.3.attn.to_q"
    assert native_to_diffusers("blocks.3.attn.wo.lora_A.weight") == "transformer_blocks.3.attn.to_out.0.lora_A.weight"
    assert native_to_diffusers("txtfusion.refiner_blocks.1.mlp.gate") == "text_fusion.refiner_blocks.1.ff.gate"
    assert native_to_diffusers("tproj.1") == "time_mod_proj"
    assert native_to_diffusers("blocks.0.mod.lin") == "transformer_blocks.0.scale_shift_table"
    assert diffusers_to_native("txt_in.norm.weight") == "txtmlp.0.scale"
    assert diffusers_to_native("text_fusion.projector.lora_B.weight") == "txtfusion.projector.lora_B.weight"
    assert diffusers_to_native("transformer_blocks.2.attn.to_gate") == "blocks.2.attn.gate"
    for bad in ("blocks.0.attn.nope", "nothing", "transformer_blocks.0.foo"):
        with pytest.raises(KeyError):
            (native_to_diffusers if bad.startswith(("blocks", "nothing")) else diffusers_to_native)(bad)


# ---------------------------------------------------------------------------
# Bad files: one clear WeightsError each

def _err(path, **kw) -> str:
    with pytest.raises(WeightsError) as info:
        load_dit(path, **kw)
    return str(info.value)


def test_bad_files(tmp_path, tiny_files):
    native = tiny_files["native"]
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    assert "not a safetensors file" in _err(tmp_path / "junk.safetensors")

    good = (tiny_files["root"] / "native.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    assert "truncated" in _err(tmp_path / "cut.safetensors")

    save_safetensors_atomic({"decoder.conv_in.weight": torch.zeros(4, 4), "encoder.conv_in.weight": torch.zeros(4)},
                            tmp_path / "vae.safetensors")
    msg = _err(tmp_path / "vae.safetensors")
    assert "not a Krea 2 transformer" in msg and "VAE" in msg

    save_safetensors_atomic({"model.language_model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "te.safetensors")
    assert "text encoder" in _err(tmp_path / "te.safetensors")

    save_safetensors_atomic({"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 4),
                             "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(4, 2)},
                            tmp_path / "lora.safetensors")
    msg = _err(tmp_path / "lora.safetensors")
    assert "LoRA" in msg and "not a Krea 2 transformer" in msg

    msg = _err(tiny_files["pipe"])
    assert "pipeline folder" in msg and "transformer" in msg.split("hint:")[1]

    missing = {k: v for k, v in native.items() if k != "blocks.1.mlp.up.weight"}
    save_safetensors_atomic(missing, tmp_path / "missing.safetensors")
    msg = _err(tmp_path / "missing.safetensors")
    assert "1 missing (blocks.1.mlp.up.weight)" in msg

    extra = dict(native, **{"blocks.0.attn.extra.weight": torch.zeros(2)})
    save_safetensors_atomic(extra, tmp_path / "extra.safetensors")
    assert "1 unexpected (blocks.0.attn.extra.weight)" in _err(tmp_path / "extra.safetensors")

    msg = _err(tiny_files["root"] / "native.safetensors", config=DITS["micro"])
    assert "shape mismatch" in msg
    msg = _err(tiny_files["pipe"] / "transformer", config=DITS["micro"])
    assert "config.json" in msg

    # a diffusers folder whose config.json disagrees with its tensors
    import shutil

    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(tiny_files["pipe"] / "transformer", bad_cfg)
    conf = json.loads((bad_cfg / "config.json").read_text())
    conf["intermediate_size"] = 128
    (bad_cfg / "config.json").write_text(json.dumps(conf))
    msg = _err(bad_cfg)
    assert "shape mismatch for transformer_blocks." in msg and "ff." in msg

    quant = dict(native, **{"blocks.0.attn.wq.comfy_quant": torch.zeros(3, dtype=torch.uint8)})
    save_safetensors_atomic(quant, tmp_path / "fp8.safetensors")
    assert "quantized" in _err(tmp_path / "fp8.safetensors")

    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04")
    assert "pickled" in _err(tmp_path / "model.ckpt")
    assert "not found" in _err(tmp_path / "nope.safetensors")
