"""``krea2kit run RECIPE --prompts FILE|-`` (or a recipe with ``[job] prompts``): a batch job.

Everything is read and checked first (every prompt line, every item's plan and file name,
the runner and its options); only then does anything load. Finished images recorded in the
manifest (and still intact) are skipped; the count goes to stderr. stdout carries one path
(or JSON object) per image written, as a plain run does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from krea2kit.cli.console import Output, escape_line
from krea2kit.errors import EXIT_BLOCKED, EXIT_OK, RecipeError, UsageError


def parse_runner_opts(items: list[str], address: str | None) -> dict[str, Any]:
    """``--runner-opt KEY=VALUE`` (values typed like TOML, as ``--set``) and ``--address``."""
    from krea2kit.recipe.loader import parse_override

    opts: dict[str, Any] = {}
    for item in items:
        try:
            parts, value = parse_override(item)
        except RecipeError as exc:
            raise UsageError(exc.message.replace("--set", "--runner-opt"), key="--runner-opt",
                             hint="e.g. --runner-opt workers=2") from None
        if len(parts) != 1:
            raise UsageError(f"--runner-opt takes a plain option name, got {'.'.join(parts)!r}", key="--runner-opt",
                             hint="e.g. --runner-opt workers=2")
        opts[parts[0]] = value
    if address is not None:
        if "address" in opts:
            raise UsageError("the address is given twice (--address and --runner-opt address=...)", key="--address")
        opts["address"] = address
    return opts


def load_runner(session: Any, name: str, opts: dict[str, Any]) -> Any:
    """The runner part ``name`` with its validated options; errors are exit 2, before loading
    anything heavy (a runner connects to its cluster only when it runs)."""
    from krea2kit.contracts import LoadContext
    from krea2kit.pipeline import require_protocol

    registry = session.host.registry
    try:
        descriptor = registry.get("runner", name, key="--on")
    except RecipeError as exc:
        hint = exc.hint or ""
        if name.split(":")[-1] == "ray":
            hint = "install the Ray runner: pip install ./plugins/krea2kit-ray; " + hint
        raise UsageError(exc.message, key="--on", hint=hint) from None
    try:
        options = descriptor.validate_options(opts, where="--runner-opt")
    except RecipeError as exc:
        raise UsageError(exc.message, key=exc.key or "--runner-opt", hint=exc.hint) from None
    context = LoadContext(role="runner", name=descriptor.name, settings=session.settings)
    return require_protocol(descriptor, descriptor.load_part(options, context))


def run_job_command(out: Output, session: Any, loaded: Any, source: str, *, base: Any, prompts: list,
                    runner: str | None, runner_opts: list[str], address: str | None, as_json: bool,
                    dry_run: bool) -> int:
    from krea2kit.jobs import build_job
    from krea2kit.jobs.runner import resume_state, run_job

    if prompts:
        raise UsageError("--prompt and a job's prompt source (--prompts or [job] prompts) exclude each other",
                         key="--prompt", hint="put every prompt in the prompt file")
    job = build_job(session, loaded, source, base=base)
    spec = job.spec
    opts = parse_runner_opts(runner_opts, address)
    if dry_run:
        _dry_run(out, session, job, as_json=as_json)
        return EXIT_OK
    runner_part = load_runner(session, runner or "local", opts)
    resume = resume_state(job)
    if resume.done:
        out.info(f"skipping {len(resume.done)} finished image(s) of {spec.size} (manifest {spec.manifest})")
    if resume.redo:
        out.warn(f"{len(resume.redo)} image(s) the manifest lists as finished are missing, changed or no longer "
                 f"match the job; rendering them again: items {', '.join(map(str, resume.redo[:10]))}"
                 + (" ..." if len(resume.redo) > 10 else ""))
    if not resume.pending:
        out.info(f"job complete: all {spec.size} image(s) are finished (manifest {spec.manifest})")
        return EXIT_OK
    spec.run_id = uuid.uuid4().hex[:12]
    from krea2kit.cli.run_cmd import Progress, _summary

    records = []
    started = time.perf_counter()
    with Progress(out, spec.size) as progress:
        if progress.bar is not None and resume.done:
            progress.bar.advance(progress.overall, len(resume.done))
        for record in run_job(session, job, runner_part, resume.pending, events=progress):
            records.append(record)
            if record.status == "ok":
                progress.result(json.dumps(record.to_json()) if as_json else escape_line(record.path))
            elif as_json:
                progress.result(json.dumps(record.to_json()))
    _summary(out, records, time.perf_counter() - started)
    out.info(f"job: {len(records)} image(s) rendered on {runner_part.name}, {len(resume.done)} skipped as finished; "
             f"manifest {spec.manifest}")
    blocked = [r for r in records if r.status == "blocked"]
    if blocked:
        out.warn(f"{len(blocked)} of {len(records)} image(s) blocked by content filters; they were not written")
        return EXIT_BLOCKED
    return EXIT_OK


def _dry_run(out: Output, session: Any, job: Any, *, as_json: bool) -> None:
    from krea2kit.cli.run_cmd import _job_json
    from krea2kit.jobs.runner import resume_state

    from krea2kit.cli.run_cmd import dry_run_memory

    spec = job.spec
    done = resume_state(job).done
    # the memory plan of one render worker: the group holding the largest image (krea2kit.memory)
    largest = max(job.plans, key=lambda p: max(j.width * j.height for j in p.jobs))
    memory = dry_run_memory(out, session, largest)
    rows = sorted(((j, p) for p in job.plans for j in p.jobs), key=lambda row: row[0].index)
    for j, plan in rows:
        status = "finished" if j.index in done else "planned"
        if as_json:
            out.data(json.dumps({**_job_json(j, plan), "status": status, "source": spec.sources[j.index],
                                 "name": spec.names[j.index], **({"memory": memory} if memory else {})}))
        else:
            out.data(f"{j.index}\t{j.seed}\t{j.width}x{j.height}\t{escape_line(j.prompt)}")
    out.info(f"dry run: a job of {spec.size} image(s), {len(done)} finished per the manifest {spec.manifest}; "
             "nothing loaded")
