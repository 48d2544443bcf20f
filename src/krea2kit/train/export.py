"""Writing a trained adapter: the layouts ``lora convert`` writes, plus training metadata.

:func:`save_adapter` takes the trainer's adapter in krea2kit's internal per-module form (a
:class:`~krea2kit.lora.formats.LoraFile`, or a ``{native module: LoraDelta}`` mapping) and
writes it through :func:`krea2kit.lora.convert.lora_to_state_dict`, the code behind
``krea2kit lora convert``, so a trained file is exactly what converting one gives:

* ``diffusers`` (default): the layout of the official Krea style LoRAs and diffusers' trainer,
  ``transformer.<diffusers module>.lora_A/lora_B.weight`` with ``alpha / rank`` folded into
  ``lora_B`` (LoKr: PEFT's ``lokr_*`` keys and its LoKrConfig); diffusers'
  ``Krea2Transformer2DModel.load_lora_adapter``, PEFT, ComfyUI and krea2kit all read it at the
  same strength, metadata or not;
* ``native`` (``diffusion_model.*``, ComfyUI / ai-toolkit) and ``kohya`` (``lora_unet_*`` +
  ``.alpha``, musubi-tuner).

Training metadata (safetensors ``__metadata__``, strings): ``krea2kit.train`` holds a JSON
object (base model preset and weights hash, trigger, rank, alpha, adapter kind, steps, dataset
hash, krea2kit version and whatever else the trainer passes); ``krea2kit.train.recipe`` the
training recipe as TOML, with local paths reduced to file names (a shared LoRA should not
reveal your folders; ``local_paths=True`` keeps them, as ``[metadata] local_paths`` does for
images). For other tools the usual keys are set too: ``base_model`` (read by krea2kit, kohya-style
viewers) and ``trigger_phrase``. ``lora inspect`` shows all of it (:func:`training_info`).
The write is atomic (:func:`krea2kit.models.weights.save_safetensors_atomic`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from krea2kit.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from krea2kit.lora.formats import LoraDelta, LoraFile

#: Metadata keys of a trained adapter.
TRAIN_KEY = "krea2kit.train"
RECIPE_KEY = "krea2kit.train.recipe"
FORMATS = ("diffusers", "native", "kohya")
#: The fields :func:`training_info` shows, in order (others follow alphabetically).
KNOWN_FIELDS = ("base_model", "base_weights_hash", "adapter", "rank", "alpha", "targets", "trigger", "steps",
                "dataset_hash", "slider", "krea2kit_version")
#: Recipe keys whose string values are local paths (and every value inside a ``weights`` or
#: ``*_weights`` table, and keys ending in ``_dir`` / ``_path``).
_PATH_KEYS = frozenset({"path", "manifest", "dir", "output", "out", "resume", "image", "mask", "file", "extends"})


def _as_lora_file(state: "LoraFile | Mapping[str, LoraDelta]") -> "LoraFile":
    from krea2kit.lora.formats import LoraDelta, LoraFile

    if isinstance(state, LoraFile):
        return LoraFile(deltas=dict(state.deltas), layout=state.layout, metadata={}, path=state.path,
                        name=state.name)
    deltas = dict(state)
    bad = [k for k, v in deltas.items() if not isinstance(v, LoraDelta) or v.module != k]
    if bad:
        raise TypeError(f"adapter state must map native module names to their LoraDelta (bad entry: {bad[0]!r})")
    return LoraFile(deltas=deltas, layout="krea2kit-train")


def _portable(value: Any, *, in_weights: bool = False, key: str = "") -> Any:
    """``value`` with local paths reduced to their file names (env references kept)."""
    if isinstance(value, Mapping):
        if set(value) <= {"env", "default"} and "env" in value:  # {env = "VAR"}: a name, not a path
            return {k: (_portable(v, in_weights=True) if k == "default" else v) for k, v in value.items()}
        return {k: _portable(v, in_weights=in_weights or k.endswith("weights"), key=k) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, in_weights=in_weights, key=key) for v in value]
    if isinstance(value, str) and (in_weights or key in _PATH_KEYS or key.endswith(("_dir", "_path"))):
        return Path(value).name if value else value
    return value


def portable_recipe_text(recipe: str | Mapping[str, Any] | None, *, local_paths: bool = False) -> str:
    """The training recipe as TOML text for the metadata, paths reduced to file names unless
    ``local_paths``. Text that does not parse as TOML is kept only with ``local_paths`` (it
    could hold anything); otherwise it is left out."""
    if recipe is None:
        return ""
    import tomli_w

    from krea2kit.tomlfiles import parse_toml

    if isinstance(recipe, str):
        if local_paths:
            return recipe
        try:
            data = parse_toml(recipe, "<training recipe>")
        except Exception:  # a RecipeError for text that is not TOML: leave it out rather than leak it
            return ""
    else:
        data = dict(recipe)
    return tomli_w.dumps(_no_none(data if local_paths else _portable(data)))


def _no_none(value: Any) -> Any:
    """TOML has no null: unset values (a model dump's ``None``) are left out."""
    if isinstance(value, Mapping):
        return {k: _no_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_no_none(v) for v in value if v is not None]
    return value


def training_metadata(metadata: Mapping[str, Any], *, local_paths: bool = False) -> dict[str, str]:
    """The safetensors metadata strings for ``metadata`` (see the module docstring)."""
    from krea2kit import __version__

    fields = {k: v for k, v in metadata.items() if k != "recipe" and v is not None}
    fields.setdefault("krea2kit_version", __version__)
    out = {TRAIN_KEY: json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)}
    recipe = portable_recipe_text(metadata.get("recipe"), local_paths=local_paths)
    if recipe:
        out[RECIPE_KEY] = recipe
    if fields.get("base_model"):
        out["base_model"] = str(fields["base_model"])
    if fields.get("trigger"):
        out["trigger_phrase"] = str(fields["trigger"])
    return out


def save_adapter(state: "LoraFile | Mapping[str, LoraDelta]", path: str | os.PathLike, *, format: str = "diffusers",
                 metadata: Mapping[str, Any] | None = None, dtype: "torch.dtype | None" = None,
                 overwrite: bool = True, local_paths: bool = False) -> Path:
    """Write ``state`` to ``path`` in ``format`` (``diffusers``, ``native`` or ``kohya``) with
    the training metadata; returns the path. ``dtype``: the tensors' dtype in the file (as
    trained when None). ``overwrite=False`` refuses an existing file (exit 2) instead of
    replacing it; either way the file appears whole or not at all.

    ``metadata`` fields (all optional): ``base_model`` (the Raw preset trained on),
    ``base_weights_hash``, ``trigger``, ``rank``, ``alpha``, ``adapter`` ("lora" / "lokr"),
    ``targets``, ``steps``, ``dataset_hash``, ``slider`` (a mapping for slider training),
    ``recipe`` (the training recipe: TOML text or a mapping), anything else JSON can hold.
    """
    from krea2kit.lora.convert import lora_to_state_dict
    from krea2kit.models.weights import save_safetensors_atomic

    if format not in FORMATS:
        raise UsageError(f"unknown adapter format {format!r}", key="--format", hint=f"choose from {', '.join(FORMATS)}")
    lora = _as_lora_file(state)
    if not lora.deltas:
        raise UsageError("the adapter has no modules to write", hint="check the adapter's targets")
    tensors, meta = lora_to_state_dict(lora, format, dtype=dtype)
    meta.pop("krea2kit_source_layout", None)  # a trained file has no source layout
    meta.update(training_metadata(metadata or {}, local_paths=local_paths))
    return save_safetensors_atomic(tensors, Path(path), metadata=meta, overwrite=overwrite)


def training_info(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The training fields of a file's metadata (``lora inspect``), or None for a LoRA krea2kit
    did not train. ``recipe`` holds the TOML text when the file carries it."""
    raw = metadata.get(TRAIN_KEY)
    if not raw:
        return None
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    ordered = {k: fields[k] for k in KNOWN_FIELDS if k in fields}
    ordered.update({k: fields[k] for k in sorted(fields) if k not in ordered})
    if metadata.get(RECIPE_KEY):
        ordered["recipe"] = metadata[RECIPE_KEY]
    return ordered


__all__ = ["FORMATS", "RECIPE_KEY", "TRAIN_KEY", "portable_recipe_text", "save_adapter", "training_info",
           "training_metadata"]
