"""A batch job: a recipe plus a prompt source, planned into numbered items before anything loads.

Item ``k`` is one image. A line of the prompt source gives ``count`` items (its own ``count``
or the recipe's). Everything that decides an item's pixels is fixed here, by the job alone:

* its **seed**: the line's ``seed`` (``+ i`` for the line's i-th image), else the recipe's
  ``seed + k``, so no two lines share noise by accident and no result depends on the order
  or the number of workers that render the items;
* its steps and guidance: the line's, else the recipe's;
* its **file name**: ``output.name`` rendered with the item's index, seed and prompt (the
  default ``{recipe}-{index:04d}-{seed}`` names each item uniquely). A job owns those names:
  re-running it replaces an unfinished or damaged image at its own name rather than adding
  ``-2``; a template that gives two items one name is refused.

Items that share steps and guidance are planned together (one :class:`~krea2kit.recipe.plan.Plan`
per *group*, each a plain recipe whose ``[[prompts]]`` are the group's lines), so the job
runs through the same planning and pipeline as ``krea2kit run``. :class:`JobSpec` is plain
data: a runner can send it to another process or machine and plan it again there
(:func:`plan_groups`); nothing in it refers to this process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krea2kit.errors import RecipeError, UsageError
from krea2kit.jobs.sources import load_lines

#: Where a group's sampler settings come from, in the plans' provenance.
PROVENANCE = "--prompts"
#: The manifest's file name in the output folder: ``<recipe>.manifest.jsonl``.
MANIFEST_SUFFIX = ".manifest.jsonl"


@dataclass
class JobSpec:
    """Everything a worker needs to plan a job's items, as plain data (picklable, JSON-able)."""

    recipe: dict[str, Any]  # the recipe's merged data, without [job] and its own prompts
    provenance: dict[str, str]
    path: str
    name: str
    # one per (steps, guidance): {"sampler": {...}, "entries": [[prompts] dicts], "items": [item indices]}
    groups: list[dict[str, Any]]
    sources: list[str]  # "file:line" of each item
    keys: list[str] = field(default_factory=list)  # per item: hash of what decides its image
    names: list[str] = field(default_factory=list)  # per item: its output name (without extension)
    manifest: str = ""
    run_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)

    @property
    def size(self) -> int:
        return len(self.sources)


@dataclass
class BatchJob:
    """A planned job: its spec and, in the process that planned it, the plans themselves."""

    spec: JobSpec
    plans: list[Any]  # one Plan per group, job indices = item indices

    @property
    def manifest_path(self) -> Path:
        return Path(self.spec.manifest)

    def plan_of(self, index: int) -> Any:
        for plan in self.plans:
            if any(job.index == index for job in plan.jobs):
                return plan
        raise KeyError(index)


def job_source(loaded: Any, cli_source: str | None) -> tuple[str | None, Path | None]:
    """The prompt source of a run and the folder a relative path starts in: ``--prompts``
    (relative to the current folder), else the recipe's ``[job] prompts`` (relative to the
    recipe file). ``(None, None)``: not a job."""
    table = loaded.data.get("job")
    if table is not None and not isinstance(table, dict):
        raise RecipeError("[job] must be a table", file=loaded.file_of("job"), key="job",
                          hint='[job]\nprompts = "prompts.txt"')
    if cli_source is not None:
        return cli_source, None
    if not table:
        return None, None
    unknown = sorted(set(table) - {"prompts"})
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} in [job]", file=loaded.file_of(f"job.{unknown[0]}"),
                          key=f"job.{unknown[0]}", hint="[job] takes prompts = \"FILE\" (relative to the recipe)")
    source = table.get("prompts")
    if not isinstance(source, str) or not source:
        raise RecipeError("expected the path of a prompt file", file=loaded.file_of("job.prompts"),
                          key="job.prompts", hint='prompts = "prompts.txt" (relative to this recipe)')
    if source == "-":
        raise RecipeError("[job] prompts cannot be stdin", file=loaded.file_of("job.prompts"), key="job.prompts",
                          hint="give --prompts - on the command line instead")
    where = loaded.file_of("job.prompts")
    base = Path(where).expanduser().parent if where not in ("<stdin>", "--set") else Path.cwd()
    return source, base


def build_job(session: Any, loaded: Any, source: str, *, base: Path | None = None,
              stdin_text: str | None = None) -> BatchJob:
    """Read and check the prompt source, plan every item (nothing loads), and name them."""
    if loaded.from_image:
        raise UsageError("a batch job's recipe must be a recipe file, not an image", file=loaded.path,
                         hint="save the recipe (`krea2kit recipe show IMAGE > job.toml`) and run that")
    if "matrix" in loaded.data:
        raise RecipeError("a [matrix] recipe cannot run as a batch job", file=loaded.file_of("matrix"), key="matrix",
                          hint="remove [matrix], or run the matrix without --prompts / [job]")
    diversity = loaded.data.get("diversity")
    if isinstance(diversity, dict) and diversity.get("keep") is not None:
        # keep = K picks among a prompt's images rendered in one run; a job's items are each
        # final on their own (and may be rendered in several runs, on several workers)
        raise RecipeError("[diversity] keep (--keep-diverse) cannot run as a batch job: a job writes every item",
                          file=loaded.file_of("diversity.keep"), key="diversity.keep",
                          hint="remove keep (scores alone are fine), or run the recipe without --prompts / [job]")
    lines = load_lines(source, base=base, stdin_text=stdin_text)
    data = copy.deepcopy(loaded.data)
    data.pop("job", None)  # consumed here: a plan (and every image's recipe) never carries it
    provenance = {k: v for k, v in loaded.provenance.items() if not k.startswith("job")}

    base_plan = session.plan(_loaded(loaded, data, provenance),
                             prompts=[{"text": lines[0].entry.text}])  # the recipe's own errors first
    recipe = base_plan.recipe
    spec = JobSpec(recipe=data, provenance=provenance, path=loaded.path, name=loaded.name, groups=[], sources=[])
    groups: dict[tuple, dict[str, Any]] = {}
    for line in lines:
        entry = line.entry
        count = entry.count or recipe.count
        first = spec.size
        seed = entry.seed if entry.seed is not None else recipe.seed + first
        sampler = {"steps": entry.steps if entry.steps is not None else recipe.sampler.steps,
                   "guidance": entry.guidance if entry.guidance is not None else recipe.sampler.guidance}
        group = groups.setdefault((sampler["steps"], sampler["guidance"]),
                                  {"sampler": sampler, "entries": [], "items": []})
        record = entry.model_dump(exclude_none=True, exclude={"steps", "guidance"})
        record.update(seed=seed, count=count)
        group["entries"].append(record)
        group["items"].extend(range(first, first + count))
        spec.sources.extend([line.where] * count)
    spec.groups = list(groups.values())
    plans = plan_groups(spec, session)
    _name_items(spec, plans)
    from krea2kit.recipe.outputs import output_dir

    spec.manifest = str(output_dir(plans[0]) / f"{spec.name}{MANIFEST_SUFFIX}")
    return BatchJob(spec, plans)


def _loaded(loaded: Any, data: dict[str, Any], provenance: dict[str, str]) -> Any:
    from krea2kit.recipe.loader import LoadedRecipe

    return LoadedRecipe(copy.deepcopy(data), dict(provenance), loaded.path, loaded.name)


def plan_groups(spec: JobSpec, session: Any) -> list[Any]:
    """One plan per group, its job indices renumbered to the job's item indices, writing with
    ``overwrite`` (the job owns its names). Plans nothing heavy; a worker calls this too."""
    from krea2kit.recipe.loader import LoadedRecipe

    plans = []
    for group in spec.groups:
        data = copy.deepcopy(spec.recipe)
        sampler = data.setdefault("sampler", {})
        if not isinstance(sampler, dict):
            raise RecipeError("[sampler] must be a table", file=spec.path, key="sampler")
        provenance = dict(spec.provenance)
        for key, value in group["sampler"].items():
            if value is not None and sampler.get(key) != value:
                sampler[key] = value
                provenance[f"sampler.{key}"] = PROVENANCE
        loaded = LoadedRecipe(data, provenance, spec.path, spec.name)
        try:
            plan = session.plan(loaded, prompts=[dict(e) for e in group["entries"]])
        except RecipeError as exc:
            raise _at_line(exc, spec, group) from None
        if len(plan.jobs) != len(group["items"]):  # pragma: no cover - planning keeps entry order and counts
            raise RuntimeError("a job group planned a different number of images than it has items")
        for job, index in zip(plan.jobs, group["items"]):
            job.index = index
        plan.recipe.output.overwrite = True
        plans.append(plan)
    return plans


def _at_line(exc: RecipeError, spec: JobSpec, group: dict[str, Any]) -> RecipeError:
    """A planning error in a group's entries (``prompts[3].seed``) named by its source line."""
    m = re.match(r"prompts\[(\d+)\]", exc.key or "")
    if not m or int(m.group(1)) >= len(group["entries"]):
        return exc
    entry_start = sum(e["count"] for e in group["entries"][: int(m.group(1))])
    where = spec.sources[group["items"][entry_start]]
    return RecipeError(exc.message, file=where, key=(exc.key or "")[m.end():].lstrip(".") or None, hint=exc.hint)


def _name_items(spec: JobSpec, plans: list[Any]) -> None:
    """Each item's output name and key; two items with one name is a recipe error."""
    from krea2kit.output.writers import render_name
    from krea2kit.recipe.outputs import name_fields

    template = plans[0].recipe.output.name
    if re.search(r"\{date\b", template):
        raise RecipeError("a job's file names must not depend on the day it runs ({date})",
                          file=plans[0].loaded.file_of("output.name"), key="output.name",
                          hint="re-running a job finds its images by name: use {index}, {seed}, {name}, "
                               "{prompt_slug} or {recipe}, and a dated output.dir if you like")
    names: list[str | None] = [None] * spec.size
    keys: list[str | None] = [None] * spec.size
    for plan in plans:
        for job in plan.jobs:
            names[job.index] = render_name(plan.recipe.output.name, **name_fields(plan, job))
            keys[job.index] = item_key(plan, job)
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            plan = plans[0]
            raise RecipeError(
                f"items {seen[name]} ({spec.sources[seen[name]]}) and {index} ({spec.sources[index]}) of the job "
                f"would both be written as {name!r}",
                file=plan.loaded.file_of("output.name"), key="output.name",
                hint="a job needs one name per image: keep {index} (or {seed}) in output.name")
        seen[name] = index  # type: ignore[index]
    spec.names = names  # type: ignore[assignment]
    spec.keys = keys  # type: ignore[assignment]


def item_key(plan: Any, job: Any) -> str:
    """A hash of everything the recipe decides about one image (its own one-image recipe,
    model and sampler included) and its index: a manifest line counts only for this key."""
    from krea2kit.recipe.outputs import image_recipe

    # the prompt texts too: image_recipe leaves them out when output.include_prompt is false
    data = {"index": job.index, "prompt": job.prompt, "negative": job.negative, "recipe": image_recipe(plan, job)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]
