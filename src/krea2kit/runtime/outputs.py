"""Output file names and the metadata each image carries, at write time.

Each image embeds a recipe that reproduces exactly that image (its prompt, seed and
size as a one-image recipe), so ``krea2kit run IMAGE.png`` renders it again. What can be
checked before rendering (names, folder, quality, JPEG metadata size) is checked at plan
time by :mod:`krea2kit.recipe.outputs`; here a name is claimed atomically
(:mod:`krea2kit.files`), so two runs into one folder never get the same path.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from krea2kit.contracts import OutputInfo
from krea2kit.recipe.outputs import image_recipe, name_fields, output_dir
from krea2kit.recipe.plan import Job, Plan
from krea2kit.recipe.references import reference_record

__all__ = ["OutputInfo", "OutputPlanner", "image_recipe"]


class OutputPlanner:
    #: How many names OutputPlanner.write tries when a writer reports each one taken.
    MAX_TRIES = 1000

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.dir = output_dir(plan)
        self.taken: set[Path] = set()

    def path_for(self, job: Job, writer: Any) -> Path:
        """The name to try for ``job``: the rendered one, or without overwrite the first ``-N``
        that neither this run nor the folder holds. Only a hint: the writer's atomic claim
        decides (another run may take the name in between)."""
        from krea2kit.files import OutputError, numbered_names
        from krea2kit.output.writers import render_name

        name = render_name(self.plan.recipe.output.name, **name_fields(self.plan, job))
        base = self.dir / name
        path = base.with_name(base.name + writer.extension)
        if not self.plan.recipe.output.overwrite:
            free = next((p for p in numbered_names(path) if p not in self.taken and not os.path.lexists(p)), None)
            if free is None:
                raise OutputError(f"no free file name like {path.name} in {path.parent}", file=str(path),
                                  hint="clean the output folder or change output.name")
            path = free
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder {path.parent}: {exc.strerror or exc}",
                              file=str(path), hint="choose an output.dir you can write to") from None
        return path

    def write(self, job: Job, writer: Any, image: Any, info: OutputInfo) -> Path:
        """Write ``image`` under the next free name; returns the path the writer used.

        krea2kit's writers claim a name atomically and take the next free one themselves. A
        plugin writer that raises FileExistsError for a taken name gets the next one here.
        """
        from krea2kit.files import NameTaken, OutputError

        overwrite = self.plan.recipe.output.overwrite
        info = replace(info, overwrite=overwrite)
        for _ in range(self.MAX_TRIES):
            path = self.path_for(job, writer)
            try:
                written = Path(writer.write(image, path, info))
            except (FileExistsError, NameTaken):
                if overwrite:
                    raise
                self.taken.add(path)  # another run took it after path_for looked
                continue
            self.taken.add(written)
            return written
        raise OutputError(f"no free file name for image {job.index} after {self.MAX_TRIES} tries",
                          file=str(self.dir), hint="clean the output folder or change output.name")

    def info(self, job: Job, record: Any, *, parts: dict[str, Any], filters: Any, image_decision: Any,
             settings: Any = None) -> OutputInfo:
        """The metadata of one image. Local paths (weights, LoRA files) are recorded as file
        names (LoRAs with their sha256) unless the user config sets metadata.local_paths."""
        from krea2kit.output.metadata import ImageMetadata, build_parameters, build_record, generation_params
        from krea2kit.recipe.trust import lora_identity, portable_identities, portable_recipe

        local_paths = bool(settings is not None and settings.metadata.local_paths)

        plan = self.plan
        out = plan.recipe.output
        include = out.include_prompt
        parameters = None
        krea2kit: dict[str, Any] = {}
        if out.metadata:
            s = plan.recipe.sampler
            params = generation_params(
                # plan.guidance is Krea's g whatever the recipe's convention (which the record keeps)
                steps=plan.steps, sampler=s.name, guidance=plan.guidance, seed=job.seed, width=job.width,
                height=job.height, model=plan.model.name, shift_mu=record.mu,
                variation_seed=job.variation_seed, variation_strength=job.variation_strength,
                extra={"VAE": parts.get("vae", {}).get("name")} if parts.get("vae") else None,
            )
            parameters = build_parameters(job.prompt if include else None, job.negative if include else None, params)
            verdicts = [filters.prompt_decisions[t].to_dict() for t in (job.prompt, job.negative)
                        if t in filters.prompt_decisions]
            if not include:  # prompt verdicts say nothing about the prompt text itself
                verdicts = [{"kind": v["kind"], "action": v["action"], "verdicts": v["verdicts"]} for v in verdicts]
            verdicts.append(image_decision.to_dict())
            loras = [{"name": lora.name, **lora_identity(str(lora.path), local_paths=local_paths)}
                     for lora in plan.recipe.loras]
            krea2kit = build_record(
                recipe=portable_recipe(image_recipe(plan, job), local_paths=local_paths), plugins=plan.plugin_versions,
                weights=portable_identities(parts, local_paths=local_paths),
                filters=verdicts, unfiltered=filters.unfiltered,
                extra={"run_id": record.run_id, "index": job.index, "mu": record.mu, "loras": loras,
                       **init_record(plan.recipe.init, local_paths=local_paths),
                       **expander_record(job, include_prompt=include),
                       **reference_record(plan.recipe.references, local_paths=local_paths)},
            )
        elif filters.unfiltered:
            krea2kit = {"unfiltered": True}
        return OutputInfo(ImageMetadata(parameters=parameters, krea2kit=krea2kit),
                          prompt=job.prompt if include else None, negative=job.negative if include else None,
                          seed=job.seed, index=job.index, quality=out.quality)


def expander_record(job: Job, *, include_prompt: bool) -> dict[str, Any]:
    """``{"expander": {original, expanded, backend, ...}}`` for an expanded prompt, else ``{}``."""
    if job.expansion is None:
        return {}
    from krea2kit.expander.jobs import metadata_entry

    return metadata_entry(job, include_prompt=include_prompt)


def init_record(init: Any, *, local_paths: bool = False) -> dict[str, Any]:
    """``{"init": {"image": {"file", "sha256"}, "mask": {...}}}`` for a run with an [init]
    picture (how ``krea2kit run IMAGE.png`` checks the files the user gives again); ``{}``
    without one. Paths only when ``local_paths``."""
    if init is None:
        return {}
    from krea2kit.recipe.trust import lora_identity

    out = {"image": lora_identity(str(Path(init.image).expanduser()), local_paths=local_paths)}
    if init.mask is not None:
        out["mask"] = lora_identity(str(Path(init.mask).expanduser()), local_paths=local_paths)
    return {"init": out}
