"""The training dataset: a folder of images with same-stem captions, or a JSON-lines manifest.

``[dataset]`` of a training recipe (:class:`DatasetSpec`)::

    [dataset]
    path = "data/my-style"      # cat.png + cat.txt, dog.jpg + dog.txt ... (subfolders too)
    # manifest = "data/train.jsonl"   # or: {"image": "a.png", "caption": "..."} per line,
    #                                 # image paths relative to the manifest's folder
    resolution = 1024           # bucket area target: every bucket holds about 1024 x 1024 pixels
    buckets = true              # aspect-ratio buckets (sides multiples of the model's 16 px cell)
    repeats = 1                 # each image seen this many times per epoch
    caption_ext = ".txt"
    trigger = "ohwx style"      # put in front of every caption

:func:`scan_dataset` reads the folder once: every image is opened and decoded with the same
checks an ``[init]`` image gets (:func:`krea2kit.recipe.init_image.open_checked`: a regular
file, at most 8192 x 8192 pixels, a decompression bomb refused from its header, a file
Pillow can read), so a damaged file is found before training, not at step 3000. Unreadable
images, missing or non-UTF-8 captions and bad manifest lines are counted in
:attr:`DatasetScan.skipped` (relative path, reason) and left out; a dataset with nothing
usable left is a :class:`~krea2kit.errors.RecipeError` (exit 2) naming the folder and the fix.

Buckets follow the usual aspect-ratio bucketing of the community trainers: a fixed set of
(width, height) pairs of about ``resolution**2`` pixels with sides multiples of the model's
pixel multiple (VAE factor x patch size: 16 for Krea 2), aspect ratios from 1:4 to 4:1; each
image takes the bucket nearest its own aspect ratio (in log space) and is scaled to *cover* it
and centre-cropped (:func:`load_item_pixels`), never stretched. ``buckets = false`` puts
every image in the square bucket.

No torch at import: the recipe schema imports :class:`DatasetSpec`, and ``krea2kit --help``
must stay light.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from krea2kit.errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: File extensions read as images (what Pillow decodes and people train on).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Largest caption file, bytes: a caption is a sentence or a paragraph, never megabytes.
MAX_CAPTION_BYTES = 64 * 1024
#: Largest manifest, bytes.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
#: Most extreme bucket aspect ratio (and its inverse): 4:1, as the community bucketers allow.
MAX_BUCKET_ASPECT = 4.0
#: Reasons shown per skipped file, at most (the count is always complete).
SHOWN_SKIPS = 10


class DatasetSpec(BaseModel):
    """The ``[dataset]`` table of a training recipe."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    path: str | None = Field(None, description="Folder of images with same-stem caption files (cat.png + cat.txt); "
                                                "subfolders are read too")
    manifest: str | None = Field(None, description='JSON-lines file: {"image": "a.png", "caption": "..."} per line, '
                                                    "image paths relative to the manifest's folder")
    repeats: int = Field(1, ge=1, le=10_000, description="How many times each image is seen per epoch")
    resolution: int = Field(1024, ge=16, le=4096,
                            description="Bucket area target: every bucket holds about resolution x resolution pixels "
                                        "(64 for the nano models, 1024 for Krea 2)")
    buckets: bool = Field(True, description="Aspect-ratio buckets (false: every image centre-cropped to a square)")
    caption_ext: str = Field(".txt", min_length=2, max_length=16, description="Caption file extension")
    trigger: str | None = Field(None, max_length=1000, description="Trigger phrase put in front of every caption")

    @field_validator("caption_ext")
    @classmethod
    def _ext(cls, v: str) -> str:
        if not v.startswith(".") or "/" in v or "\\" in v:
            raise ValueError('a file extension starting with a dot, like ".txt"')
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        if (self.path is None) == (self.manifest is None):
            raise ValueError("give exactly one of dataset.path (an image folder) or dataset.manifest (a JSON-lines file)")
        return self


@dataclass(frozen=True)
class TrainItem:
    """One usable image: its file, its caption (trigger applied), its bucket (width, height),
    and the sha256 of the file's bytes (the cache key and the dataset hash use it)."""

    image_path: Path
    caption: str
    bucket: tuple[int, int]
    sha256: str = ""
    size: tuple[int, int] = (0, 0)  # the image's own (width, height)


@dataclass
class DatasetScan:
    """What :func:`scan_dataset` found. ``items`` is one epoch: each usable image ``repeats``
    times (the same :class:`TrainItem` object, so caching encodes it once); ``skipped`` lists
    (path relative to the dataset, reason) once per bad file."""

    items: list[TrainItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: Path | None = None
    repeats: int = 1
    resolution: int = 0

    @property
    def unique(self) -> list[TrainItem]:
        """Each usable image once, in scan order."""
        return list(dict.fromkeys(self.items))

    def buckets(self) -> dict[tuple[int, int], int]:
        """Bucket -> number of images in it (each counted once)."""
        out: dict[tuple[int, int], int] = {}
        for item in self.unique:
            out[item.bucket] = out.get(item.bucket, 0) + 1
        return dict(sorted(out.items()))

    def report(self) -> list[str]:
        """Lines for people (stderr): counts, buckets and the first skipped files with reasons."""
        unique = self.unique
        lines = [f"dataset {self.source}: {len(unique)} image(s) x {self.repeats} repeat(s) = {len(self.items)} "
                 f"per epoch, {len(self.skipped)} skipped"]
        lines.append("buckets: " + ", ".join(f"{w}x{h} x{n}" for (w, h), n in self.buckets().items()))
        for path, why in self.skipped[:SHOWN_SKIPS]:
            lines.append(f"  skipped {path}: {why}")
        if len(self.skipped) > SHOWN_SKIPS:
            lines.append(f"  ... and {len(self.skipped) - SHOWN_SKIPS} more skipped")
        return lines


# ---------------------------------------------------------------------------
# buckets


def bucket_sizes(resolution: int, multiple: int = 16) -> list[tuple[int, int]]:
    """Every (width, height) bucket of at most ``resolution**2`` pixels with sides multiples of
    ``multiple`` and an aspect ratio within 1:4 .. 4:1, the square first. Each width keeps the
    largest height that fits the area, so buckets are as large as the budget allows."""
    side = max(multiple, resolution // multiple * multiple)
    area = side * side
    found: set[tuple[int, int]] = set()
    w = multiple
    while w <= side * MAX_BUCKET_ASPECT:
        h = (area // w) // multiple * multiple
        if h >= multiple and max(w, h) / min(w, h) <= MAX_BUCKET_ASPECT:
            found.update({(w, h), (h, w)})  # portrait and landscape alike
        w += multiple
    found.discard((side, side))
    return [(side, side), *sorted(found, key=lambda s: (s[0] / s[1], s[0]))]


def choose_bucket(width: int, height: int, resolution: int, *, multiple: int = 16,
                  buckets: bool = True) -> tuple[int, int]:
    """The bucket an image of ``width`` x ``height`` trains at: nearest aspect ratio (log space),
    the larger bucket on a tie; the square one with ``buckets = False``."""
    sizes = bucket_sizes(resolution, multiple)
    if not buckets:
        return sizes[0]
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


# ---------------------------------------------------------------------------
# scanning


def _file_sha256(path: Path) -> str:
    from krea2kit.files import sha256_of_file

    return sha256_of_file(path)


def _open_image(path: Path):
    """The decoded picture (RGB, EXIF orientation applied) or a reason string: the ``[init]``
    image checks, reused."""
    from PIL import ImageOps

    from krea2kit.recipe.init_image import open_checked

    try:
        # Phones store portrait photos sideways with an EXIF orientation tag: train on them upright.
        return ImageOps.exif_transpose(open_checked(str(path), "dataset"))
    except RecipeError as exc:
        # open_checked's message starts with the full path: the report shows it relative
        message = exc.message
        if message.startswith(str(path)):
            message = message[len(str(path)):].strip()
        return message.replace(str(path), path.name)


def _read_caption(path: Path) -> str | None | tuple[str]:
    """The caption text (stripped), None when missing, or a 1-tuple with a reason when unusable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return (f"cannot read the caption {path.name}: {exc.strerror or exc}",)
    if not stat.S_ISREG(st.st_mode):
        return (f"the caption {path.name} is not a regular file",)
    if st.st_size > MAX_CAPTION_BYTES:
        return (f"the caption {path.name} is {st.st_size} bytes (at most {MAX_CAPTION_BYTES})",)
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return (f"the caption {path.name} is not UTF-8 text",)
    except OSError as exc:
        return (f"cannot read the caption {path.name}: {exc.strerror or exc}",)


def with_trigger(caption: str, trigger: str | None) -> str:
    """``trigger, caption`` (just the trigger for an empty caption); unchanged without one or
    when the caption already starts with it."""
    if not trigger:
        return caption
    if caption.startswith(trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _candidates_from_folder(folder: Path, spec: DatasetSpec) -> tuple[list[tuple[Path, Any, str]], list[tuple[str, str]]]:
    """(image path, caption or reason, shown name) per image file of the folder tree."""
    from krea2kit.files import is_temp_name

    found: list[tuple[Path, Any, str]] = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or is_temp_name(p.name):
            continue  # hidden files and folders (.cache, a killed write's temp file) are not data
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        found.append((p, _read_caption(p.with_suffix(spec.caption_ext)), rel.as_posix()))
    return found, []


def _candidates_from_manifest(manifest: Path) -> tuple[list[tuple[Path, Any, str]], list[tuple[str, str]]]:
    found: list[tuple[Path, Any, str]] = []
    skipped: list[tuple[str, str]] = []
    base = manifest.parent
    with open(manifest, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            where = f"{manifest.name}:{n}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                skipped.append((where, f"not a JSON object ({exc.__class__.__name__})"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                skipped.append((where, 'needs {"image": "file.png", "caption": "..."}'))
                continue
            caption = record.get("caption")
            if caption is not None and not isinstance(caption, str):
                skipped.append((where, "caption is not a string"))
                continue
            image = Path(record["image"]).expanduser()
            image = image if image.is_absolute() else base / image
            found.append((image, None if caption is None else caption.strip(), f"{where} {record['image']}"))
    return found, skipped


def _source_error(message: str, key: str, hint: str, file: str | None) -> RecipeError:
    return RecipeError(message, file=file, key=key, hint=hint)


def scan_dataset(spec: DatasetSpec, *, base_dir: str | Path = ".", multiple: int = 16,
                 recipe_file: str | None = None) -> DatasetScan:
    """Find the usable (image, caption) pairs of ``spec`` and their buckets.

    ``base_dir``: where relative ``path`` / ``manifest`` values start (the recipe's folder or
    the working folder, as the caller decides). ``multiple``: the model's pixel multiple
    (VAE factor x patch size). ``recipe_file`` names the recipe in errors.
    """
    key = "dataset.path" if spec.path is not None else "dataset.manifest"
    raw = Path(spec.path if spec.path is not None else spec.manifest).expanduser()  # type: ignore[arg-type]
    source = raw if raw.is_absolute() else Path(base_dir) / raw
    layout_hint = (f"put images with same-stem caption files in the folder (cat.png + cat{spec.caption_ext}), "
                   'or give dataset.manifest = "train.jsonl" with {"image": ..., "caption": ...} lines')
    if spec.path is not None:
        if not source.is_dir():
            what = "is not a folder" if source.exists() else "does not exist"
            raise _source_error(f"the dataset folder {source} {what}", key, layout_hint, recipe_file)
        candidates, skipped = _candidates_from_folder(source, spec)
    else:
        try:
            st = source.stat()
        except OSError:
            raise _source_error(f"the dataset manifest {source} does not exist", key, layout_hint, recipe_file) from None
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            raise _source_error(f"the dataset manifest {source} is not a regular file of at most "
                                f"{MAX_MANIFEST_BYTES // 2**20} MiB", key, layout_hint, recipe_file)
        candidates, skipped = _candidates_from_manifest(source)

    items: list[TrainItem] = []
    for image_path, caption, shown in candidates:
        if isinstance(caption, tuple):
            skipped.append((shown, caption[0]))
            continue
        if caption is None:
            what = f"no caption file {image_path.with_suffix(spec.caption_ext).name}" if spec.path is not None \
                else "no caption"
            skipped.append((shown, what))
            continue
        picture = _open_image(image_path)
        if isinstance(picture, str):
            skipped.append((shown, picture))
            continue
        w, h = picture.size
        picture.close()
        items.append(TrainItem(image_path=image_path, caption=with_trigger(caption, spec.trigger),
                               bucket=choose_bucket(w, h, spec.resolution, multiple=multiple, buckets=spec.buckets),
                               sha256=_file_sha256(image_path), size=(w, h)))
    if not items:
        what = "folder" if spec.path is not None else "manifest"
        why = f" ({len(skipped)} skipped: " + "; ".join(f"{p}: {r}" for p, r in skipped[:3]) + \
            (" ..." if len(skipped) > 3 else "") + ")" if skipped else ""
        raise _source_error(f"the dataset {what} {source} has no usable image with a caption{why}", key,
                            layout_hint + f"; images: {', '.join(IMAGE_EXTENSIONS)}", recipe_file)
    epoch = [item for item in items for _ in range(spec.repeats)]
    return DatasetScan(items=epoch, skipped=skipped, source=source, repeats=spec.repeats, resolution=spec.resolution)


def load_item_pixels(item: TrainItem) -> "torch.Tensor":
    """The item's picture as ``(3, H, W)`` in [-1, 1] at its bucket size: scaled to cover the
    bucket and centre-cropped (:func:`krea2kit.recipe.init_image.framed`, as ``[init]`` images)."""
    from krea2kit.recipe.init_image import framed
    from krea2kit.sampling import pixels_to_tensor

    picture = _open_image(item.image_path)
    if isinstance(picture, str):  # it was readable when scanned: changed since
        raise RecipeError(f"the training image {item.image_path} can no longer be read: {picture}",
                          key="dataset", hint="restore the file or scan the dataset again")
    width, height = item.bucket
    return pixels_to_tensor(framed(picture, width, height), width, height)[0]


def dataset_hash(scan: DatasetScan) -> str:
    """A content hash of what is trained on: every usable image's bytes (sha256), caption and
    bucket, and the repeats; file names and folders do not count (a moved copy hashes the same)."""
    h = hashlib.sha256(b"krea2kit-train-dataset-v1\0")
    for item in sorted(scan.unique, key=lambda i: (i.sha256, i.caption, i.bucket)):
        h.update(json.dumps([item.sha256, item.caption, list(item.bucket)], ensure_ascii=True).encode())
        h.update(b"\0")
    h.update(f"repeats={scan.repeats}".encode())
    return h.hexdigest()


__all__ = ["DatasetScan", "DatasetSpec", "IMAGE_EXTENSIONS", "TrainItem", "bucket_sizes", "choose_bucket",
           "dataset_hash", "load_item_pixels", "scan_dataset", "with_trigger"]
