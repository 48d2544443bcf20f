"""Built-in output writers: PNG, JPEG and WebP with provenance metadata, atomic."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ImageWriter:
    """Writes one image with its metadata (XMP AI marker always; parameters and recipe
    when the recipe keeps metadata on) through a temp file and an atomic rename."""

    def __init__(self, fmt: str, extension: str) -> None:
        self.format = fmt
        self.extension = extension

    def write(self, image: Any, path: Path, info: Any) -> Path:
        from krea2kit.output.writers import write_image

        return write_image(image, path, format=self.format, metadata=info.metadata, quality=info.quality)


def png(options=None) -> ImageWriter:
    return ImageWriter("png", ".png")


def jpeg(options=None) -> ImageWriter:
    return ImageWriter("jpeg", ".jpg")


def webp(options=None) -> ImageWriter:
    return ImageWriter("webp", ".webp")
