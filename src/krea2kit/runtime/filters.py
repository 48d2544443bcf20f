"""Running the content filters of a plan: every enabled filter, any block wins, fail closed.

Mandatory filters are always on; only the deployer's ``safety.unfiltered`` setting turns
them off, and then every image records that it was produced unfiltered. Every verdict is
appended to the audit log.
"""

from __future__ import annotations

from typing import Any

from krea2kit.contracts import LoadContext
from krea2kit.recipe.plan import Job, Plan
from krea2kit.settings import Settings

# One image filter may legitimately take a few seconds on a big image; a hung one blocks.
FILTER_TIMEOUT_S = 120.0


def load_filter_part(descriptor: Any, options: Any, context: LoadContext) -> Any:
    """Load one registered filter through the fail-closed loader of
    :func:`krea2kit.safety.verdict.load_filter`: a filter that cannot load becomes an
    ``UnavailableFilter`` that blocks everything. A :class:`RecipeError` (the recipe asked
    for something it may not, e.g. a looser threshold) is the user's to fix and is raised."""
    from krea2kit.errors import RecipeError
    from krea2kit.safety.verdict import load_filter

    refused: list[RecipeError] = []

    def load(_config: dict) -> Any:
        try:
            return descriptor.load_part(options, context)
        except RecipeError as exc:
            refused.append(exc)
            raise

    instance = load_filter(descriptor.name, load, version=descriptor.version)
    if refused:
        raise refused[0]
    return instance


class FilterSet:
    def __init__(self, plan: Plan, settings: Settings, *, run_id: str, events) -> None:
        from krea2kit.safety.audit import AuditLog
        from krea2kit.safety.verdict import UnavailableFilter

        self.run_id = run_id
        self.events = events
        self.unfiltered = settings.safety.unfiltered
        self.audit = AuditLog(settings.audit_path(), prompt_mode=settings.safety.audit_prompts)
        self.audit.check_writable()  # fail closed, and before any filter or model loads
        self.prompt_filters: list[Any] = []
        self.image_filters: list[Any] = []
        self.names: list[str] = []
        self.prompt_decisions: dict[str, Any] = {}  # text -> Decision, for the image records
        if self.unfiltered:
            events("warning", message="safety.unfiltered is set in the deployer config: mandatory content "
                                      "filters are off and every image records that it was produced unfiltered")
        for descriptor, options in plan.filters:
            if self.unfiltered and descriptor.mandatory:
                continue
            context = LoadContext(role="filter", name=descriptor.name, settings=settings,
                                  plugin_options=plan.plugin_options.get(descriptor.plugin))
            instance = load_filter_part(descriptor, options, context)
            if isinstance(instance, UnavailableFilter):
                events("warning", message=f"content filter {descriptor.name!r} failed to load ({instance.reason}); "
                                          "everything it would check is blocked")
            self.names.append(descriptor.name)
            (self.prompt_filters if descriptor.target == "prompt" else self.image_filters).append(instance)

    def _run(self, filters: list[Any], item: Any, kind: str):
        from krea2kit.safety.verdict import run_filters

        return run_filters(filters, item, kind=kind, timeout_s=FILTER_TIMEOUT_S, allow_empty=self.unfiltered)

    def check_prompts(self, jobs: list[Job]) -> dict[int, Any]:
        """Check every text that reaches the encoder; returns {job index: blocking decision}."""
        decisions = self.prompt_decisions
        blocked: dict[int, Any] = {}
        for job in jobs:
            for text in (job.prompt, job.negative):
                if text in decisions:
                    continue
                decision = self._run(self.prompt_filters, text, "prompt")
                self.audit.record(self.run_id, "prompt", text, decision)
                decisions[text] = decision
            bad = [decisions[t] for t in (job.prompt, job.negative) if decisions[t].blocked]
            if bad:
                blocked[job.index] = bad[0]
                self.events("warning", message=f"image {job.index + 1}: {bad[0].summary()}")
        return blocked

    def check_image(self, job: Job, image: Any):
        decision = self._run(self.image_filters, image, "image")
        self.audit.record(self.run_id, "image", f"image {job.index} seed {job.seed}", decision, prompt=job.prompt)
        return decision
