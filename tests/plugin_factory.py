"""Build real, importable distributions with ``krea2kit`` entry points in a folder.

``importlib.metadata`` finds ``*.dist-info`` folders on ``sys.path``, so putting the
folder on PYTHONPATH makes the plugin visible to a subprocess exactly as a pip-installed
one would be (entry point discovery, distribution name and version included).
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_plugin(root: Path, dist: str, module: str, source: str, *, ep_name: str | None = None,
                version: str = "0.1.0") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[krea2kit]\n{ep_name or dist} = {module}\n")
    return root
