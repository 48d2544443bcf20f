"""The one native <-> diffusers name table, checked against the reference key lists of both
layouts (names and shapes of the full Krea 2 transformer, block 0 of each kind listed)."""

from __future__ import annotations

import re
from pathlib import Path

from krea2kit.models import dit_loader, key_names

KEYS_DIR = Path(__file__).parents[1] / "fixtures" / "keys"


def _listed(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS_DIR / name).read_text().splitlines():
        if "\t" in line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return out


NATIVE = _listed("krea2_native_keys.txt")
DIFFUSERS = _listed("krea2_diffusers_keys.txt")


def test_reference_lists_map_one_to_one_in_both_directions():
    assert len(NATIVE) == len(DIFFUSERS) == 55
    mapped = {key_names.native_to_diffusers(k): k for k in NATIVE}
    assert set(mapped) == set(DIFFUSERS)
    assert all(key_names.diffusers_to_native(d) == n for d, n in mapped.items())
    # Same shapes on both sides except the one reshape the table names (mod.lin -> scale_shift_table).
    for d, n in mapped.items():
        if n.endswith("mod.lin"):
            assert DIFFUSERS[d][0] * DIFFUSERS[d][1] == NATIVE[n][0]
        else:
            assert DIFFUSERS[d] == NATIVE[n], (n, d)


def test_linear_rows_are_exactly_the_two_dimensional_weights_of_the_reference():
    linears = {k[: -len(".weight")] for k, shape in NATIVE.items() if k.endswith(".weight") and len(shape) == 2}
    in_blocks = {re.sub(r"^(blocks|txtfusion\.\w+_blocks)\.0\.", "", n) for n in linears if ".0." in n}
    standalone = {n for n in linears if ".0." not in n}
    assert in_blocks == set(key_names.BLOCK_LINEARS)
    assert standalone == set(key_names.STANDALONE_LINEARS)
    for n in linears:
        assert key_names.is_native_linear(n)
        assert key_names.linear_to_diffusers(n) + ".weight" in DIFFUSERS
        assert key_names.linear_to_native(key_names.linear_to_diffusers(n)) == n
    for not_linear in ("blocks.0.prenorm", "txtmlp.0", "last.norm", "blocks.0.attn.qknorm.qnorm", "blocks.0.mod.lin"):
        assert not key_names.is_native_linear(not_linear)


def test_flattened_spellings_read_back_for_every_linear_of_the_full_model():
    from krea2kit.models.dit import PRESETS, build_meta

    model = build_meta(PRESETS["krea2-raw"])
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"]
    assert len(names) == 264
    for n in names:
        d = key_names.linear_to_diffusers(n)
        assert key_names.unflatten_native(key_names.flat(n)) == n
        assert key_names.unflatten_diffusers(key_names.flat(d)) == d
    assert key_names.linear_to_native("transformer_blocks.4.attn.to_out") == "blocks.4.attn.wo"  # ComfyUI alias
    assert key_names.linear_to_native("text_fusion.refiner_blocks.1.attn.to_qkv") == tuple(
        f"txtfusion.refiner_blocks.1.attn.{w}" for w in ("wq", "wk", "wv"))


def test_weight_loader_and_lora_reader_share_the_table():
    from krea2kit.lora import formats

    assert dit_loader.native_to_diffusers is key_names.native_to_diffusers
    assert dit_loader.diffusers_to_native is key_names.diffusers_to_native
    assert formats.native_to_diffusers is key_names.linear_to_diffusers
    assert formats.diffusers_to_native is key_names.linear_to_native
    assert dit_loader.DIFFUSERS_SIGNATURE == "text_fusion.projector.weight"
