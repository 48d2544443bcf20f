"""``krea2kit run``: plan, show progress on stderr, print results on stdout."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from krea2kit.cli.console import Output, escape_line
from krea2kit.errors import EXIT_BLOCKED, EXIT_OK, UsageError


def _job_json(job, plan) -> dict[str, Any]:
    return {
        "index": job.index, "status": "planned", "prompt": job.prompt, "negative": job.negative,
        "seed": job.seed, "width": job.width, "height": job.height, "model": plan.model.name,
        "sampler": plan.recipe.sampler.name, "steps": plan.steps,
        **({"variation_seed": job.variation_seed, "variation_strength": job.variation_strength}
           if job.variation_seed is not None else {}),
    }


class Progress:
    """Rich progress (one bar per image, per-step updates, ETA) for a terminal; plain
    one-line log messages otherwise, so logs never hold control codes."""

    def __init__(self, out: Output, total_images: int) -> None:
        self.out = out
        self.total_images = total_images
        self.bar = None
        self.task = None
        self.overall = None
        self.started = time.perf_counter()
        if out.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=out.err, transient=False, redirect_stdout=False, redirect_stderr=False,
            )

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            self.overall = self.bar.add_task("images", total=self.total_images)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def result(self, line: str) -> None:
        """A result line for stdout. When stdout is the same terminal the bar is drawn on,
        print it above the bar (raw writes would be overdrawn); when stdout is piped or a
        file, write it there directly, never into the stderr console."""
        stdout = self.out.stdout
        if self.bar is not None and getattr(stdout, "isatty", lambda: False)():
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.out.data(line)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False)
        else:
            self.out.info(message)

    def __call__(self, event: str, **data: Any) -> None:
        out = self.out
        if event in ("load", "job_start", "step"):
            # `| head -1` has read what it wanted: stop before more work, not after the
            # next image is rendered and its path cannot be delivered.
            out.ensure_stdout_open()
        from krea2kit.env_values import hide  # a location from $VAR is shown as $VAR, not its value

        if event == "warning":
            if self.bar is not None and out.quiet < 2:
                self.bar.console.print(f"warning: {hide(data['message'])}", style="yellow", markup=False)
            else:
                out.warn(hide(data["message"]))
        elif event == "load":
            self.log(hide(f"loading {data['role'].replace('_', ' ')} {data['name']} from {data['location']} ({data['found_by']})"))
        elif event == "loaded":
            out.debug(f"  {data['role']} ready in {data['seconds']:.2f} s")
        elif event == "job_start":
            job = data["job"]
            if self.bar is not None:
                if self.task is not None:
                    self.bar.remove_task(self.task)
                self.task = self.bar.add_task(f"image {job.index + 1}/{self.total_images} seed {job.seed}", total=data["steps"])
        elif event == "step":
            if self.bar is not None and self.task is not None:
                self.bar.update(self.task, completed=data["step"])
        elif event == "job_end":
            rec = data["record"]
            if self.bar is not None:
                self.bar.advance(self.overall)
            if rec.status == "ok":
                self.log(f"[{rec.index + 1}/{self.total_images}] wrote {rec.path} (seed {rec.seed}, "
                         f"{sum(rec.timings.values()):.2f} s)")
            elif rec.status == "dropped":  # [diversity] keep: rendered and scored, not among the kept
                self.log(f"[{rec.index + 1}/{self.total_images}] not kept: less diverse (seed {rec.seed}); "
                         "nothing written")
            else:
                self.log(f"[{rec.index + 1}/{self.total_images}] BLOCKED by {', '.join(rec.blocked_by)} (seed {rec.seed}); nothing written")
        elif event == "diversity":  # a [diversity] batch was scored (and thinned): one line
            self.log(data["message"])
        elif event == "expanded":  # [expander]: what will be encoded instead of the prompt as written
            how = {"cache": " (cached)", "image": " (recorded in the image)"}.get(data.get("source"), "")
            self.log(f"expanded prompt{how}: {escape_line(data['expanded'])}")
        elif event == "filter_note":
            out.debug(data["message"])


def _summary(out: Output, records: list, elapsed: float) -> None:
    if out.quiet or not records:
        return
    from rich.table import Table

    table = Table(title=f"{len(records)} image(s) in {elapsed:.1f} s", title_justify="left")
    for col in ("#", "status", "seed", "size", "time", "path"):
        table.add_column(col)
    for rec in records:
        total = sum(rec.timings.values()) if rec.timings else math.nan
        table.add_row(str(rec.index + 1), rec.status, str(rec.seed), f"{rec.width}x{rec.height}",
                      f"{total:.2f} s" if total == total else "-", rec.path or "-")
    out.err.print(table)


def parse_sweep(text: str) -> tuple[str, list[float]]:
    name, sep, spec = text.partition("=")
    parts = spec.split(":")
    try:
        if not sep or len(parts) != 3:
            raise ValueError
        a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
        if n < 2:
            raise ValueError
    except ValueError:
        raise UsageError(f"--sweep expects NAME=A:B:N with N >= 2, got {text!r}", key="--sweep",
                         hint="e.g. --sweep detail=-1:1:5") from None
    return name.strip(), [a + (b - a) * i / (n - 1) for i in range(n)]


def load_and_report(out: Output, source: str | None, overrides: list[str]):
    """Load a recipe; for one read from an image, say on stderr which of its keys were
    ignored (one line), before anything else can fail."""
    from krea2kit.api import load_recipe
    from krea2kit.recipe.loader import image_init_mismatches, image_lora_mismatches

    loaded = load_recipe(source, overrides=overrides)
    if loaded.dropped:
        keys = ", ".join(loaded.dropped)
        out.warn(f"{loaded.path}: keys of the image's recipe ignored, local settings apply: {keys}")
    from krea2kit.recipe.references import image_reference_mismatches

    for note in image_lora_mismatches(loaded) + image_init_mismatches(loaded) + image_reference_mismatches(loaded):
        out.warn(note)
    return loaded


def run_command(out: Output, recipe: str | None, overrides: list[str], prompts: list[str], *,
                as_json: bool, dry_run: bool, sweeps: list[str], job_prompts: str | None = None,
                runner: str | None = None, runner_opts: tuple[str, ...] = (), address: str | None = None) -> int:
    from krea2kit.api import Session

    session = Session()
    if sweeps and (job_prompts or runner):  # batch jobs: krea2kit.jobs, cli/job_cmd.py
        raise UsageError("--sweep cannot run as a batch job (--prompts / --on)", key="--sweep")
    if sweeps:
        from krea2kit.cli.sweep import run_sweep

        return run_sweep(out, session, recipe, overrides, prompts, [parse_sweep(s) for s in sweeps], as_json=as_json,
                         dry_run=dry_run)
    loaded = load_and_report(out, recipe, overrides)
    from krea2kit.jobs import job_source

    source, base = job_source(loaded, job_prompts)
    if source is not None:  # a batch job: a prompt source, a manifest, a runner
        from krea2kit.cli.job_cmd import run_job_command

        return run_job_command(out, session, loaded, source, base=base, prompts=prompts, runner=runner,
                               runner_opts=list(runner_opts), address=address, as_json=as_json, dry_run=dry_run)
    if runner or runner_opts or address:
        raise UsageError("--on, --address and --runner-opt run a batch job: give --prompts FILE (or [job] prompts)",
                         key="--on", hint="krea2kit run RECIPE --prompts prompts.txt --on ray")
    if "matrix" in loaded.data:  # several plans, one per combination (cli/matrix_cmd.py)
        from krea2kit.cli.matrix_cmd import run_matrix

        return run_matrix(out, session, loaded, prompts, as_json=as_json, dry_run=dry_run)
    plan = session.plan(loaded, prompts=prompts or None)
    if plan.recipe.diversity is not None:  # the embedder name and options, checked before anything loads
        from krea2kit.diversity import resolve_embedder

        resolve_embedder(plan, session.host.registry)
    if dry_run:
        _warn_expander_setup(out, session, plan)
        memory = dry_run_memory(out, session, plan)
        print_dry_run(out, plan, as_json=as_json, extra={"memory": memory} if memory else None)
        out.info(f"dry run: {len(plan.jobs)} image(s) with {plan.model.name}; nothing loaded")
        return EXIT_OK
    return execute(out, session, plan, as_json=as_json)


def _warn_expander_setup(out: Output, session, plan) -> None:
    """``--dry-run`` with ``[expander]`` on an endpoint backend and no endpoint set: the run
    would stop (exit 5) at the first prompt without a cached or recorded expansion; say so."""
    from krea2kit.errors import ExpanderError
    from krea2kit.recipe.expander import active, section

    if not active(plan):
        return
    backend = section(plan.recipe).backend
    descriptor = session.host.registry.get("prompt_expander", backend, key="expander.backend")
    if getattr(descriptor, "needs", "") != "endpoint":
        return
    from krea2kit.expander.config import endpoint

    try:
        endpoint(session.settings)
    except ExpanderError as exc:
        out.warn(f"[expander] backend {backend!r}: {exc.message}; the run stops (exit 5) at the first prompt "
                 f"without a cached expansion" + (f" ({exc.hint})" if exc.hint else ""))


def dry_run_memory(out: Output, session, plan) -> dict[str, Any] | None:
    """The plan's memory estimate (krea2kit.memory) on stderr; its JSON form for --json lines."""
    from krea2kit.errors import Krea2kitError
    from krea2kit.memory import estimate
    from krea2kit.pipeline import pick_device, pick_dtype

    settings = session.settings
    model = plan.recipe.model
    try:
        requested = model.device if model.device != "auto" else (settings.device or "auto")
        # an explicit device is taken as given: planning for a GPU machine from this one is fine
        device = requested if requested != "auto" else pick_device("auto")
        dtype = pick_dtype(model.dtype if model.dtype != "auto" else (settings.dtype or "auto"), device)
        est = estimate(plan, settings, device=device, dtype=dtype)
    except Krea2kitError as exc:  # e.g. a weights file that is not one: the run would say so too
        out.warn(f"no memory estimate: {exc}")
        return None
    for line in est.lines() + est.notes:
        out.info(line)
    return est.to_json()


def print_dry_run(out: Output, plan, *, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """One stdout line per planned image: a JSON object, or index, seed, size and prompt."""
    for job in plan.jobs:
        if as_json:
            out.data(json.dumps({**_job_json(job, plan), **(extra or {})}))
        else:
            out.data(f"{job.index}\t{job.seed}\t{job.width}x{job.height}\t{escape_line(job.prompt)}")


def execute(out: Output, session, plan, *, as_json: bool) -> int:
    records = execute_collect(out, session, plan, as_json=as_json)
    blocked = [r for r in records if r.status == "blocked"]
    if blocked:
        out.warn(f"{len(blocked)} of {len(records)} image(s) blocked by content filters; they were not written")
        return EXIT_BLOCKED
    return EXIT_OK


def execute_collect(out: Output, session, plan, *, as_json: bool, total: int | None = None,
                    summary: bool = True) -> list:
    """Run a plan, print each result as it comes, show the summary; return the records.
    ``total``: the images of the whole run when this plan is one part of it (a [matrix])."""
    records = []
    started = time.perf_counter()
    with Progress(out, total or len(plan.jobs)) as progress:
        for record in session.run(plan, events=progress):
            records.append(record)
            if record.status == "ok":
                progress.result(json.dumps(record.to_json()) if as_json else escape_line(record.path))
            elif as_json:
                progress.result(json.dumps(record.to_json()))
    if summary:
        _summary(out, records, time.perf_counter() - started)
    return records
