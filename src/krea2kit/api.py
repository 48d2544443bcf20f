"""The Python API the CLI is built on: load a recipe, run it, get images and records.

    from krea2kit.api import Session

    session = Session()                       # plugins + user settings, parts cached
    plan = session.plan("recipes/quickstart.toml", overrides=["seed=7"])
    for record in session.run(plan):
        print(record.path, record.seed)

Parts (text encoder, transformer, VAE) are loaded on first use and kept by the
session, so a notebook or a service pays the load once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from krea2kit.pipeline import Events, Pipeline, Record
from krea2kit.recipe.loader import LoadedRecipe, apply_overrides, check_image_loras, load_recipe_source
from krea2kit.tomlfiles import parse_toml
from krea2kit.recipe.plan import Plan, plan_recipe
from krea2kit.settings import Settings, get_settings


def load_recipe(source: str | Path | None = None, *, text: str | None = None,
                overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Read a recipe from a path (``-`` = stdin), an image that embeds one, or ``text``.

    With neither, an empty recipe: every value comes from the default model preset. An
    image's recipe is untrusted: only what :mod:`krea2kit.recipe.trust` lets an image decide
    is kept, and ``loaded.dropped`` names the keys left out.
    """
    if text is not None:
        loaded = load_recipe_source("-", stdin_text=text)
    elif source is None:
        loaded = LoadedRecipe({}, {}, "<defaults>", "krea2kit")
    else:
        loaded = load_recipe_source(str(source))
    apply_overrides(loaded, list(overrides))
    return loaded


class Session:
    """Plugins, settings and loaded parts for any number of runs."""

    def __init__(self, *, settings: Settings | None = None, host=None) -> None:
        from krea2kit.plugins import get_host

        self.host = host or get_host()
        self.settings = settings or get_settings()
        self.pipeline = Pipeline(self.settings, registry=self.host.registry)

    def plan(self, source: str | Path | LoadedRecipe | None = None, *, text: str | None = None,
             overrides: Sequence[str] = (), prompts: Sequence[str | Mapping[str, Any]] | None = None) -> Plan:
        """Validate a recipe against the registry and expand it into jobs (nothing loads).

        ``prompts`` replace the recipe's: strings, or ``[[prompts]]``-shaped mappings
        (``{"text": ..., "seed": ...}``, as ``--prompt -`` reads JSON records).
        A recipe read from an image is untrusted (see :mod:`krea2kit.recipe.trust`): its
        LoRAs need local files given in ``overrides`` (``loras.N.path=FILE``).
        """
        loaded = source if isinstance(source, LoadedRecipe) else load_recipe(source, text=text, overrides=overrides)
        check_image_loras(loaded)
        texts: list[str] | None = None
        if prompts and all(isinstance(p, str) for p in prompts):
            texts = list(prompts)  # type: ignore[arg-type]
        elif prompts:
            _replace_prompt_entries(loaded, prompts)
        return plan_recipe(loaded, self.host.registry, self.settings, prompts=texts)

    def run(self, plan: Plan, *, events: Events | None = None) -> Iterator[Record]:
        """Generate the plan's images, yielding a record per image as it is finished."""
        from krea2kit.pipeline import plugin_versions

        plan.plugin_versions = plugin_versions(self.host)  # recorded in every image
        yield from self.pipeline.run(plan, events=events)


def _replace_prompt_entries(loaded: LoadedRecipe, prompts: Sequence[str | Mapping[str, Any]]) -> None:
    """Prompts given as records replace the recipe's [[prompts]] (validated with them)."""
    loaded.data.pop("prompt", None)
    loaded.data["prompts"] = [{"text": p} if isinstance(p, str) else dict(p) for p in prompts]
    for key in [k for k in loaded.provenance if k.startswith("prompt")]:  # prompt, prompts, prompts.0.seed ...
        del loaded.provenance[key]
    loaded.provenance["prompt"] = loaded.provenance["prompts"] = "--prompt"


def generate(prompt: str, *, overrides: Sequence[str] = (), session: Session | None = None) -> list[Record]:
    """One call: render ``prompt`` with the default model and the given ``key=value`` overrides."""
    session = session or Session()
    plan = session.plan(overrides=overrides, prompts=[prompt])
    return list(session.run(plan))


__all__ = ["Session", "load_recipe", "generate", "Plan", "Record", "parse_toml"]
