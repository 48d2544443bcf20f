"""CONTRIBUTING.md's part table is the one generated from krea2kit.contracts."""

from __future__ import annotations

import re

from contributing_examples import CONTRIBUTING

from krea2kit.contracts import PROTOCOLS
from krea2kit.registry import contributing_table
from krea2kit.registry import HOOK_KINDS


def test_contributing_table_matches_the_contracts():
    text = CONTRIBUTING.read_text(encoding="utf-8")
    found = re.search(r"<!-- contract-table[^>]*-->\n(.*?)\n<!-- /contract-table -->", text, re.S)
    assert found, "CONTRIBUTING.md lost its contract-table markers"
    assert found.group(1) == contributing_table(), (
        "CONTRIBUTING.md's table differs from krea2kit.contracts: paste contributing_table()'s output")


def test_every_part_hook_has_a_protocol_and_a_table_row():
    table = contributing_table()
    part_kinds = {cls.kind for cls in HOOK_KINDS.values()} - {"model", "options"}
    assert part_kinds == set(PROTOCOLS)
    for hook, cls in HOOK_KINDS.items():
        if cls.kind in PROTOCOLS:
            assert f"| `{hook}` | `{cls.__name__}` |" in table


def test_protocol_docstrings_state_units_and_shapes():
    from krea2kit import contracts

    assert "[-1, 1]" in contracts.VAEPart.encode.__doc__ and "(B, C, H/f, W/f)" in contracts.VAEPart.decode.__doc__
    assert "noise - x0" in contracts.__doc__ and "sigma" in contracts.Sampler.__doc__
    assert "latent_size" in contracts.DiTPart.make_denoiser.__doc__
