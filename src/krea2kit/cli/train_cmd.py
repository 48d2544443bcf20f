"""``krea2kit train RECIPE.toml``: train a LoRA / LoKr (or a concept slider) on Raw.

stdout: the path of the written adapter (``--json``: one JSON object); stderr: the dataset
report, a Rich progress bar with loss, it/s and ETA at a terminal (plain lines at every
checkpoint otherwise), checkpoints and sample sheets as they are written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from krea2kit.cli.console import Output, escape_line
from krea2kit.errors import EXIT_OK

TRAIN_HELP_EPILOG = """\b
Examples:
  krea2kit train recipes/train-style-nano.toml
  krea2kit train style.toml --set optimizer.lr=3e-4 --steps 2000 --resume
  krea2kit train style.toml --dry-run --json        # validate, scan the data, print the memory plan
\b
Exit codes: 0 adapter written; 1 runtime error (a NaN/inf loss: the last good checkpoint is
kept); 2 recipe or usage error (before any weights load); 4 weights missing or corrupt;
130/143 interrupted (resume with --resume: at most checkpoint_every steps are redone)."""


class TrainProgress:
    """Training events -> stderr (Rich bar at a terminal, plain lines otherwise)."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.bar = None
        self.task = None
        self.total = 0
        self.window: list[float] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None

    def _log(self, message: str) -> None:
        if self.bar is not None:
            if not self.out.quiet:
                self.bar.console.print(message, markup=False)
        else:
            self.out.info(message)

    def _start_bar(self, start: int, total: int) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.out.err, transient=False, redirect_stdout=False, redirect_stderr=False)
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", rate="")

    def __call__(self, event: str, **data: Any) -> None:
        from krea2kit.env_values import hide

        out = self.out
        if event == "warning":
            if self.bar is not None and out.quiet < 2:
                self.bar.console.print(f"warning: {hide(data['message'])}", markup=False)
            else:
                out.warn(hide(data["message"]))
        elif event == "load":
            self._log(hide(f"loading {data['role']} {data['name']} from {data['location']} ({data['found_by']})"))
        elif event == "dataset":
            for line in data["lines"]:
                self._log(line)
        elif event == "cache_done":
            self._log(f"cache: {data['latents_encoded']} latent(s) and {data['texts_encoded']} caption(s) encoded, "
                      f"{data['latents_cached']} and {data['texts_cached']} from the cache")
        elif event == "resumed":
            self._log(f"resumed from {data['path']} (step {data['step']})")
        elif event == "train_start":
            self.total = data["total"]
            self._log(f"training {data['params']:,} parameters in {data['modules']} modules on {data['device']}, "
                      f"steps {data['start']} -> {data['total']}; checkpoints in {data['work_dir']}")
            if out.interactive:
                self._start_bar(data["start"], data["total"])
        elif event == "train_step":
            self.window.append(data["loss"])
            self.last = data
            rate = data.get("steps_per_s")
            if self.bar is not None:
                avg = sum(self.window[-20:]) / len(self.window[-20:])
                self.bar.update(self.task, completed=data["step"], loss=f"{avg:.4f}",
                                rate=f"{rate:.2f} it/s" if rate else "")
        elif event == "checkpoint":
            recent = self.window or [float("nan")]
            self.window = []
            last = getattr(self, "last", None) or {}
            eta = ""
            if last.get("steps_per_s"):
                eta = f", {last['steps_per_s']:.2f} steps/s, eta {last['eta_s']:.0f}s"
            self._log(f"step {data['step']}/{self.total}: loss {sum(recent) / len(recent):.4f} "
                      f"(mean of {len(recent)}){eta}; checkpoint {data['path']}")
        elif event == "samples":
            self._log(f"samples (step {data['step']}): {data['path']}")


def _result_json(result, recipe) -> dict[str, Any]:
    return {
        "path": str(result.path), "steps": result.steps, "start_step": result.start_step,
        "loss": result.last_loss, "seconds": round(result.seconds, 3),
        "steps_per_s": None if result.steps_per_s is None else round(result.steps_per_s, 4),
        "format": recipe.output.format, "adapter": recipe.adapter.kind, "rank": recipe.adapter.rank,
        "alpha": recipe.alpha, "mode": recipe.mode,
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "slider_recipe": None if result.slider_recipe is None else str(result.slider_recipe),
        "samples": [str(p) for p in result.samples],
    }


def _dry_run(out: Output, recipe, loaded, as_json: bool) -> int:
    """Validate, find the preset, scan the dataset; load no weights."""
    from krea2kit.plugins import get_host

    host = get_host()
    host.registry.get("model", recipe.base.preset, key="base.preset", file=loaded.file_of("base.preset"))
    from krea2kit.train.loop import turbo_base_warning

    note = turbo_base_warning(recipe.base.preset)
    if note:
        out.warn(note)
    info: dict[str, Any] = {"status": "planned", "recipe": loaded.path, "mode": recipe.mode,
                            "base": recipe.base.preset, "adapter": recipe.adapter.kind, "rank": recipe.adapter.rank,
                            "alpha": recipe.alpha, "targets": list(recipe.adapter.targets), "steps": recipe.steps}
    if recipe.dataset is not None:
        from krea2kit.train.dataset import dataset_hash, scan_dataset

        scan = scan_dataset(recipe.dataset, base_dir=Path.cwd(), recipe_file=loaded.path)
        for line in scan.report():
            out.info(line)
        info.update(images=len(scan.unique), per_epoch=len(scan.items), skipped=len(scan.skipped),
                    buckets={f"{w}x{h}": n for (w, h), n in scan.buckets().items()},
                    dataset_hash=dataset_hash(scan))
    plan = _memory_plan(recipe, loaded)
    if plan is not None:
        for line in plan.lines():
            out.info(line)
        info["memory"] = plan.to_json()
    if as_json:
        out.data(json.dumps(info))
    else:
        out.data("\t".join(str(info[k]) for k in ("mode", "base", "adapter", "rank", "steps")))
    return EXIT_OK


def _memory_plan(recipe, loaded):
    """The training memory plan (:func:`krea2kit.train.memory_plan.plan_for_recipe`): the same
    estimator ``krea2kit run`` checks memory with, plus the adapter, optimizer and activations.
    Targets that select no Linear of the preset's transformer are refused by it, before loading."""
    from krea2kit.train.memory_plan import plan_for_recipe

    return plan_for_recipe(recipe, file=loaded.file_of("adapter.targets"))


def train_command(out: Output, recipe_path: str, overrides: list[str], *, resume: bool, steps: int | None,
                  dry_run: bool, as_json: bool, fmt: str | None) -> int:
    from krea2kit.train.schema import load_training_recipe

    if fmt:
        overrides = [*overrides, f'output.format="{fmt}"']
    recipe, loaded = load_training_recipe(recipe_path, overrides)
    if steps is not None:
        recipe.steps = steps
    if dry_run:
        return _dry_run(out, recipe, loaded, as_json)
    from krea2kit.train.loop import Trainer

    started = time.perf_counter()
    with TrainProgress(out) as progress:
        trainer = Trainer(recipe, recipe_file=loaded.path, recipe_data=loaded.data, name=loaded.name,
                          events=progress)
        try:
            result = trainer.run(resume=resume, steps=steps)
        finally:
            trainer.close()
    if as_json:
        out.data(json.dumps(_result_json(result, recipe)))
    else:
        out.data(escape_line(str(result.path)))
    rate = f", {result.steps_per_s:.2f} steps/s" if result.steps_per_s else ""
    out.info(f"wrote {result.path} ({recipe.adapter.kind} rank {recipe.adapter.rank}, {result.steps} steps, "
             f"{time.perf_counter() - started:.1f}s{rate})")
    if result.slider_recipe is not None:
        name = trainer.name
        lo, hi = recipe.slider.range
        out.info(f"slider recipe {result.slider_recipe}: krea2kit run {result.slider_recipe} --sweep {name}={lo:g}:{hi:g}:5")
    return EXIT_OK


def check_training_recipe(out: Output, file: str, overrides: list[str]) -> bool:
    """``recipe check`` for a training recipe: True when ``file`` is one (and it is valid;
    an invalid one raises), False for anything else (a run recipe, stdin, an image)."""
    if file == "-" or Path(file).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        return False
    from krea2kit.recipe.loader import apply_overrides, load_recipe_source
    from krea2kit.train.schema import is_training_recipe, load_training_recipe

    try:
        peek = load_recipe_source(file)
        apply_overrides(peek, list(overrides))
    except Exception:
        return False  # the run recipe check reports it
    if not is_training_recipe(peek.data):
        return False
    recipe, loaded = load_training_recipe(file, overrides)
    from krea2kit.plugins import get_host

    get_host().registry.get("model", recipe.base.preset, key="base.preset", file=loaded.file_of("base.preset"))
    _memory_plan(recipe, loaded)  # adapter.targets must select something
    what = f"dataset {recipe.dataset.path or recipe.dataset.manifest}" if recipe.dataset is not None else \
        f"slider {recipe.slider.negative!r} .. {recipe.slider.positive!r}"
    out.info(f"ok: {loaded.path}: training recipe, {recipe.adapter.kind} rank {recipe.adapter.rank} on "
             f"{recipe.base.preset}, {recipe.steps} steps, {what}")
    return True


@click.command(epilog=TRAIN_HELP_EPILOG)
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, typed like TOML: --set optimizer.lr=3e-4 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the work folder.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Train to this many steps (replaces 'steps').")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "native", "kohya"]), default=None,
              help="Adapter file layout (default: the recipe's output.format, diffusers).")
@click.option("--dry-run", is_flag=True, help="Validate, scan the dataset and print the plan; load nothing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's). On a busy shared machine 1 can be many times faster.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the adapter's path.")
@click.option("-q", "--quiet", count=True, help="No progress or summary (-qq: errors only).")
@click.option("-v", "--verbose", count=True, help="More detail on stderr.")
@click.pass_context
def train(ctx, recipe, overrides, resume, steps, fmt, dry_run, threads, as_json, quiet, verbose):
    """Train a LoRA / LoKr adapter (or a concept slider) on a Raw model from a training RECIPE.

    The adapter is written in the official Krea LoRA layout (diffusers/PEFT) by default and
    runs on Turbo with [[loras]]. Checkpoints go to <output>.train/ every checkpoint_every
    steps; Ctrl-C and crashes resume with --resume, bit for bit on the CPU.
    """
    from krea2kit.cli.app import make_output

    out = make_output(ctx, quiet, verbose)
    if threads is not None and not dry_run:
        # Measured on a shared 2-core machine under load: 2 OpenMP threads spinning against other
        # processes made nano steps 27x slower than 1 thread (0.20 vs 5.6 steps/s). The thread
        # count changes float reduction order: a run resumes bit for bit with the same count.
        import torch

        torch.set_num_threads(threads)
    ctx.exit(train_command(out, recipe, list(overrides), resume=resume, steps=steps, dry_run=dry_run,
                           as_json=as_json, fmt=fmt))
