"""Atomic PNG / JPEG / WebP writers that embed provenance metadata, and file-name templates.

Atomic: the image is encoded into a temporary file in the destination directory, flushed and
fsynced, then ``os.replace``d onto the final name, so a reader (or a crash) never sees a
half-written image; on any failure the temporary file is removed and the destination is left as it
was.

Deterministic: no timestamps are embedded, so the same pixels and metadata give the same bytes.

Layout (see :mod:`krea2kit.output.metadata`):

========  ==========================================  ==========================================
format    parameters (A1111)                           krea2kit record / AI marker
========  ==========================================  ==========================================
PNG       tEXt ``parameters`` (iTXt if not Latin-1)    iTXt ``krea2kit`` (zlib when > 2 KiB);
                                                       iTXt ``XML:com.adobe.xmp`` (uncompressed,
                                                       as the XMP spec asks) with the marker
JPEG      EXIF ``UserComment`` (big-endian EXIF)       XMP (APP1) with the marker and the record
                                                       as ``krea2kit:Record``; must fit 65,504 B
WebP      EXIF ``UserComment``                         XMP chunk, same content as JPEG
========  ==========================================  ==========================================

EXIF ``Software`` is set to ``krea2kit <version>`` in JPEG and WebP.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from datetime import date as _date
from pathlib import Path
from string import Formatter
from typing import Any

from .. import __version__
from ..errors import Krea2kitError, UsageError
from .metadata import (EXIF_IFD, EXIF_SOFTWARE, EXIF_USER_COMMENT, PNG_KEY_KREA2KIT,
                       PNG_KEY_PARAMETERS, PNG_KEY_XMP, ImageMetadata, encode_user_comment)

FORMATS = ("png", "jpeg", "webp")
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_ALIASES = {"jpg": "jpeg"}

#: Defaults chosen for archival quality of generated images (JPEG 95 is A1111's default too).
DEFAULT_JPEG_QUALITY = 95
DEFAULT_WEBP_QUALITY = 90  # a value of 100 with lossless=True would be a different codec path
PNG_COMPRESS_LEVEL = 6     # zlib default: size/speed balance; deterministic for a given level
PNG_ZIP_RECORD_OVER = 2048  # compress the krea2kit iTXt chunk above this many bytes

#: JPEG APP1 segments hold at most 65,533 bytes; the XMP header takes 29 of them (Pillow checks).
JPEG_MAX_XMP = 65533 - 29


class OutputError(Krea2kitError):
    """An image that could not be written."""


def _normalise_format(fmt: str) -> str:
    f = _ALIASES.get(fmt.lower(), fmt.lower())
    if f not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    return f


def _exif_bytes(parameters: str | None) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif.endian = ">"  # UTF-16-BE UserComment, as piexif/A1111 readers expect
    exif[EXIF_SOFTWARE] = f"krea2kit {__version__}"
    if parameters is not None:
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = encode_user_comment(parameters)
    return exif.tobytes()


def _save_kwargs(image: Any, fmt: str, metadata: ImageMetadata, quality: int | None) -> dict:
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if metadata.parameters is not None:
            info.add_text(PNG_KEY_PARAMETERS, metadata.parameters)  # falls back to iTXt if needed
        if metadata.krea2kit:  # an empty record (metadata switched off) is not written
            record = metadata.record_json()
            info.add_itxt(PNG_KEY_KREA2KIT, record, zip=len(record) > PNG_ZIP_RECORD_OVER)
        info.add_itxt(PNG_KEY_XMP, metadata.xmp(with_record=False).decode("utf-8"), zip=False)
        if quality is not None:
            raise UsageError("quality applies to jpeg and webp, not png")
        return {"format": "PNG", "pnginfo": info, "compress_level": PNG_COMPRESS_LEVEL}
    xmp = metadata.xmp(with_record=True)
    kwargs: dict[str, Any] = {"exif": _exif_bytes(metadata.parameters), "xmp": xmp}
    if quality is not None and not 1 <= int(quality) <= 100:
        raise UsageError(f"quality must be 1..100, got {quality}")
    if fmt == "jpeg":
        if len(xmp) > JPEG_MAX_XMP:
            raise OutputError(
                f"the krea2kit metadata ({len(xmp)} bytes of XMP) does not fit in a JPEG APP1 "
                f"segment ({JPEG_MAX_XMP} bytes)", hint="write PNG or WebP for this run")
        kwargs.update(format="JPEG", quality=int(quality or DEFAULT_JPEG_QUALITY), subsampling=0,
                      optimize=False)
    else:
        kwargs.update(format="WEBP", quality=int(quality or DEFAULT_WEBP_QUALITY), method=4)
    return kwargs


def write_image(image: Any, path: str | os.PathLike, *, format: str | None = None,
                metadata: ImageMetadata, quality: int | None = None,
                overwrite: bool = True) -> Path:
    """Write ``image`` (a PIL image) to ``path`` atomically with ``metadata``; return the path.

    ``format`` is ``"png"``, ``"jpeg"`` (``"jpg"``) or ``"webp"``; when ``None`` it is taken
    from the file extension. ``overwrite=False`` raises :class:`OutputError` when ``path``
    exists (checked before encoding; ``os.replace`` itself always replaces).
    """
    path = Path(path)
    if format is None:
        ext = path.suffix.lower().lstrip(".")
        if not ext:
            raise UsageError(f"{path}: no file extension to take the image format from",
                             hint=f"pass format= one of {', '.join(FORMATS)}")
        format = ext
    fmt = _normalise_format(format)
    if not isinstance(metadata, ImageMetadata):
        raise TypeError("metadata must be an ImageMetadata")
    if not overwrite and path.exists():
        raise OutputError(f"{path} already exists", file=str(path),
                          hint="choose another name template or allow overwriting")
    img = image
    if fmt == "jpeg" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")  # JPEG has no alpha
    kwargs = _save_kwargs(img, fmt, metadata, quality)

    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fp:
            img.save(fp, **kwargs)
            fp.flush()
            os.fsync(fp.fileno())
        # mkstemp creates 0o600; give the image the permissions a normal file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (Krea2kitError, KeyboardInterrupt, SystemExit)):
            raise
        raise OutputError(f"could not write {path}: {type(exc).__name__}: {exc}",
                          file=str(path)) from exc
    return path


# ---------------------------------------------------------------------------------------------
# File names

NAME_FIELDS = ("index", "seed", "prompt_slug", "date", "recipe", "model")
DEFAULT_SLUG_LENGTH = 48
_SLUG_BAD = re.compile(r"[^a-z0-9]+")


def slugify(text: str, *, max_length: int = DEFAULT_SLUG_LENGTH) -> str:
    """ASCII, lower-case, ``-``-separated, at most ``max_length`` characters, never empty.

    Accents are stripped; anything else that is not a letter or digit becomes ``-``; a cut
    happens at a word boundary when there is one. Safe on every file system (no separators,
    no dots, no reserved characters).
    """
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = _SLUG_BAD.sub("-", text).strip("-")
    if len(slug) > max_length:
        cut = slug[:max_length]
        slug = cut.rsplit("-", 1)[0] if "-" in cut else cut
    return slug or "untitled"


_SAFE_VALUE = re.compile(r"[^A-Za-z0-9._\-]+")


def render_name(template: str, **fields: Any) -> str:
    """Render a file-name template such as ``"{date}/{recipe}-{index:03d}-{seed}.png"``.

    Fields: ``index``, ``seed``, ``prompt_slug``, ``date``, ``recipe``, ``model``. ``prompt_slug``
    may be given as ``prompt=...`` and is slugified; ``date`` defaults to today (UTC is the
    caller's choice; pass ``date=`` for reproducible names). String values are sanitised (no
    path separators, ``..`` or control characters), so only the template itself can create
    directories. Unknown or missing fields raise :class:`UsageError` naming them.
    """
    values: dict[str, Any] = {}
    if "prompt" in fields:
        prompt = fields.pop("prompt")
        fields.setdefault("prompt_slug", slugify(prompt or ""))
    unknown = sorted(set(fields) - set(NAME_FIELDS))
    if unknown:
        raise UsageError(f"unknown file-name field(s) {unknown}", hint=f"known: {', '.join(NAME_FIELDS)}")
    try:
        used = [f for _, f, _, _ in Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"bad file-name template {template!r}: {exc}") from exc
    for name in used:
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base == "" or base.isdigit():
            raise UsageError(f"file-name template {template!r} uses a positional field",
                             hint=f"name the field: {', '.join(NAME_FIELDS)}")
        if base not in NAME_FIELDS:
            raise UsageError(f"unknown field {{{base}}} in file-name template {template!r}",
                             hint=f"known: {', '.join(NAME_FIELDS)}")
        if base not in fields and base != "date":
            raise UsageError(f"file-name template {template!r} needs {{{base}}}, which this run "
                             "does not provide")
    for k, v in fields.items():
        if isinstance(v, str):
            v = slugify(v) if k == "prompt_slug" else (_SAFE_VALUE.sub("-", v).strip(".-") or "x")
        values[k] = v
    values.setdefault("date", _date.today().isoformat())
    try:
        name = template.format(**values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise UsageError(f"file-name template {template!r} cannot be rendered: {exc}") from exc
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise UsageError(f"file-name template {template!r} renders to an unsafe path {name!r}")
    return name
