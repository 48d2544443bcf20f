"""Built-in output writers (:class:`krea2kit.contracts.Writer`): PNG, JPEG and WebP with
provenance metadata, atomic."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from krea2kit.contracts import LoadContext

if TYPE_CHECKING:  # pragma: no cover
    from krea2kit.contracts import OutputInfo


class ImageWriter:
    """Writes one image with its metadata (XMP AI marker always; parameters and recipe
    when the recipe keeps metadata on) through a temp file and an atomic rename."""

    def __init__(self, fmt: str, extension: str) -> None:
        self.format = fmt
        self.extension = extension

    def write(self, image: Any, path: Path, info: OutputInfo) -> Path:
        from krea2kit.output.writers import write_image

        # Never replace a file unless the recipe says so: take the next free -2, -3 … name,
        # claimed atomically (krea2kit.files), and return the name actually used.
        overwrite = bool(getattr(info, "overwrite", False))
        return write_image(image, path, format=self.format, metadata=info.metadata, quality=info.quality,
                           overwrite=overwrite, numbered=not overwrite)


def png(options: None, context: LoadContext) -> ImageWriter:
    return ImageWriter("png", ".png")


def jpeg(options: None, context: LoadContext) -> ImageWriter:
    return ImageWriter("jpeg", ".jpg")


def webp(options: None, context: LoadContext) -> ImageWriter:
    return ImageWriter("webp", ".webp")
