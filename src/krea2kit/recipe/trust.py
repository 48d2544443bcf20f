"""What a recipe embedded in an image may decide, and what always stays with the local user.

An image is a file from anyone. ``krea2kit run IMAGE.png`` takes from it what describes the
*picture*: prompts, negative, seeds, count, sizes, the model preset and part names, dtype and
token layout, sampler settings, sliders, LoRAs by name/strength/step range (their files by
name and hash, never a path), the ``[init]`` strength and mask feathering (its picture and
mask likewise by name and hash only), ``[[references]]`` by name, strength, mode and
frame (their pictures by name and hash only), the ``[variation]`` seed and strength, the ``[expander]``
backend name and sampling settings (never its system prompt file), the filters it
requires and the image format (a ``[matrix]`` is dropped: images record their own cell). Everything
that names a place on this machine or loosens a local decision comes from the local user
(the defaults, ``--set``, the user config): the output folder, file name and overwrite rule,
weight and LoRA paths, environment references, the device, per-filter safety settings,
plugin tables, ``extends``, a batch job's ``[job]`` table (its prompt file path; the runner
is never a recipe key at all). Those keys are dropped and listed, never followed or opened.

Writing goes the other way (:func:`portable_recipe`): images record file names, not the
absolute local paths of weights and LoRAs, unless the user config says
``[metadata] local_paths = true``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import PurePath
from typing import Any

# Keys an image may set. ``True``: the value as a whole (validated by the schema as usual);
# a set: a table and the keys it may hold; ``[set]``: a list of such tables.
_PROMPT_KEYS = {"text", "negative", "seed", "count", "width", "height", "name", "expand"}
_LORA_KEYS = {"name", "strength", "trigger", "steps", "strict"}  # never "path"
IMAGE_MAY_SET: dict[str, Any] = {
    "schema": True, "description": True,
    "prompt": True, "negative": True, "seed": True, "count": True, "width": True, "height": True,
    "prompts": [_PROMPT_KEYS],
    "model": {"preset", "dit", "text_encoder", "vae", "dtype", "layout", "vae_tile_threshold", "weights_dtype",
              "text_encoder_weights_dtype", "offload"},
    "sampler": True,  # common settings and the sampler's own options, checked by its schema
    "loras": [_LORA_KEYS],
    "init": {"strength", "mask_blur"},  # never "image" or "mask": the user gives those files
    # [[references]]: how each picture was used, never which local file (krea2kit.references)
    "references": [{"name", "strength", "mode", "frame"}],
    "variation": {"seed", "strength", "per_image"},
    # [expander]: how a prompt was expanded, never with what: the endpoint, key and weights are
    # the user config's, and "system_prompt" (a local file) and "cache" stay local decisions.
    "expander": {"enabled", "backend", "seed", "temperature", "max_tokens", "on_failure"},
    "sliders": True,  # bound to [[loras]] by name only
    "safety": {"filters"},  # requiring a filter can only make a run stricter
    "output": {"format", "quality"},
    # never "diversity": which of the local user's images get written (keep) and which embedder
    # loads (a plugin reading local weights) are local decisions, and an image's recipe renders
    # that one image, where choosing among a batch means nothing (krea2kit.diversity)
}


def _defaults() -> dict[str, Any]:
    from krea2kit.recipe.schema import Recipe

    return Recipe().model_dump(mode="json", by_alias=True)


def _is_default(value: Any, default: Any) -> bool:
    """A dropped value that says nothing (unset, empty or the schema default) is not listed."""
    return value is None or value == {} or value == [] or value == default


def _note_dropped(value: Any, default: Any, key: str, dropped: list[str]) -> None:
    """List ``key`` (or, for a table, each of its keys that says something) as dropped."""
    if isinstance(value, dict) and value and not (isinstance(default, dict) and value == default):
        sub = default if isinstance(default, dict) else {}
        for k, v in value.items():
            _note_dropped(v, sub.get(k), f"{key}.{k}", dropped)
    elif not _is_default(value, default):
        dropped.append(key)


def untrusted_recipe(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The part of an image's recipe it may decide, and the dotted keys dropped from it
    (``loras.0.path`` style, as ``--set`` spells them) whose values were not defaults."""
    defaults = _defaults()
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in data.items():
        rule = IMAGE_MAY_SET.get(key)
        if rule is None:
            _note_dropped(value, defaults.get(key), key, dropped)
        elif rule is True:
            kept[key] = value
        elif isinstance(rule, set):
            kept[key] = _filter_table(value, rule, key, defaults.get(key) or {}, dropped)
        else:  # a list of tables
            kept[key] = _filter_list(value, rule[0], key, dropped)
    return kept, dropped


def _filter_table(value: Any, allowed: set[str], prefix: str, defaults: dict[str, Any],
                  dropped: list[str]) -> Any:
    if not isinstance(value, dict):
        return value  # not a table: the schema names the image and the key
    out = {}
    for key, item in value.items():
        if key in allowed:
            out[key] = item
        else:
            _note_dropped(item, defaults.get(key), f"{prefix}.{key}", dropped)
    return out


def _filter_list(value: Any, allowed: set[str], prefix: str, dropped: list[str]) -> Any:
    if not isinstance(value, list):
        return value
    return [_filter_table(entry, allowed, f"{prefix}.{i}", {}, dropped) for i, entry in enumerate(value)]


def file_name(location: Any) -> Any:
    """A local path reduced to its last part (a file or folder name); other values as they are."""
    if isinstance(location, str) and location:
        return PurePath(location).name or location
    return location


def portable_recipe(data: dict[str, Any], *, local_paths: bool = False) -> dict[str, Any]:
    """``data`` (a resolved recipe) with weight and LoRA locations reduced to file names, for
    image metadata; unchanged when the user config asks for ``local_paths``. A ``[job]`` table
    (a batch job's prompt file) is never recorded: it is no part of one image's recipe."""
    data = {k: v for k, v in data.items() if k != "job"}
    if local_paths:
        return data
    out = dict(data)
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights"), dict):
        weights = {}
        for role, ref in model["weights"].items():
            if isinstance(ref, dict):  # {env = "VAR", default = "..."}: keep the name, not the value
                ref = {**ref, "default": file_name(ref.get("default"))} if ref.get("default") else ref
            weights[role] = file_name(ref) if isinstance(ref, str) else ref
        out["model"] = {**model, "weights": weights}
    if isinstance(out.get("loras"), list):
        out["loras"] = [{**lora, "path": file_name(lora.get("path"))} if isinstance(lora, dict) else lora
                        for lora in out["loras"]]
    if isinstance(out.get("init"), dict):
        out["init"] = {k: (file_name(v) if k in ("image", "mask") else v) for k, v in out["init"].items()}
    if isinstance(out.get("references"), list):  # reference pictures: their file names
        out["references"] = [{**ref, "image": file_name(ref.get("image"))} if isinstance(ref, dict) else ref
                             for ref in out["references"]]
    return out


def portable_identities(parts: dict[str, Any], *, local_paths: bool = False) -> dict[str, Any]:
    """The loaded parts' identities (``{role: {"weights": location, ...}}``) for metadata:
    locations reduced to file names unless ``local_paths``."""
    if local_paths:
        return parts
    return {role: ({**info, "weights": file_name(info.get("weights"))} if isinstance(info, dict) else info)
            for role, info in parts.items()}


def lora_identity(path: str, *, local_paths: bool = False) -> dict[str, Any]:
    """``{"file": name, "sha256": hex}`` of a LoRA file: how an image names it without a path
    (``"path"`` added when ``local_paths``). Hashed once per file version in a process."""
    import os

    out: dict[str, Any] = {"file": file_name(path)}
    if local_paths:
        out["path"] = path
    try:
        st = os.stat(path)
    except OSError:
        return out
    if os.path.isfile(path):
        out["sha256"] = _sha256(path, st.st_size, st.st_mtime_ns)
    return out


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: the cache's key
    from krea2kit.files import sha256_of_file

    return sha256_of_file(path)
