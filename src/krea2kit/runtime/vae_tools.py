"""``vae roundtrip``: read an image, encode + decode it, save the result, measure PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from krea2kit.errors import UsageError

MIN_SIDE = 16  # smaller images have no meaningful latent at 1/8 scale with 2x2 patches


def check_destination(src: Path, dest: Path, *, overwrite: bool) -> None:
    """The output rule of every command (exit 2, before any weights load): an existing file is
    replaced only with --overwrite, never the input itself, and the folder must be usable."""
    import os

    from krea2kit.files import refuse_existing

    if dest.suffix.lower() != ".png":
        raise UsageError(f"{dest}: the reconstruction is written as PNG; give a name ending in .png", key="--out")
    if os.path.lexists(dest) and os.path.lexists(src) and os.path.realpath(dest) == os.path.realpath(src):
        raise UsageError("the output would replace the input image", file=str(dest), key="--out",
                         hint="give --out another name")
    if os.path.isdir(dest):
        raise UsageError(f"{dest} is a folder", key="--out", hint="give --out a file name")
    if not overwrite:
        refuse_existing(dest, hint="pass --overwrite to replace it, or give --out another name")
    probe = dest.parent.absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if not probe.is_dir() else "is not writable"
        raise UsageError(f"cannot write {dest}: {probe} {why}", key="--out", hint="give --out a path you can write to")


def require_finite(weights: str | None, *, key: str = "--weights"):
    """A ``check(tensor, what)`` for :func:`krea2kit.models.tiling.roundtrip`: NaN or inf in
    the VAE's output stops the command (exit 4) naming the weights, as a run does
    (``Pipeline.require_finite``), before anything is written."""

    def check(x: Any, what: str) -> None:
        import torch

        if not isinstance(x, torch.Tensor) or bool(torch.isfinite(x).all()):
            return
        from krea2kit.errors import WeightsError

        hint = "check or fetch the weights again (compare the file's sha256), or give --weights another file"
        if x.dtype == torch.float16:
            hint += "; float16 can overflow"
        which = "its weights (this file)" if weights else "its weights"
        raise WeightsError(f"the VAE produced NaN or infinite values in {what}: {which} hold non-finite values "
                           "or are not the model they should be; nothing was written",
                           file=weights, key=key, hint=hint)

    return check


def roundtrip_image(vae: Any, src: Path, dest: Path, *, tile: Any = "auto", overwrite: bool = False,
                    weights: str | None = None) -> dict[str, Any]:
    """Encode and decode ``src``, write ``dest`` (PNG); ``weights`` (the VAE's location) is
    named if the VAE's output is not finite."""
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
        result, value = roundtrip(module, image, check=require_finite(weights), tile=tile)
    # The reconstruction is a model output: it carries the AI marker like every image we write.
    # Claimed atomically: a file that appeared at dest since the check is kept, not replaced.
    path = write_image(result, dest, format="png", metadata=ImageMetadata(parameters=None), overwrite=overwrite)
    return {"path": path, "psnr": float(value), "size": list(result.size), "notes": notes}
