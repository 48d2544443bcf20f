"""Render the README's nano image: recipes/quickstart.toml through the real CLI, each picture
with its prompt and the nano scorer's verdict under it.

    python docs/make_nano_image.py     # writes docs/nano-quickstart.png

Run from a repository checkout: the scorer lives in ``nano-train/`` (put on the path here), not in
the package. Each 128x128 image is shown 2x larger (nearest neighbour, so no detail is invented).
Under it: the prompt, the scorer's adherence (the fraction of its checks that pass) and what it
saw per object (colour, shape, place), so a reader can check the score against the picture by eye.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SCALE = 2
GAP = 12
FONT_SIZE = 13
LINE = FONT_SIZE + 4
WRAP = 34  # characters per caption line at this font size and a 256 px column


def describe(report) -> list[str]:
    """The scorer's reading of the picture: its score, then one line per object it found."""
    verdict = "all checks pass" if report.strict else f"{sum(report.checks.values())}/{len(report.checks)} checks"
    from nanodev.world import position_name

    lines = [f"score {report.adherence:.2f} ({verdict})"]
    for det in report.detections:
        lines.append(f"saw: {det.colour} {det.shape}, {position_name(det.row, det.col)}")
    return lines


def main() -> int:
    sys.path.insert(0, str(ROOT / "nano-train"))
    from nanodev import scorer

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "krea2kit", "-q", "run", str(ROOT / "recipes" / "quickstart.toml"), "--json",
             "--set", f'output.dir="{tmp}"'], check=True, capture_output=True, text=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        tiles = [Image.open(r["path"]).convert("RGB") for r in records]
        texts = []
        for rec, tile in zip(records, tiles):
            report = scorer.score(tile, rec["prompt"])
            texts.append(textwrap.wrap(f'"{rec["prompt"]}" (seed {rec["seed"]})', WRAP) + describe(report))
        font = ImageFont.load_default(size=FONT_SIZE)
        side = tiles[0].width * SCALE
        height = side + GAP // 2 + LINE * max(len(t) for t in texts) + GAP // 2
        sheet = Image.new("RGB", (len(tiles) * (side + GAP) - GAP, height), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, (tile, lines) in enumerate(zip(tiles, texts)):
            x = i * (side + GAP)
            sheet.paste(tile.resize((side, side), Image.NEAREST), (x, 0))
            for j, line in enumerate(lines):
                draw.text((x + 2, side + GAP // 2 + j * LINE), line, fill=(20, 20, 20), font=font)
        target = ROOT / "docs" / "nano-quickstart.png"
        sheet.save(target, optimize=True)
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
