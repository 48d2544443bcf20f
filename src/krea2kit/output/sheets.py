"""Contact sheets: a grid of images with a label over each column and, optionally, one left of
each row. Shared by ``run --sweep``, ``[matrix]`` and the trainer's sample sheets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from PIL import Image

LABEL_HEIGHT = 14  # one line of Pillow's default font, with a pixel above and below
MIN_CELL = 16


def contact_sheet(rows: Sequence[Sequence["Image.Image | None"]], labels: Sequence[str],
                  row_labels: Sequence[str] | None = None) -> "Image.Image":
    """The grid; a ``None`` cell (a blocked image) is left grey. Columns widen to fit their
    labels, so a label never runs into the next one even over 64-pixel images."""
    from PIL import Image, ImageDraw

    cells = [im for row in rows for im in row if im is not None]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max([MIN_CELL] + [im.width for im in cells] + [int(measure.textlength(t)) + 4 for t in labels])
    cell_h = max([MIN_CELL] + [im.height for im in cells])
    left = max((int(measure.textlength(t)) for t in row_labels), default=0) + 6 if row_labels is not None else 0
    sheet = Image.new("RGB", (left + len(labels) * cell_w, LABEL_HEIGHT + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels):
        draw.text((left + c * cell_w + 2, 1), label, fill="black")
    for r, text in enumerate(row_labels or []):
        draw.text((2, LABEL_HEIGHT + r * cell_h + cell_h // 2 - 5), text, fill="black")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            x, y = left + c * cell_w, LABEL_HEIGHT + r * cell_h
            if im is None:
                draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=(128, 128, 128))
            else:
                sheet.paste(im, (x, y))
    return sheet
