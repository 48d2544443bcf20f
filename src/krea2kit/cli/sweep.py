"""``krea2kit run --sweep NAME=A:B:N``: the same seeds across N slider values, plus a
labelled contact sheet (a PNG grid: one row per image of the recipe, one column per value)."""

from __future__ import annotations

import json
from pathlib import Path

from krea2kit.cli.console import Output, escape_line
from krea2kit.errors import EXIT_BLOCKED, EXIT_OK, UsageError
from krea2kit.output.sheets import contact_sheet



def _slider_index(plan, name: str) -> int:
    names = [s.name for s in plan.recipe.sliders]
    if name not in names:
        from krea2kit.validation import did_you_mean

        raise UsageError(f"--sweep names slider {name!r}, which the recipe does not define" + did_you_mean(name, names),
                         key="--sweep", hint=f"recipe sliders: {', '.join(names) or 'none'}")
    return names.index(name)


def write_sheet(session, base, sheet, target: Path, extra: dict):
    """Write a contact sheet atomically with the run's recipe and ``extra`` in its metadata,
    under the recipe's overwrite rule (the next free -2, -3 ... otherwise); returns the path."""
    from krea2kit.output.metadata import ImageMetadata, build_record
    from krea2kit.output.writers import write_image
    from krea2kit.recipe.trust import portable_recipe

    portable = portable_recipe(base.resolved(), local_paths=session.settings.metadata.local_paths)
    meta = ImageMetadata(parameters=None, krea2kit=build_record(recipe=portable, extra=extra))
    overwrite = base.recipe.output.overwrite
    return write_image(sheet, target, format="png", metadata=meta, overwrite=overwrite, numbered=not overwrite)


class _Columns:
    """The recipe loaded once, as ``run`` loads it (an image's ignored keys reported on
    stderr, stdin read once), and planned again for each slider value."""

    def __init__(self, out: Output, session, recipe, overrides, prompts) -> None:
        from krea2kit.cli.run_cmd import load_and_report

        self.session, self.prompts = session, prompts or None
        self.loaded = load_and_report(out, recipe, overrides)

    def plan(self, index: int | None = None, value: float | None = None):
        import copy

        from krea2kit.recipe.loader import apply_overrides

        loaded = copy.deepcopy(self.loaded)  # planning fills in defaults: each column starts afresh
        if index is not None:
            apply_overrides(loaded, [f"sliders.{index}.value={value!r}"])
        return self.session.plan(loaded, prompts=self.prompts)


def run_sweep(out: Output, session, recipe, overrides, prompts, sweeps, *, as_json: bool,
              dry_run: bool = False) -> int:
    if len(sweeps) != 1:
        raise UsageError("one --sweep at a time", key="--sweep")
    name, values = sweeps[0]
    columns = _Columns(out, session, recipe, overrides, prompts)
    base = columns.plan()
    index = _slider_index(base, name)
    if dry_run:
        return _dry_run(out, columns, name, index, values, as_json=as_json)

    from PIL import Image

    from krea2kit.cli.run_cmd import execute_collect

    grid: list[list] = [[None] * len(values) for _ in base.jobs]
    records_all = []
    blocked = False
    for c, value in enumerate(values):
        plan = columns.plan(index, value)
        records = execute_collect(out, session, plan, as_json=as_json)
        for rec in records:
            records_all.append(rec)
            if rec.status == "ok":
                with Image.open(rec.path) as im:
                    grid[rec.index][c] = im.convert("RGB")
            else:
                blocked = True
    labels = [f"{name}={v:g}" for v in values]
    sheet = contact_sheet(grid, labels)
    target = Path(base.recipe.output.dir) / f"{base.name}-sweep-{name}.png"
    target = write_sheet(session, base, sheet, target, {"sweep": {"slider": name, "values": values,
                                                                  "images": [r.path for r in records_all]}})
    out.data(json.dumps({"contact_sheet": str(target), "slider": name, "values": values}) if as_json
             else escape_line(str(target)))
    out.info(f"contact sheet: {target}")
    return EXIT_BLOCKED if blocked else EXIT_OK


def _dry_run(out: Output, columns: _Columns, name, index, values, *, as_json: bool) -> int:
    """Plan every column of the sweep (so each slider value is validated) and list the
    images; load no part and write nothing."""
    from krea2kit.cli.run_cmd import print_dry_run

    total = 0
    for value in values:
        plan = columns.plan(index, value)
        print_dry_run(out, plan, as_json=as_json, extra={"slider": name, "value": value})
        total += len(plan.jobs)
    out.info(f"dry run: {total} image(s) in a {len(values)}-column sweep of {name!r}; nothing loaded")
    return EXIT_OK
