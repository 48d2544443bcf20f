"""Atomic PNG / JPEG / WebP writers that embed provenance metadata, and file-name templates.

Atomic: the image is encoded into a hidden temporary file in the destination directory, flushed
and fsynced, then given its final name in one step (a hard link that fails if the name is taken,
or ``os.replace`` when overwriting; :mod:`krea2kit.files`), so a reader (or a crash) never
sees a half-written image and two runs never get the same name; on any failure the temporary file
is removed and the destination is left as it was.

Deterministic: no timestamps are embedded, so the same pixels and metadata give the same bytes.

Layout (see :mod:`krea2kit.output.metadata`):

========  ==========================================  ==========================================
format    parameters (A1111)                           krea2kit record / AI marker
========  ==========================================  ==========================================
PNG       tEXt ``parameters`` (iTXt if not Latin-1)    iTXt ``krea2kit`` (zlib when > 2 KiB);
                                                       iTXt ``XML:com.adobe.xmp`` (uncompressed,
                                                       as the XMP spec asks) with the marker
JPEG      EXIF ``UserComment`` (as A1111 writes it)     XMP (APP1) with the marker and the record
                                                       as ``krea2kit:Record``; must fit 65,504 B
WebP      EXIF ``UserComment``                         XMP chunk, same content as JPEG
========  ==========================================  ==========================================

EXIF ``Software`` is set to ``krea2kit <version>`` in JPEG and WebP. ``UserComment`` has type
UNDEFINED and holds ``UNICODE\\0`` + UTF-16-BE text, what A1111 writes through piexif and reads
back with ``piexif.helper.UserComment.load`` (:func:`krea2kit.output.metadata.build_exif`).
"""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import date as _date
from pathlib import Path
from string import Formatter
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..files import NameTaken, OutputError, atomic_write
from .metadata import PNG_KEY_KREA2KIT, PNG_KEY_PARAMETERS, PNG_KEY_XMP, ImageMetadata, build_exif

FORMATS = ("png", "jpeg", "webp")
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_ALIASES = {"jpg": "jpeg"}

#: Defaults chosen for archival quality of generated images (JPEG 95 is A1111's default too).
DEFAULT_JPEG_QUALITY = 95
DEFAULT_WEBP_QUALITY = 90  # a value of 100 with lossless=True would be a different codec path
PNG_COMPRESS_LEVEL = 6     # zlib default: size/speed balance; deterministic for a given level
PNG_ZIP_RECORD_OVER = 2048  # compress the krea2kit iTXt chunk above this many bytes

#: JPEG APP1 segments hold at most 65,533 bytes; the XMP header takes 29 of them (Pillow checks).
JPEG_MAX_SEGMENT = 65533
JPEG_MAX_XMP = JPEG_MAX_SEGMENT - 29


# OutputError lives with the shared file helper (one atomic-write path for every command);
# it stays importable from here.


def _normalise_format(fmt: str) -> str:
    f = _ALIASES.get(fmt.lower(), fmt.lower())
    if f not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    return f


def _exif_bytes(parameters: str | None) -> bytes:
    # UserComment as A1111 writes it (UNDEFINED, "UNICODE\0" + UTF-16-BE): see build_exif.
    return build_exif(parameters=parameters, software=f"krea2kit {__version__}")


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
    exif = _exif_bytes(metadata.parameters)
    kwargs: dict[str, Any] = {"exif": exif, "xmp": xmp}
    if quality is not None and not 1 <= int(quality) <= 100:
        raise UsageError(f"quality must be 1..100, got {quality}")
    if fmt == "jpeg":
        if len(xmp) > JPEG_MAX_XMP:
            raise OutputError(
                f"the krea2kit metadata ({len(xmp)} bytes of XMP) does not fit in a JPEG APP1 "
                f"segment ({JPEG_MAX_XMP} bytes)", hint="write PNG or WebP for this run")
        if len(exif) > JPEG_MAX_SEGMENT:
            raise OutputError(
                f"the parameters text ({len(exif)} bytes of EXIF) does not fit in a JPEG APP1 "
                f"segment ({JPEG_MAX_SEGMENT} bytes)",
                hint="write PNG or WebP for this run, or shorten the prompt")
        kwargs.update(format="JPEG", quality=int(quality or DEFAULT_JPEG_QUALITY), subsampling=0,
                      optimize=False)
    else:
        kwargs.update(format="WEBP", quality=int(quality or DEFAULT_WEBP_QUALITY), method=4)
    return kwargs


def write_image(image: Any, path: str | os.PathLike, *, format: str | None = None,
                metadata: ImageMetadata, quality: int | None = None,
                overwrite: bool = False, numbered: bool = False) -> Path:
    """Write ``image`` (a PIL image) to ``path`` atomically with ``metadata``; return the path used.

    ``format`` is ``"png"``, ``"jpeg"`` (``"jpg"``) or ``"webp"``; when ``None`` it is taken
    from the file extension. An existing ``path`` is replaced only with ``overwrite=True``;
    otherwise ``numbered=True`` takes the next free ``-2``, ``-3`` … name and without it
    :class:`~krea2kit.files.NameTaken` is raised (checked before encoding, and again,
    atomically, when the finished file takes its name: see :mod:`krea2kit.files`).
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
    hint = "choose another name template or allow overwriting"
    if not overwrite and not numbered and os.path.lexists(path):
        raise NameTaken("the file already exists", file=str(path), hint=hint)
    img = image
    if fmt == "jpeg" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")  # JPEG has no alpha
    kwargs = _save_kwargs(img, fmt, metadata, quality)
    return atomic_write(path, lambda fp: img.save(fp, **kwargs), overwrite=overwrite, numbered=numbered,
                        hint=hint)


# ---------------------------------------------------------------------------------------------
# File names

NAME_FIELDS = ("index", "seed", "prompt_slug", "name", "date", "recipe", "model")
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


#: Widths above this in a format spec are refused: a name is for a file system, not a report.
MAX_FIELD_WIDTH = 12
_INT_FIELDS = {"index", "seed"}
# The only format specs allowed: an optional zero pad and width, and a type (ints: ``04d``,
# ``6``, ``x``; strings: a width and/or a precision that shortens, ``.20``). No fill characters
# (one could be ``/``), no nested fields, no conversions, no attribute or index access.
_INT_SPEC = re.compile(r"0?(?P<width>\d{1,2})?[dxX]?")
_STR_SPEC = re.compile(r"(?P<width>\d{1,2})?(?:\.(?P<precision>\d{1,3}))?s?")
_BAD_LITERAL = re.compile(r"[\x00-\x1f\x7f\\]")


def check_template_syntax(template: str) -> list[str]:
    """Refuse a template that is more than plain ``{field}`` / ``{field:spec}`` placeholders.

    Returns the fields it uses. A template is untrusted input (it can come from a recipe a
    stranger wrote, or from an image), so format-spec features that could make huge names
    (``{index:0300d}``), reach object attributes (``{index.__class__}``) or items
    (``{seed[0]}``) are refused rather than rendered.
    """
    if not isinstance(template, str) or not template:
        raise UsageError("the file-name template is empty", hint="e.g. name = \"{recipe}-{index:04d}-{seed}\"")
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"bad file-name template {template!r}: {exc}",
                         hint="write a literal brace as {{ or }}") from None
    used = []
    for literal, field, spec, conversion in parsed:
        bad = _BAD_LITERAL.search(literal)
        if bad:
            raise UsageError(f"file-name template {template!r} contains the character {bad.group()!r}",
                             hint="use letters, digits, '-', '_', '.', and '/' for a subfolder")
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise UsageError(f"file-name template {template!r} uses a positional field",
                             hint=f"name the field: {', '.join(NAME_FIELDS)}")
        if "." in field or "[" in field:
            raise UsageError(f"file-name template {template!r}: {{{field}}} uses attribute or index "
                             "access, which is not allowed",
                             hint=f"use a plain field: {', '.join(NAME_FIELDS)}")
        if field not in NAME_FIELDS:
            raise UsageError(f"unknown field {{{field}}} in file-name template {template!r}",
                             hint=f"known: {', '.join(NAME_FIELDS)}")
        if conversion is not None:
            raise UsageError(f"file-name template {template!r}: the conversion !{conversion} in "
                             f"{{{field}}} is not allowed", hint=f"write {{{field}}}")
        if spec:
            m = (_INT_SPEC if field in _INT_FIELDS else _STR_SPEC).fullmatch(spec)
            if m is None or int(m.group("width") or 0) > MAX_FIELD_WIDTH:
                example = "{index:04d}" if field in _INT_FIELDS else f"{{{field}:.20}}"
                raise UsageError(
                    f"file-name template {template!r}: the format {{{field}:{spec}}} is not allowed",
                    hint=f"use a plain width of at most {MAX_FIELD_WIDTH}, like {example}")
        used.append(field)
    return used


def render_name(template: str, **fields: Any) -> str:
    """Render a file-name template such as ``"{date}/{recipe}-{index:03d}-{seed}"``.

    Fields: ``index``, ``seed``, ``prompt_slug``, ``name``, ``date``, ``recipe``, ``model``, each plain or
    with a bounded width (:func:`check_template_syntax`). ``prompt_slug`` may be given as
    ``prompt=...`` and is slugified; ``date`` defaults to today (UTC is the caller's choice;
    pass ``date=`` for reproducible names). String values are sanitised (no path separators,
    ``..`` or control characters), so only the template itself can create directories, and
    every ``/``-separated part of the result must be a real name (not empty, ``.`` or ``..``).
    Unknown or missing fields raise :class:`UsageError` naming them.
    """
    values: dict[str, Any] = {}
    if "prompt" in fields:
        prompt = fields.pop("prompt")
        fields.setdefault("prompt_slug", slugify(prompt or ""))
    unknown = sorted(set(fields) - set(NAME_FIELDS))
    if unknown:
        raise UsageError(f"unknown file-name field(s) {unknown}", hint=f"known: {', '.join(NAME_FIELDS)}")
    for name in check_template_syntax(template):
        if name not in fields and name != "date":
            raise UsageError(f"file-name template {template!r} needs {{{name}}}, which this run "
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
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise UsageError(f"file-name template {template!r} renders to an unsafe path {name!r}",
                         hint="each '/'-separated part must be a name (not empty, '.' or '..'); "
                              "the folder is output.dir")
    return name
