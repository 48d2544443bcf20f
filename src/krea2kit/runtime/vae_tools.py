"""``vae roundtrip``: read an image, encode + decode it, save the result, measure PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from krea2kit.errors import UsageError

MIN_SIDE = 16  # smaller images have no meaningful latent at 1/8 scale with 2x2 patches


def roundtrip_image(vae: Any, src: Path, dest: Path, *, tile: Any = "auto") -> dict[str, Any]:
    import torch
    from PIL import Image, UnidentifiedImageError

    from krea2kit.models.tiling import roundtrip, to_rgb
    from krea2kit.output.metadata import ImageMetadata
    from krea2kit.output.writers import write_image

    try:
        with Image.open(src) as im:
            im.load()
            image = im.copy()
    except FileNotFoundError:
        raise UsageError("image not found", file=str(src)) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"not a readable image: {exc}", file=str(src)) from None
    notes = []
    if min(image.size) < MIN_SIDE:
        raise UsageError(f"image is {image.width}x{image.height}; both sides must be at least {MIN_SIDE} pixels",
                         file=str(src))
    _, note = to_rgb(image)
    if note:
        notes.append(note)
    module = getattr(vae, "module", vae)
    with torch.inference_mode():
        result, value = roundtrip(module, image, tile=tile)
    # The reconstruction is a model output: it carries the AI marker like every image we write.
    write_image(result, dest, format="png", metadata=ImageMetadata(parameters=None))
    return {"psnr": float(value), "size": list(result.size), "notes": notes}
