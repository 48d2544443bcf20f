"""The plugin examples of CONTRIBUTING.md, read out of the document itself, so what the
tests run is exactly what a plugin author copies."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
# A complete plugin module is a python block whose first line names its file: "# krea2kit_x.py".
_BLOCK = re.compile(r"```python\n# (krea2kit_\w+)\.py\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    """module name -> source, for every example plugin in CONTRIBUTING.md."""
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(CONTRIBUTING.read_text(encoding="utf-8"))}


def plugin_name(module: str) -> str:
    return module.replace("_", "-")
