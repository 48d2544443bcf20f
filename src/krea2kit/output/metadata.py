"""Provenance metadata for generated images, and reading it back.

Three layers:

1. ``parameters``: the AUTOMATIC1111 "infotext", the de-facto standard read by Civitai, image
   viewers and the ComfyUI/Fooocus importers::

       <prompt>
       Negative prompt: <negative>
       Steps: 8, Sampler: euler, CFG scale: 1, Krea guidance: 0, Seed: 42, Size: 1024x1024, ...

   ``CFG scale`` means what A1111 means (the standard scale ``s = g + 1``); Krea's own guidance
   ``g`` is its own field (see :func:`generation_params`).

   Values that contain ``,``, ``:`` or a newline are JSON-quoted, as A1111's
   ``infotext_utils.quote`` does, and read back with A1111's ``re_param_code`` pattern.
2. An XMP packet with ``Iptc4xmpExt:DigitalSourceType`` =
   ``http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia``: IPTC's
   recommended machine-readable "made by a trained model" marker. It is always written; a recipe
   may drop its prompt text for privacy, never this marker (Krea 2 licence §4.1(c)/§4.3).
3. ``krea2kit``: canonical JSON (sorted keys, compact) with the fully resolved recipe, plugin and
   weight identities and the filter verdicts, so a run can be reproduced from its image.

Where each layer goes (see :mod:`krea2kit.output.writers`):

* PNG: tEXt/iTXt ``parameters``, iTXt ``krea2kit``, iTXt ``XML:com.adobe.xmp`` (the XMP packet);
* JPEG/WebP: EXIF ``UserComment`` = parameters (as A1111-compatible savers do), and the XMP packet
  carries the ``krea2kit`` JSON as the ``krea2kit:Record`` property.

Nothing here needs torch; reading needs only Pillow and the standard library.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Mapping
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from .. import __version__

#: IPTC NewsCodes "Digital Source Type" vocabulary (cv.iptc.org/newscodes/digitalsourcetype).
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
#: For img2img / inpainting results that start from a real image.
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia")
AI_SOURCE_TYPES = (TRAINED_ALGORITHMIC_MEDIA, COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA)

NS_X = "adobe:ns:meta/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
NS_XMP = "http://ns.adobe.com/xap/1.0/"
#: Our own XMP namespace (any stable URI works; this one names the project).
NS_KREA2KIT = "https://krea2kit.invalid/ns/1.0/"

PNG_KEY_PARAMETERS = "parameters"
PNG_KEY_KREA2KIT = "krea2kit"
PNG_KEY_XMP = "XML:com.adobe.xmp"

#: Schema version of the krea2kit JSON record.
RECORD_SCHEMA = 1

# A1111 modules/infotext_utils.py ``re_param_code`` (the parser every importer copies).
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


# ---------------------------------------------------------------------------------------------
# A1111 parameters text


def quote(value: Any) -> str:
    """A1111's rule: JSON-quote a value that contains ``,``, ``:`` or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _fmt_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def generation_params(*, steps: int | None = None, sampler: str | None = None,
                      guidance: float | None = None, seed: int | None = None,
                      width: int | None = None, height: int | None = None,
                      model: str | None = None, model_hash: str | None = None,
                      shift_mu: float | None = None,
                      variation_seed: int | None = None, variation_strength: float | None = None,
                      extra: Mapping[str, Any] | None = None,
                      version: str | None = None) -> dict[str, Any]:
    """The ordered ``key: value`` fields of the parameters line, A1111 names first.

    ``guidance`` is Krea's ``g`` (``v = cond + g (cond - uncond)``, off at 0). A1111's
    "CFG scale" is the standard scale ``s`` of ``v = uncond + s (cond - uncond)``, the same
    velocity with ``s = g + 1``; so ``CFG scale`` is written as ``g + 1`` (``1`` when guidance is
    off: A1111's "no guidance effect") and ``g`` itself as ``Krea guidance``. Readers that know
    only A1111's fields then read the strength correctly. "Variation seed" and "Variation seed
    strength" are A1111's names for a ``[variation]``, written (as A1111 does) only when the
    strength is not 0. ``None`` values are left out;
    ``extra`` fields go after the standard ones.
    """
    g = None if guidance is None else float(guidance)
    out: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": None if g is None else _fmt_number(g + 1.0),
        "Krea guidance": None if g is None else _fmt_number(g),
        "Seed": seed,
        "Size": f"{width}x{height}" if width and height else None,
        "Model hash": model_hash,
        "Model": model,
        "Variation seed": variation_seed if variation_strength else None,
        "Variation seed strength": _fmt_number(float(variation_strength)) if variation_seed is not None
        and variation_strength else None,
        "Shift mu": None if shift_mu is None else _fmt_number(float(shift_mu)),
    }
    for k, v in (extra or {}).items():
        if not re.fullmatch(r"\w[\w \-/]*", k):
            raise ValueError(f"parameter name {k!r} cannot be parsed back by A1111 readers")
        out[k] = v
    out["Version"] = version if version is not None else f"krea2kit {__version__}"
    return {k: v for k, v in out.items() if v is not None}


def build_parameters(prompt: str | None, negative_prompt: str | None,
                     params: Mapping[str, Any]) -> str:
    """The A1111 infotext. ``prompt=None`` leaves the prompt (and negative) out, for privacy."""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    head = ""
    if prompt is not None:
        head = prompt
        if negative_prompt:
            head += f"\nNegative prompt: {negative_prompt}"
    return f"{head}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 infotext: ``{"prompt", "negative_prompt", "params": {key: str}}``.

    Mirrors A1111's ``parse_generation_parameters``: the last line holds the fields when it has
    at least three of them; lines before it are the prompt until ``Negative prompt:``.
    """
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for ln in lines:
        if ln.startswith("Negative prompt:"):
            in_negative = True
            ln = ln[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(ln)
    params = {k.strip(): _unquote(v.strip()) for k, v in _RE_PARAM.findall(last)}
    return {"prompt": "\n".join(prompt) or None, "negative_prompt": "\n".join(negative) or None,
            "params": params}


# ---------------------------------------------------------------------------------------------
# krea2kit JSON record


def _json_default(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "model_dump"):  # pydantic
        return obj.model_dump(mode="json")
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable in image metadata")


def canonical_json(data: Any) -> str:
    """Deterministic compact JSON (sorted keys, no NaN), so identical runs give identical bytes."""
    return json.dumps(data, default=_json_default, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"), allow_nan=False)


def build_record(*, recipe: Mapping[str, Any], plugins: Mapping[str, str] | None = None,
                 weights: Mapping[str, Any] | None = None, filters: Any = None,
                 unfiltered: bool = False, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``krea2kit`` record: fully resolved recipe, plugin versions (``{name: version}``),
    weight identities (``{role: {"path", "sha256", ...}}``), filter verdicts (Decision objects
    or their dicts) and the ``unfiltered`` flag (True only for an acknowledged unfiltered run)."""
    record = {
        "schema": RECORD_SCHEMA,
        "generator": f"krea2kit {__version__}",
        "recipe": dict(recipe),
        "plugins": dict(plugins or {}),
        "weights": dict(weights or {}),
        "filters": filters if filters is not None else [],
        "unfiltered": bool(unfiltered),
    }
    if extra:
        for k in extra:
            if k in record:
                raise ValueError(f"extra key {k!r} clashes with a record field")
        record.update(extra)
    # Round-trip through canonical JSON now, so an unserialisable value fails here, before any
    # image file is touched, and the record is plain data from now on.
    return json.loads(canonical_json(record))


# ---------------------------------------------------------------------------------------------
# XMP


def build_xmp(*, digital_source_type: str = TRAINED_ALGORITHMIC_MEDIA,
              record: Mapping[str, Any] | None = None, creator_tool: str | None = None) -> bytes:
    """A UTF-8 XMP packet with the IPTC Digital Source Type (and the krea2kit record if given)."""
    if digital_source_type not in AI_SOURCE_TYPES:
        raise ValueError(f"digital_source_type must be one of {AI_SOURCE_TYPES}")
    tool = creator_tool or f"krea2kit {__version__}"
    body = [
        f"    <Iptc4xmpExt:DigitalSourceType>{escape(digital_source_type)}</Iptc4xmpExt:DigitalSourceType>",
        f"    <xmp:CreatorTool>{escape(tool)}</xmp:CreatorTool>",
    ]
    if record is not None:
        body.append(f"    <krea2kit:Record>{escape(canonical_json(record))}</krea2kit:Record>")
    packet = "\n".join([
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>',
        f'<x:xmpmeta xmlns:x="{NS_X}" x:xmptk="krea2kit {__version__}">',
        f' <rdf:RDF xmlns:rdf="{NS_RDF}">',
        f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{NS_IPTC_EXT}"'
        f' xmlns:xmp="{NS_XMP}" xmlns:krea2kit="{NS_KREA2KIT}">',
        *body,
        "  </rdf:Description>",
        " </rdf:RDF>",
        "</x:xmpmeta>",
        '<?xpacket end="w"?>',
    ])
    return packet.encode("utf-8")


def parse_xmp(data: bytes | str) -> dict[str, Any]:
    """``{"digital_source_type": str | None, "record": dict | None}`` from an XMP packet.

    Uses the standard-library parser (its expat rejects entity-expansion bombs); Pillow's
    ``getxmp`` needs the optional defusedxml package.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    data = data.rstrip(b"\x00 \n")
    root = ElementTree.fromstring(data)
    out: dict[str, Any] = {"digital_source_type": None, "record": None}
    dst_tag = f"{{{NS_IPTC_EXT}}}DigitalSourceType"
    rec_tag = f"{{{NS_KREA2KIT}}}Record"
    for desc in root.iter(f"{{{NS_RDF}}}Description"):
        if dst_tag in desc.attrib and out["digital_source_type"] is None:
            out["digital_source_type"] = desc.attrib[dst_tag]
        for child in desc:
            if child.tag == dst_tag and out["digital_source_type"] is None:
                out["digital_source_type"] = (child.text or "").strip() or child.get(
                    f"{{{NS_RDF}}}resource")
            elif child.tag == rec_tag and child.text:
                out["record"] = json.loads(child.text)
    return out


# ---------------------------------------------------------------------------------------------
# The bundle writers take


@dataclass(frozen=True)
class ImageMetadata:
    """What a writer embeds in one image.

    ``parameters``: the A1111 text (``None`` to write none); ``krea2kit``: the record dict
    (see :func:`build_record`; an empty dict writes no record); ``digital_source_type``: the
    IPTC AI marker, always written.
    """

    parameters: str | None
    krea2kit: Mapping[str, Any] = field(default_factory=dict)
    digital_source_type: str = TRAINED_ALGORITHMIC_MEDIA

    def __post_init__(self) -> None:
        if self.digital_source_type not in AI_SOURCE_TYPES:
            raise ValueError("digital_source_type must be one of the IPTC AI values "
                             f"{AI_SOURCE_TYPES}; the AI marker cannot be removed")
        canonical_json(self.krea2kit)  # fail early on unserialisable values

    def xmp(self, *, with_record: bool) -> bytes:
        """The XMP packet; the record is embedded only when asked and not empty."""
        return build_xmp(digital_source_type=self.digital_source_type,
                         record=dict(self.krea2kit) if with_record and self.krea2kit else None)

    def record_json(self) -> str:
        return canonical_json(self.krea2kit)


# ---------------------------------------------------------------------------------------------
# Reading back

EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
EXIF_SOFTWARE = 0x0131
EXIF_VERSION = 0x9000

#: The EXIF character-code prefix for UCS-2/UTF-16 text (EXIF 2.32 table 9).
USER_COMMENT_UNICODE = b"UNICODE\x00"
# TIFF field types (TIFF 6.0 §2): the ones the EXIF block below uses.
_ASCII, _LONG, _UNDEFINED = 2, 4, 7


def encode_user_comment(text: str) -> bytes:
    """EXIF UserComment bytes as AUTOMATIC1111 writes them: ``UNICODE\\0`` then UTF-16-BE.

    A1111 saves with ``piexif.helper.UserComment.dump(text, encoding="unicode")``, which is that
    prefix plus big-endian UTF-16 whatever the EXIF byte order, and reads back with
    ``UserComment.load``, which decodes the same way (hMatoba/Piexif ``piexif/helper.py``).
    Always Unicode, so every character survives, including ones outside Latin-1.
    """
    return USER_COMMENT_UNICODE + text.encode("utf-16-be", errors="replace")


def build_exif(*, parameters: str | None, software: str) -> bytes:
    """A big-endian EXIF block (``Exif\\0\\0`` + TIFF) with ``Software`` and ``UserComment``.

    Written by hand rather than through Pillow's ``Image.Exif``, which stores a bytes value in
    the Exif sub-IFD as type BYTE: piexif then returns a tuple of ints and A1111's reader fails
    on it. Here UserComment has the type the EXIF specification gives it, UNDEFINED (7), as
    piexif's own writer does. ``ExifVersion`` ("0232") is written too, as the specification asks
    of every Exif IFD. No timestamps: the same input gives the same bytes.
    """
    def ifd(entries: list[tuple[int, int, int, bytes]], start: int) -> tuple[bytes, bytes]:
        # Each entry: (tag, type, count, data). Data of up to 4 bytes sits in the entry itself;
        # longer data follows the IFD, word-aligned, and the entry holds its offset.
        table = struct.pack(">H", len(entries))
        tail = b""
        data_at = start + 2 + 12 * len(entries) + 4
        for tag, typ, count, data in sorted(entries):
            if len(data) <= 4:
                table += struct.pack(">HHI", tag, typ, count) + data.ljust(4, b"\x00")
            else:
                table += struct.pack(">HHII", tag, typ, count, data_at + len(tail))
                tail += data + b"\x00" * (len(data) % 2)
        return table + struct.pack(">I", 0), tail  # no next IFD

    soft = software.encode("ascii", errors="replace") + b"\x00"
    exif_entries = [(EXIF_VERSION, _UNDEFINED, 4, b"0232")]
    if parameters is not None:
        comment = encode_user_comment(parameters)
        exif_entries.append((EXIF_USER_COMMENT, _UNDEFINED, len(comment), comment))
    ifd0_at = 8

    def ifd0_for(exif_at: int) -> tuple[bytes, bytes]:
        return ifd([(EXIF_SOFTWARE, _ASCII, len(soft), soft),
                    (EXIF_IFD, _LONG, 1, struct.pack(">I", exif_at))], ifd0_at)

    exif_at = ifd0_at + sum(map(len, ifd0_for(0)))  # IFD0's size does not depend on the offset
    ifd0, ifd0_tail = ifd0_for(exif_at)
    sub, sub_tail = ifd(exif_entries, exif_at)
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_at) + ifd0 + ifd0_tail + sub + sub_tail
    return b"Exif\x00\x00" + tiff


def decode_user_comment(raw: bytes | str, *, big_endian: bool = True) -> str:
    """Text of an EXIF UserComment from any writer: ``UNICODE`` (UTF-16 in the EXIF byte order,
    or after a BOM), ``ASCII``, an all-zero (undefined) prefix, or none at all."""
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\x00":
        if body.startswith((b"\xfe\xff", b"\xff\xfe")):
            return body.decode("utf-16")
        return body.decode("utf-16-be" if big_endian else "utf-16-le")
    if head.startswith(b"ASCII") or head == b"\x00" * 8:
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def read_image_metadata(path: str | Path) -> dict[str, Any]:
    """``{"format", "parameters", "krea2kit", "xmp_dst"}`` of an image written by krea2kit.

    Missing layers are ``None``. Works for PNG, JPEG and WebP; raises ``ValueError`` when a
    layer is present but unreadable (a damaged ``krea2kit`` record should not pass silently).
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # PNG text chunks after the image data are read only on load
        fmt = (im.format or "").lower()
        info = dict(im.info)
        exif = im.getexif()
    parameters = None
    record = None
    xmp_raw = info.get(PNG_KEY_XMP) or info.get("xmp")
    if fmt == "png":
        parameters = info.get(PNG_KEY_PARAMETERS)
        if info.get(PNG_KEY_KREA2KIT) is not None:
            try:
                record = json.loads(info[PNG_KEY_KREA2KIT])
            except ValueError as exc:
                raise ValueError(f"{path}: the krea2kit metadata chunk is not valid JSON: {exc}") from exc
    if parameters is None and exif:
        raw = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        if raw:
            parameters = decode_user_comment(raw, big_endian=exif.endian == ">")
    dst = None
    if xmp_raw:
        try:
            parsed = parse_xmp(xmp_raw)
        except (ElementTree.ParseError, ValueError) as exc:
            raise ValueError(f"{path}: the XMP packet cannot be parsed: {exc}") from exc
        dst = parsed["digital_source_type"]
        if record is None:
            record = parsed["record"]
    return {"format": fmt, "parameters": parameters, "krea2kit": record, "xmp_dst": dst}
