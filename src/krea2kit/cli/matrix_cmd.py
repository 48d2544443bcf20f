"""``krea2kit run`` of a recipe with a ``[matrix]`` table (see :mod:`krea2kit.recipe.matrix`):
every cell planned before anything loads (so a bad value in any cell stops the run first),
then rendered in one session, image indices running on across cells so file names never
collide; with ``output.sheet = true`` a labelled contact sheet: one column per value of the
last axis, one row per combination of the others (and per image of a cell)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from krea2kit.cli.console import Output, escape_line
from krea2kit.errors import EXIT_BLOCKED, EXIT_OK, RecipeError, UsageError


def plan_cells(session, loaded, axes, cells, prompts) -> list:
    """One plan per cell; job indices offset so they number the whole matrix."""
    from krea2kit.recipe.matrix import MAX_IMAGES

    if prompts and any(a.key.startswith("prompt.") for a in axes):
        raise UsageError("--prompt replaces the prompts that [matrix.prompt] fills in",
                         key="--prompt", hint="put the prompt with its {matrix.NAME} placeholders in the recipe")
    plans, offset = [], 0
    for cell in cells:
        plan = session.plan(cell.loaded, prompts=prompts or None)
        for job in plan.jobs:
            job.index += offset
        offset += len(plan.jobs)
        if offset > MAX_IMAGES:
            raise RecipeError(f"[matrix] plans more than {MAX_IMAGES} images", file=loaded.file_of("matrix"),
                              key="matrix", hint="use fewer values per axis, or a smaller count")
        plans.append(plan)
    return plans


def run_matrix(out: Output, session, loaded, prompts, *, as_json: bool, dry_run: bool) -> int:
    from krea2kit.recipe.matrix import expand

    axes, cells = expand(loaded)
    plans = plan_cells(session, loaded, axes, cells, prompts)
    total = sum(len(p.jobs) for p in plans)
    if dry_run:
        from krea2kit.cli.run_cmd import _job_json

        for cell, plan in zip(cells, plans):
            for job in plan.jobs:
                if as_json:
                    out.data(json.dumps({**_job_json(job, plan), "matrix": cell.values}))
                else:
                    out.data(f"{job.index}\t{job.seed}\t{job.width}x{job.height}\t{escape_line(cell.label())}\t"
                             f"{escape_line(job.prompt)}")
        out.info(f"dry run: {total} image(s) in a {len(cells)}-cell matrix ({' x '.join(a.key for a in axes)}); "
                 "nothing loaded")
        return EXIT_OK

    from krea2kit.cli.run_cmd import execute_collect

    ncols = len(axes[-1].values)
    per_cell = len(plans[0].jobs)
    where: dict[int, tuple[int, int]] = {}  # job index -> (row, column) on the sheet
    for cell, plan in zip(cells, plans):
        for j, job in enumerate(plan.jobs):
            where[job.index] = ((cell.index // ncols) * per_cell + j, cell.index % ncols)
    rows = (len(cells) // ncols) * per_cell
    grid: list[list[Any]] = [[None] * ncols for _ in range(rows)]
    import time

    from krea2kit.cli.run_cmd import _summary

    records = []
    started = time.perf_counter()
    for plan in plans:  # one progress count and one summary for the whole matrix
        records += execute_collect(out, session, plan, as_json=as_json, total=total, summary=False)
    _summary(out, records, time.perf_counter() - started)
    blocked = any(r.status == "blocked" for r in records)  # not "dropped" ([diversity] keep)
    base = plans[0]
    if base.recipe.output.sheet and not all(r.status != "ok" for r in records):
        target = _sheet(session, base, axes, cells, records, grid, where, per_cell)
        out.data(json.dumps({"contact_sheet": str(target), "matrix": {a.key: a.values for a in axes}}) if as_json
                 else escape_line(str(target)))
        out.info(f"contact sheet: {target}")
    return EXIT_BLOCKED if blocked else EXIT_OK


def _sheet(session, base, axes, cells, records, grid, where, per_cell) -> Path:
    from PIL import Image

    from krea2kit.cli.sweep import write_sheet
    from krea2kit.output.sheets import contact_sheet

    for rec in records:
        if rec.status == "ok":
            r, c = where[rec.index]
            with Image.open(rec.path) as im:
                grid[r][c] = im.convert("RGB")
    last = axes[-1]
    labels = [f"{last.short}={_fmt(v)}" for v in last.values]
    ncols = len(last.values)
    row_labels = []
    for first in cells[::ncols]:  # the first cell of each row group carries its other values
        text = first.label(axes[:-1])
        for j in range(per_cell):
            row_labels.append(", ".join(t for t in (text, f"#{j + 1}" if per_cell > 1 else "") if t))
    sheet = contact_sheet(grid, labels, row_labels)
    target = Path(base.recipe.output.dir) / f"{base.name}-matrix.png"
    return write_sheet(session, base, sheet, target, {"matrix": {
        "axes": {a.key: a.values for a in axes}, "images": [r.path for r in records]}})


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
