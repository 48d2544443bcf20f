"""Output file names and the metadata each image carries.

Each image embeds a recipe that reproduces exactly that image (its prompt, seed and
size as a one-image recipe), so ``krea2kit run IMAGE.png`` renders it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from krea2kit.recipe.plan import Job, Plan


@dataclass(frozen=True)
class OutputInfo:
    """What a writer receives besides the image."""

    metadata: Any  # krea2kit.output.metadata.ImageMetadata
    prompt: str | None  # None when the recipe keeps prompts private
    negative: str | None
    seed: int
    index: int
    quality: int | None = None


def check_template(plan: Plan) -> None:
    """Render the file-name template once with sample values (bad templates fail at plan time)."""
    from krea2kit.output.writers import render_name

    render_name(plan.recipe.output.name, **_name_fields(plan, plan.jobs[0]))


def _name_fields(plan: Plan, job: Job) -> dict[str, Any]:
    return {"index": job.index, "seed": job.seed, "prompt": job.prompt, "recipe": plan.name,
            "model": plan.model.name, "date": datetime.now(timezone.utc).date().isoformat()}


def image_recipe(plan: Plan, job: Job) -> dict[str, Any]:
    """The resolved recipe reduced to this one image."""
    data = plan.resolved()
    data.pop("prompts", None)
    data.update(prompt=job.prompt, negative=job.negative, seed=job.seed, count=1,
                width=job.width, height=job.height)
    if not plan.recipe.output.include_prompt:
        data.pop("prompt")
        data.pop("negative")
    return data


class OutputPlanner:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.dir = Path(plan.recipe.output.dir).expanduser()
        self.taken: set[Path] = set()

    def path_for(self, job: Job, writer: Any) -> Path:
        from krea2kit.output.writers import render_name

        name = render_name(self.plan.recipe.output.name, **_name_fields(self.plan, job))
        base = self.dir / name
        path = base.with_name(base.name + writer.extension)
        if not self.plan.recipe.output.overwrite:
            n = 2
            while path in self.taken or path.exists():
                path = base.with_name(f"{base.name}-{n}{writer.extension}")
                n += 1
        self.taken.add(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def info(self, job: Job, record: Any, *, parts: dict[str, Any], filters: Any, image_decision: Any) -> OutputInfo:
        from krea2kit.output.metadata import ImageMetadata, build_parameters, build_record, generation_params

        plan = self.plan
        out = plan.recipe.output
        include = out.include_prompt
        parameters = None
        krea2kit: dict[str, Any] = {}
        if out.metadata:
            s = plan.recipe.sampler
            params = generation_params(
                steps=plan.steps, sampler=s.name, cfg_scale=s.guidance, seed=job.seed, width=job.width,
                height=job.height, model=plan.model.name, cfg_convention=s.convention, shift_mu=record.mu,
                extra={"VAE": parts.get("vae", {}).get("name")} if parts.get("vae") else None,
            )
            parameters = build_parameters(job.prompt if include else None, job.negative if include else None, params)
            verdicts = [filters.prompt_decisions[t].to_dict() for t in (job.prompt, job.negative)
                        if t in filters.prompt_decisions]
            if not include:  # prompt verdicts say nothing about the prompt text itself
                verdicts = [{"kind": v["kind"], "action": v["action"], "verdicts": v["verdicts"]} for v in verdicts]
            verdicts.append(image_decision.to_dict())
            krea2kit = build_record(
                recipe=image_recipe(plan, job), plugins=plan.plugin_versions, weights=parts,
                filters=verdicts, unfiltered=filters.unfiltered,
                extra={"run_id": record.run_id, "index": job.index, "mu": record.mu},
            )
        elif filters.unfiltered:
            krea2kit = {"unfiltered": True}
        return OutputInfo(ImageMetadata(parameters=parameters, krea2kit=krea2kit),
                          prompt=job.prompt if include else None, negative=job.negative if include else None,
                          seed=job.seed, index=job.index, quality=out.quality)
