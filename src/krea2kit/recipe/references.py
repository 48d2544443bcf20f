"""``[[references]]`` at plan time, in metadata and on re-runs (no torch here).

* :func:`resolve` — relative picture paths start in the folder of the recipe file that set
  them (the current folder for ``--set``, stdin and images); names default to the file stem
  and must be unique (a slider binds a reference by name).
* :func:`check_files` — each picture is checked as untrusted input with the ``[init]``
  loader's rules (:func:`krea2kit.recipe.init_image.open_checked`: regular file, decodable,
  size caps, decompression bombs refused from the header).
* :func:`check_image_references` — ``krea2kit run IMAGE.png``: an image never chooses a local
  file, so each reference it used must be given again (``--set references.N.image=FILE``),
  and the file given must be the one whose sha256 the image records.
* :func:`reference_record` — what an image records of each reference: name, file name,
  sha256, strength, mode, frame.

This module sits in ``recipe/`` (plan time, no torch) because planning calls it; the tokens
and the model hook are :mod:`krea2kit.references.conditioning`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from krea2kit.errors import RecipeError

#: A slider drives a reference when one of its bindings names ``reference:NAME``.
SLIDER_PREFIX = "reference:"

# Provenance labels that are not recipe files: relative paths given there start in the cwd.
_NOT_FILES = ("--set", "--prompt", "<stdin>")


def reference_name(entry: Any) -> str:
    """The entry's name, or its file stem."""
    return entry.name or Path(str(entry.image)).stem


def _base_dir(loaded: Any, key: str) -> Path | None:
    source = loaded.file_of(key)
    if loaded.from_image or not source or source in _NOT_FILES:
        return None
    path = Path(source)
    return path.parent if path.is_file() else None


def resolve_path(loaded: Any, index: int, value: str) -> str:
    """``value`` made absolute from where it was written (see the module docstring)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    base = _base_dir(loaded, f"references.{index}.image")
    return str(base / path) if base is not None else value


def resolve(recipe: Any, loaded: Any) -> None:
    """Resolve picture paths and default names in place; repeated names are a recipe error."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(recipe.references):
        entry.image = resolve_path(loaded, i, entry.image)
        entry.name = reference_name(entry)
        if entry.name in seen:
            raise RecipeError(f"[[references]] {seen[entry.name]} and {i} are both named {entry.name!r}",
                              file=loaded.file_of("references"), key=f"references[{i}].name",
                              hint="give each reference its own name = \"...\" (sliders bind them by name)")
        seen[entry.name] = i


def check_files(recipe: Any, file_of) -> None:
    """Every reference picture exists and is a picture within the caps, before anything loads."""
    from krea2kit.recipe.init_image import open_checked

    for i, entry in enumerate(recipe.references):
        key = f"references.{i}.image"
        open_checked(entry.image, key, file=file_of(key))


def is_slider_target(bound: str, recipe: Any) -> bool:
    """Whether a slider binding ``bound`` names one of the recipe's references."""
    if not bound.startswith(SLIDER_PREFIX):
        return False
    name = bound[len(SLIDER_PREFIX):]
    return any(reference_name(entry) == name for entry in recipe.references)


# --------------------------------------------------------------------------- metadata, re-runs
def reference_record(references: list[Any], *, local_paths: bool = False) -> dict[str, Any]:
    """``{"references": [{"name", "file", "sha256", "strength", "mode", "frame"}]}`` for the
    image's krea2kit record (``{}`` without references); a path only when ``local_paths``."""
    if not references:
        return {}
    from krea2kit.recipe.trust import lora_identity

    return {"references": [{"name": reference_name(entry), **lora_identity(str(Path(entry.image).expanduser()),
                                                                        local_paths=local_paths),
                            "strength": entry.strength, "mode": entry.mode, "frame": entry.frame}
                           for entry in references]}


def recorded_references(loaded: Any) -> list[dict[str, Any]]:
    """The references an image's krea2kit record lists (``[]`` when none or unreadable)."""
    from krea2kit.output.metadata import read_image_metadata

    try:
        record = read_image_metadata(Path(loaded.path)).get("krea2kit")
    except Exception:  # the loader already read it; a second failure just means no record
        return []
    refs = record.get("references") if isinstance(record, dict) else None
    return [r for r in refs if isinstance(r, dict)] if isinstance(refs, list) else []


def check_image_references(loaded: Any) -> None:
    """For a recipe read from an image: each reference needs its file from the local user (an
    image never chooses a local path). Checked before validation, so the message names the fix
    rather than a missing key."""
    from krea2kit.recipe.loader import recorded_file

    refs = loaded.data.get("references")
    if not loaded.from_image or not isinstance(refs, list) or not refs:
        return
    known_all = recorded_references(loaded)
    for i, entry in enumerate(refs):
        if not isinstance(entry, dict) or isinstance(entry.get("image"), str):
            continue
        known = known_all[i] if i < len(known_all) else {}
        name = entry.get("name") or known.get("name") or f"#{i}"
        key = f"references.{i}.image"
        raise RecipeError(
            f"the image was made with reference picture {name!r}{recorded_file(known)}; an image never "
            "chooses a local file", file=loaded.path, key=key,
            hint=f"give it: --set {key}=/path/to/{known.get('file') or 'reference.png'}")


def image_reference_mismatches(loaded: Any) -> list[str]:
    """For a recipe from an image: the reference pictures the user gave whose sha256 differs
    from the one the image records (the picture will then differ), as warnings, the way LoRA
    and init files are treated."""
    from krea2kit.recipe.init_image import file_sha256

    refs = loaded.data.get("references")
    if not loaded.from_image or not isinstance(refs, list) or not refs:
        return []
    known_all = recorded_references(loaded)
    notes = []
    for i, entry in enumerate(refs):
        known = known_all[i] if i < len(known_all) else {}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not known.get("sha256"):
            continue
        path = Path(resolve_path(loaded, i, entry["image"])).expanduser()
        if not path.is_file():  # never hash a FIFO; planning names a missing file
            continue
        try:
            given = file_sha256(str(path))
        except OSError:
            continue
        if given != known["sha256"]:
            recorded = f" for {known['file']!r}" if known.get("file") else ""
            notes.append(f"{path} is not the reference picture the image was made with (sha256 {given[:12]}…, "
                         f"the image records {known['sha256'][:12]}…{recorded}): the picture will differ")
    return notes


# --------------------------------------------------------------------------- memory preflight
def reference_tokens(references: list[Any], image_tokens: int) -> int:
    """Tokens the references add to every transformer call: each one with a strength above 0
    is framed to the image's size, so it brings as many tokens as the image has (a reference a
    slider drives is counted whatever the slider's value)."""
    return sum(image_tokens for entry in references if entry.strength > 0)


def reference_extra_bytes(config: Any, references: list[Any], *, batch: int, tokens: int, dtype_bytes: int) -> int:
    """What a call with references holds beyond its longer sequence: the per-token time vectors
    (``tvec`` and each block's modulation, 6F each) and, with an attention-mode reference, the
    pairwise additive mask (``tokens`` counts text, image and reference tokens)."""
    active = [entry for entry in references if entry.strength > 0]
    if not active:
        return 0
    extra = batch * tokens * 12 * config.features
    if any(entry.mode == "attention" for entry in active):
        extra += batch * tokens * tokens
    return extra * dtype_bytes
