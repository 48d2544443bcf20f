"""The ``[output]`` section checked at plan time: everything about where images go that
can be checked without tensors, refused as a RecipeError (exit 2) before any weights load:
a template beyond plain bounded fields, a name that is empty/``.``/``..`` or too long for
the file system, an output folder that is a file or cannot be created, ``quality`` with
PNG, metadata too big for JPEG.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from krea2kit.recipe.plan import Job, Plan


#: Fallbacks when the file system does not say (os.pathconf is POSIX only).
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096
# Room left for what the run adds to the JPEG metadata after planning (weight identities,
# filter verdicts, run id): the plan-time check is an estimate, the writer checks exactly.
_JPEG_RECORD_SLACK = 4096


def check_outputs(plan: Plan) -> None:
    """Everything about where images go that can be checked without tensors; RecipeError (exit 2)."""
    from krea2kit.errors import RecipeError, UsageError
    from krea2kit.output.writers import render_name

    out = plan.recipe.output
    f = plan.loaded.file_of
    extension = getattr(plan.parts.get("writer"), "extension", "") or ""
    if out.quality is not None and extension.lower() == ".png":
        raise RecipeError("quality applies to jpeg and webp, not png (PNG is lossless)",
                          file=f("output.quality"), key="output.quality",
                          hint='remove output.quality, or set output.format = "jpeg" or "webp"')
    names: set[str] = set()
    try:
        for job in plan.jobs:
            names.add(render_name(out.name, **name_fields(plan, job)))
    except UsageError as exc:
        raise RecipeError(exc.message, file=f("output.name"), key="output.name", hint=exc.hint) from None
    if any(ord(c) < 32 or ord(c) == 127 for c in out.dir):
        raise RecipeError(f"the output folder {out.dir!r} contains a control character",
                          file=f("output.dir"), key="output.dir", hint="choose a plain folder name")
    directory = output_dir(plan)
    existing = _check_folder(directory, "output.dir", f("output.dir"))
    for folder in sorted({str(Path(n).parent) for n in names} - {"."}):
        _check_folder(directory / folder, "output.name", f("output.name"))
    _check_lengths(directory, existing, names, extension, overwrite=out.overwrite, file=f("output.name"))
    if extension.lower() in (".jpg", ".jpeg"):
        _check_jpeg_metadata(plan)


def output_dir(plan: Plan) -> Path:
    """``output.dir`` with ``~`` expanded (left as it is for an unknown user, never an error)."""
    return Path(os.path.expanduser(plan.recipe.output.dir))


def _check_folder(folder: Path, key: str, file: str) -> Path:
    """``folder`` exists as a folder we can write into, or can be created; returns the nearest
    existing folder. Nothing is left behind (``recipe check`` and ``--dry-run`` write nothing;
    only root's probe, :func:`_refuses_root`, makes an empty folder and removes it at once)."""
    from krea2kit.errors import RecipeError

    target = folder.absolute()
    probe = target
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file, not a folder" if probe == target else f"cannot be created: {probe} is a file"
        if not probe.exists():
            what = f"cannot be created: {probe} is a broken link"
        fix = "output.dir" if key == "output.dir" else "output.name (its subfolder)"
        raise RecipeError(f"the output folder {folder} {what}", file=file, key=key,
                          hint=f"choose another {fix}, or move that file away")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "exists but is not writable" if probe == target else f"cannot be created: {probe} is not writable"
        raise RecipeError(f"the output folder {folder} {what} (permission denied)", file=file, key=key,
                          hint="choose an output.dir you can write to")
    refusal = _refuses_root(probe)
    if refusal:
        what = f"is not writable ({refusal})" if probe == target else f"cannot be created in {probe} ({refusal})"
        raise RecipeError(f"the output folder {folder} {what}", file=file, key=key,
                          hint="choose an output.dir you can write to")
    return probe


def _refuses_root(folder: Path) -> str | None:
    """For root, access() says yes to nearly every folder, /proc and /sys included, where
    nothing can be created. So root tries: an empty, uniquely named folder is made in
    ``folder`` and removed at once. The reason (strerror) when that fails, else None."""
    import tempfile

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".krea2kit-check-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _check_lengths(directory: Path, existing: Path, names: set[str], extension: str, *, overwrite: bool,
                   file: str) -> None:
    """Every part of every file name fits the file system's NAME_MAX (bytes), leaving room for
    the ``-N`` a taken name gets, and the whole path fits PATH_MAX."""
    from krea2kit.errors import RecipeError
    from krea2kit.files import NUMBER_ROOM

    name_max = _pathconf(existing, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    path_max = _pathconf(existing, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    room = 0 if overwrite else NUMBER_ROOM
    for name in sorted(names):
        parts = (name + extension).split("/")
        for i, part in enumerate(parts):
            limit = name_max - (room if i == len(parts) - 1 else 0)
            size = len(os.fsencode(part))
            if size > limit:
                kept = f" (less {room} kept for a -N suffix)" if room and i == len(parts) - 1 else ""
                raise RecipeError(
                    f"the file name {part[:40]!r}… is {size} bytes; this file system allows {name_max}{kept}",
                    file=file, key="output.name",
                    hint="use a shorter template (e.g. {prompt_slug:.40}) or shorter values")
        full = len(os.fsencode(str((directory / (name + extension)).absolute())))
        if full >= path_max:
            raise RecipeError(f"the output path of {name!r} is {full} bytes; this system allows {path_max - 1}",
                              file=file, key="output.name", hint="use a shorter output.dir or name template")


def _pathconf(path: Path, what: str, default: int) -> int:
    try:
        value = os.pathconf(path, what)
    except (AttributeError, OSError, ValueError):
        return default
    return value if value and value > 0 else default


def _check_jpeg_metadata(plan: Plan) -> None:
    """A JPEG keeps metadata in APP1 segments of at most 64 KiB: refuse a run whose metadata
    cannot fit (a very long prompt, say) before rendering, instead of failing at the write."""
    from krea2kit.errors import RecipeError
    from krea2kit.output import writers
    from krea2kit.output.metadata import ImageMetadata, build_parameters, build_record

    out = plan.recipe.output
    if not out.metadata or not plan.jobs:
        return
    job = max(plan.jobs, key=lambda j: len(j.prompt.encode("utf-8")) + len(j.negative.encode("utf-8")))
    include = out.include_prompt
    parameters = build_parameters(job.prompt if include else None, job.negative if include else None,
                                  {"Seed": job.seed})
    meta = ImageMetadata(parameters=parameters, krea2kit=build_record(recipe=image_recipe(plan, job)))
    xmp = len(meta.xmp(with_record=True)) + _JPEG_RECORD_SLACK
    exif = len(writers._exif_bytes(parameters)) + 512  # + the settings line the run adds
    max_xmp = writers.JPEG_MAX_XMP
    max_exif = getattr(writers, "JPEG_MAX_SEGMENT", max_xmp + 29)
    if xmp > max_xmp or exif > max_exif:
        raise RecipeError(
            f"image {job.index}'s metadata would not fit in a JPEG (about {xmp} bytes of XMP and {exif} of "
            f"EXIF; a JPEG holds at most {max_xmp} and {max_exif})",
            file=plan.loaded.file_of("output.format"), key="output.format",
            hint='use output.format = "png" or "webp", a shorter prompt, or output.metadata = false')


def name_fields(plan: Plan, job: Job) -> dict[str, Any]:
    """Values of the file-name fields for one image; ``{name}`` is the prompt entry's ``name``,
    or its prompt slug when it has none."""
    from krea2kit.output.writers import slugify

    # [expander]: names come from the prompt as written, as checked at plan time (krea2kit.expander)
    prompt = job.expansion["original"] if job.expansion is not None else job.prompt
    return {"index": job.index, "seed": job.seed, "prompt": prompt, "name": job.label or slugify(prompt),
            "recipe": plan.name, "model": plan.model.name, "date": datetime.now(timezone.utc).date().isoformat()}


def image_recipe(plan: Plan, job: Job) -> dict[str, Any]:
    """The resolved recipe reduced to this one image."""
    data = plan.resolved()
    data.pop("prompts", None)
    data.update(prompt=job.prompt, negative=job.negative, seed=job.seed, count=1,
                width=job.width, height=job.height)
    if job.variation_seed is not None:  # this image's own variation seed (seed + i resolved)
        data["variation"] = {**data["variation"], "seed": job.variation_seed}
    if job.expansion is not None or data.get("expander"):  # the prompt as written, and whether it was expanded
        from krea2kit.recipe.expander import image_recipe_fields

        image_recipe_fields(data, job)
    if not plan.recipe.output.include_prompt:
        data.pop("prompt")
        data.pop("negative")
    return data
