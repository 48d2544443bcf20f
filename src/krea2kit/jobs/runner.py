"""Running a planned job: skip what the manifest shows finished, hand the rest to a runner,
append a manifest line as each image comes back.

A runner (``register_runners``, :class:`krea2kit.contracts.Runner`) only decides *where* the
items render: ``local`` (built in) renders them in this process, group by group, through the
same :class:`~krea2kit.api.Session` as ``krea2kit run``; the Ray plugin spreads them over a
cluster. Whatever the runner, the item's seed, file name and pixels are fixed by the job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from krea2kit.jobs.manifest import Manifest, finished, read_lines
from krea2kit.jobs.spec import BatchJob


@dataclass
class Resume:
    """What the manifest says before the run: items finished and intact, items to render."""

    done: dict[int, dict[str, Any]]
    pending: list[int]
    redo: list[int]  # listed as ok in the manifest, but the file is gone or differs (or the item changed)


def resume_state(job: BatchJob) -> Resume:
    spec = job.spec
    lines = read_lines(job.manifest_path)
    keys = dict(enumerate(spec.keys))
    done = finished(lines, keys)
    ok_before = {line["index"] for line in lines if line.get("status") == "ok"}
    pending = [i for i in range(spec.size) if i not in done]
    return Resume(done, pending, [i for i in pending if i in ok_before])


def manifest_entry(job: BatchJob, record: Any) -> dict[str, Any]:
    """The manifest line of one finished item (prompts left out when output.include_prompt
    is false, as in the images themselves)."""
    spec = job.spec
    return {
        "index": record.index, "prompt": record.prompt, "negative": record.negative, "seed": record.seed,
        "width": record.width, "height": record.height, "steps": record.steps, "guidance": record.guidance,
        "path": record.path, "sha256": record.sha256, "status": record.status,
        "blocked_by": record.blocked_by or None, "source": spec.sources[record.index], "key": spec.keys[record.index],
        "run_id": record.run_id,
    }


def run_job(session: Any, job: BatchJob, runner: Any, items: Sequence[int], *, events: Any) -> Iterator[Any]:
    """Render ``items`` with ``runner``, appending each finished one to the manifest (fsynced)
    before yielding its record. The manifest is locked for the whole run."""
    wanted = set(items)
    with Manifest(job.manifest_path) as manifest:
        for record in runner.run(job, list(items), session=session, events=events):
            if record.index not in wanted:  # a runner bug: never record an item the job did not ask for
                raise RuntimeError(f"runner returned item {record.index}, which was not asked for")
            manifest.append(manifest_entry(job, record))
            yield record


class LocalRunner:
    """Renders the items in this process, group by group (items sharing steps and guidance), in
    item order within a group; the parts stay loaded."""

    name = "local"

    def run(self, job: BatchJob, items: Sequence[int], *, session: Any, events: Any) -> Iterator[Any]:
        wanted = set(items)
        for plan in job.plans:
            jobs = [j for j in plan.jobs if j.index in wanted]
            if jobs:
                yield from session.run(replace(plan, jobs=jobs), events=events)


def load_local(options: Any, context: Any) -> LocalRunner:
    return LocalRunner()
