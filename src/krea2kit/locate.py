"""Finding weights for a model preset, without ever downloading anything.

Order, first hit wins, per role (``dit``, ``text_encoder``, ``vae``):

1. the recipe's ``[model.weights]`` (a path or ``{env = "VAR"}``);
2. the preset's environment variable (e.g. ``OSS_TURBO`` for the official Turbo file,
   the name the official inference script reads);
3. the user config's ``[weights.<preset>]`` table;
4. weights shipped inside a Python package (``package:relative/path``, the nano models);
5. an existing local Hugging Face cache of the preset's repos
   (``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from krea2kit import env_values
from krea2kit.errors import WeightsError
from krea2kit.registry import ModelDescriptor
from krea2kit.settings import Settings

# Where each role lives inside a diffusers-layout repo snapshot.
HF_SUBFOLDERS = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}


def hf_cache_root() -> Path:
    hub = env_values.from_env("HF_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = env_values.from_env("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def find_in_hf_cache(repo: str, role: str) -> Path | None:
    """A snapshot folder of ``repo`` in the local HF cache that holds ``role``'s weights."""
    snapshots = hf_cache_root() / ("models--" + repo.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        sub = snap / HF_SUBFOLDERS[role]
        if sub.is_dir() and (any(sub.glob("*.safetensors")) or any(sub.glob("*.index.json"))):
            if role == "text_encoder" and not (sub / "tokenizer.json").exists():
                tok = snap / "tokenizer"
                if (tok / "tokenizer.json").exists():
                    return sub  # the text-encoder loader also looks in ../tokenizer
            return sub
    return None


def package_path(ref: str) -> Path:
    """Resolve ``package:relative/path`` to a file shipped inside an installed package."""
    package, _, rel = ref.partition(":")
    return Path(str(resources.files(package).joinpath(rel)))


def locate_weights(model: ModelDescriptor, role: str, requested: str | None, settings: Settings) -> tuple[str, str]:
    """Return ``(location, how_found)`` for one role of a preset, or raise WeightsError."""
    if requested:
        return str(Path(requested).expanduser()), "recipe"
    env = (model.weights_env or {}).get(role)
    from_env = env_values.from_env(env) if env else None  # remembered: messages show $VAR, not the path
    if from_env:
        return from_env, f"${env}"
    configured = settings.weights.get(model.name)
    if configured is not None and getattr(configured, role):
        return str(Path(getattr(configured, role)).expanduser()), f"config {settings.path}"
    default = (model.weights or {}).get(role)
    if default:
        if ":" in default and not Path(default).exists():
            return str(package_path(default)), "package"
        return str(Path(default).expanduser()), "preset"
    for repo in model.hf_repos:
        found = find_in_hf_cache(repo, role)
        if found is not None:
            return str(found), f"Hugging Face cache ({repo})"
    hints = [f"set [model.weights] {role} = \"/path\" in the recipe"]
    if env:
        hints.append(f"export {env}=/path")
    hints.append(f"add [weights.{model.name}] {role} = \"/path\" to {settings.path or 'the config file'}")
    if model.hf_repos:
        hints.append(f"or download {' / '.join(model.hf_repos)} yourself (krea2kit never downloads)")
    raise WeightsError(
        f"no {role.replace('_', ' ')} weights found for model {model.name!r}",
        key=f"model.weights.{role}",
        hint="; ".join(hints),
    )
