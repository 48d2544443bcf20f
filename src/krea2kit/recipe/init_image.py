"""The ``[init]`` image and mask: opened and checked as untrusted files, framed to a job size.

Checked at plan time (:func:`check_init`), before any weights load: each file exists, is a
regular file, is an image Pillow can decode, and is at most :data:`MAX_INIT_PIXELS` pixels
(a decompression bomb is refused from its header, before its pixels are decoded). Errors are
:class:`~krea2kit.errors.RecipeError` (exit 2) naming ``init.image`` or ``init.mask``.

Framing (:func:`framed`): the picture is scaled (Lanczos) so it *covers* the job size, then
center-cropped to it, so it is never stretched and never letterboxed; the mask is framed
the same way, so the two stay aligned whatever their size.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from krea2kit.errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# The largest init image or mask, in pixels (8192 x 8192, the largest image size a recipe may ask).
MAX_INIT_PIXELS = 8192 * 8192
# The largest file, in bytes: a compressed picture this size is already far past MAX_INIT_PIXELS.
MAX_INIT_BYTES = 256 * 1024 * 1024


def local_path(value: str) -> Path:
    return Path(value).expanduser()


def open_checked(value: str, key: str, *, file: str | None = None) -> Image.Image:
    """The picture at ``value`` decoded (RGB, or L for a mask), or a RecipeError naming ``key``."""
    from PIL import Image

    path = local_path(value)
    fix = f"give a PNG, JPEG or WebP file: {key} = \"path/to/picture.png\" (or --set {key}=PATH)"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RecipeError(f"file not found: {path}", file=file, key=key, hint=fix) from None
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc.strerror or exc}", file=file, key=key) from None
    if not stat.S_ISREG(st.st_mode):  # a folder, FIFO or device: never opened
        raise RecipeError(f"{path} is not a regular file", file=file, key=key, hint=fix)
    if st.st_size > MAX_INIT_BYTES:
        raise RecipeError(f"{path} is {st.st_size / 2**20:.0f} MiB, more than the "
                          f"{MAX_INIT_BYTES // 2**20} MiB an init image may be", file=file, key=key, hint=fix)
    try:
        with warnings.catch_warnings():
            # Pillow warns about (and past twice its limit refuses) huge images; ours is lower.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_INIT_PIXELS:
                    raise RecipeError(
                        f"{path} is {w}x{h} pixels, more than the {MAX_INIT_PIXELS:,} (8192x8192) an init "
                        "image may have", file=file, key=key, hint="scale the picture down first")
                im.load()
                return im.convert("L" if key.endswith("mask") else "RGB")
    except RecipeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RecipeError(f"{path} declares too many pixels ({exc})", file=file, key=key,
                          hint="scale the picture down first") from None
    except Exception as exc:  # Pillow raises many types for files that are not pictures or are damaged
        raise RecipeError(f"{path} is not an image Pillow can read ({type(exc).__name__}: {exc})",
                          file=file, key=key, hint=fix) from None


def check_init(init, file_of) -> None:
    """Plan-time checks of the ``[init]`` table (``init`` may be None)."""
    if init is None:
        return
    open_checked(init.image, "init.image", file=file_of("init.image"))
    if init.mask is not None:
        open_checked(init.mask, "init.mask", file=file_of("init.mask"))


def framed(im: Image.Image, width: int, height: int) -> Image.Image:
    """``im`` scaled to cover ``width`` x ``height`` (aspect kept) and center-cropped to it."""
    from PIL import Image

    w, h = im.size
    scale = max(width / w, height / h)
    sw, sh = max(width, round(w * scale)), max(height, round(h * scale))
    if (sw, sh) != (w, h):
        im = im.resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - width) // 2, (sh - height) // 2
    return im.crop((left, top, left + width, top + height))


def feathered(mask: Image.Image, radius: float) -> Image.Image:
    """The mask with its edges softened by a Gaussian blur of ``radius`` pixels."""
    from PIL import ImageFilter

    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def file_sha256(value: str) -> str:
    from krea2kit.files import sha256_of_file

    return sha256_of_file(local_path(value))
