"""The three stages of a job item, for runners that spread them over processes or machines.

The local runner renders, filters and writes each image inside one
:class:`~krea2kit.pipeline.Pipeline` run. A distributed runner (the Ray plugin) splits that
same work into stages without a second pipeline:

1. :class:`ItemRenderer` (one per GPU): the pipeline up to the decoded image (prompt
   filters, text encoding, sampling, VAE) through :attr:`Pipeline.image_handoff`, so the
   pixels are exactly those of a local run; parts stay loaded for the renderer's life;
2. :class:`ItemFilter`: the image content filters, with the same fail-closed policy and
   audit log as a local run;
3. :class:`ItemWriter` (in the driver): metadata, the writer and its atomic name claim,
   exactly as the pipeline does it, so files and names match a local run's.

Between stages an item travels as a plain dict (a :class:`~krea2kit.pipeline.Record`, a PIL
image, the prompt filters' decisions and the parts' identities), which pickles.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from krea2kit.jobs.spec import JobSpec, plan_groups


def _session(session: Any) -> Any:
    if session is not None:
        return session
    from krea2kit.api import Session

    return Session()


def _by_plan(plans: list[Any], indices: list[int]) -> list[tuple[Any, list[Any]]]:
    wanted = set(indices)
    out = []
    for plan in plans:
        jobs = [job for job in plan.jobs if job.index in wanted]
        if jobs:
            out.append((plan, jobs))
    return out


class ItemRenderer:
    """Stage 1: items to decoded images. Plans the job once; the session keeps the parts."""

    def __init__(self, spec: JobSpec | dict, *, session: Any = None) -> None:
        from krea2kit.pipeline import plugin_versions

        self.spec = spec if isinstance(spec, JobSpec) else JobSpec.from_json(spec)
        self.session = _session(session)
        self.plans = plan_groups(self.spec, self.session)
        versions = plugin_versions(self.session.host)
        for plan in self.plans:
            plan.plugin_versions = versions

    def render(self, indices: list[int]) -> list[dict[str, Any]]:
        """One dict per item: ``status`` "rendered" (with ``image``) or "blocked" (a prompt
        filter blocked it; ``record`` says why)."""
        pipeline = self.session.pipeline
        out: list[dict[str, Any]] = []

        def handoff(plan: Any, job: Any, record: Any, image: Any, filters: Any) -> dict[str, Any]:
            decisions = {t: filters.prompt_decisions[t] for t in (job.prompt, job.negative)
                         if t in filters.prompt_decisions}
            return {"index": job.index, "status": "rendered", "record": record, "image": image,
                    "prompt_decisions": decisions, "identities": {k: dict(v) for k, v in pipeline.identities.items()}}

        previous = pipeline.image_handoff
        pipeline.image_handoff = handoff
        try:
            for plan, jobs in _by_plan(self.plans, indices):
                # image filters run in stage 2: only the prompt filters load here
                prompt_only = [(d, o) for d, o in plan.filters if getattr(d, "target", "image") == "prompt"]
                sub = replace(plan, jobs=jobs, filters=prompt_only)
                for result in pipeline.run(sub, run_id=self.spec.run_id or None):
                    if isinstance(result, dict):
                        out.append(result)
                    else:  # a Record: blocked by a prompt filter before rendering
                        out.append({"index": result.index, "status": "blocked", "record": result})
        finally:
            pipeline.image_handoff = previous
        return out


class ItemFilter:
    """Stage 2: the image content filters on rendered items (every enabled filter, any block
    wins, a failing filter blocks; verdicts appended to the audit log)."""

    def __init__(self, spec: JobSpec | dict, *, session: Any = None) -> None:
        self.spec = spec if isinstance(spec, JobSpec) else JobSpec.from_json(spec)
        self.session = _session(session)
        self.plans = plan_groups(self.spec, self.session)
        self._sets: dict[int, Any] = {}

    def _filters(self, index: int) -> tuple[Any, Any]:
        from krea2kit.runtime.filters import FilterSet

        for gi, plan in enumerate(self.plans):
            for job in plan.jobs:
                if job.index == index:
                    if gi not in self._sets:
                        image_only = [(d, o) for d, o in plan.filters if getattr(d, "target", "image") != "prompt"]
                        self._sets[gi] = FilterSet(replace(plan, filters=image_only), self.session.settings,
                                                   run_id=self.spec.run_id or "job", events=lambda *a, **k: None)
                    return self._sets[gi], job
        raise KeyError(index)

    def check(self, item: dict[str, Any]) -> dict[str, Any]:
        if item["status"] != "rendered":
            return item
        filters, job = self._filters(item["index"])
        return {**item, "decision": filters.check_image(job, item["image"]), "unfiltered": filters.unfiltered}


class ItemWriter:
    """Stage 3 (the driver): metadata and the atomic write, as the pipeline does them."""

    def __init__(self, plans: list[Any], *, session: Any) -> None:
        from krea2kit.pipeline import plugin_versions
        from krea2kit.runtime.outputs import OutputPlanner

        self.session = session
        self.plans = plans
        self._outputs = {id(p): OutputPlanner(p) for p in plans}
        self._writers: dict[int, Any] = {}
        self._jobs = {job.index: (plan, job) for plan in plans for job in plan.jobs}
        versions = plugin_versions(session.host)
        for plan in plans:
            plan.plugin_versions = versions

    def write(self, item: dict[str, Any]) -> Any:
        """The item's final :class:`~krea2kit.pipeline.Record` (written, or blocked)."""
        import time

        record = item["record"]
        if item["status"] != "rendered":
            return record
        plan, job = self._jobs[item["index"]]
        decision = item["decision"]
        record.verdicts = [v.to_dict() for v in decision.verdicts]
        if decision.blocked:
            record.status = "blocked"
            record.blocked_by = [v.filter for v in decision.blocking]
            return record
        if id(plan) not in self._writers:
            self._writers[id(plan)] = self.session.pipeline.small_part(plan, "writer", None)
        start = time.perf_counter()
        filters = _FiltersView(item.get("prompt_decisions") or {}, bool(item.get("unfiltered")))
        outputs = self._outputs[id(plan)]
        info = outputs.info(job, record, parts=item.get("identities") or {}, filters=filters,
                            image_decision=decision, settings=self.session.settings)
        written = outputs.write(job, self._writers[id(plan)], item["image"], info)
        record.path = str(written)
        record.sha256 = hashlib.sha256(Path(written).read_bytes()).hexdigest()
        record.timings = {**record.timings, "write": round(time.perf_counter() - start, 4)}
        return record


class _FiltersView:
    """What OutputPlanner.info reads of a FilterSet, rebuilt from a rendered item."""

    def __init__(self, prompt_decisions: dict[str, Any], unfiltered: bool) -> None:
        self.prompt_decisions = prompt_decisions
        self.unfiltered = unfiltered
