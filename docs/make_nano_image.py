"""Render the README's nano image: recipes/quickstart.toml through the real CLI, tiled.

    python docs/make_nano_image.py            # writes docs/nano-quickstart.png

Each 64x64 image is shown 3x larger (nearest neighbour, so no detail is invented); the
captions are in the recipe and under the image in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCALE = 3
GAP = 6


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "krea2kit", "-q", "run", str(ROOT / "recipes" / "quickstart.toml"), "--json",
             "--set", f'output.dir="{tmp}"'], check=True, capture_output=True, text=True).stdout
        paths = [json.loads(line)["path"] for line in out.splitlines() if line.strip()]
        tiles = [Image.open(p).convert("RGB") for p in paths]
        side = 64 * SCALE
        sheet = Image.new("RGB", (len(tiles) * (side + GAP) - GAP, side), (255, 255, 255))
        for i, tile in enumerate(tiles):
            sheet.paste(tile.resize((side, side), Image.NEAREST), (i * (side + GAP), 0))
        target = ROOT / "docs" / "nano-quickstart.png"
        sheet.save(target)
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
