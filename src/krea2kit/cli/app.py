"""The click command tree. Commands stay thin: parse, call the API, present."""

from __future__ import annotations

import json

import click

from krea2kit import __version__
from krea2kit.cli.console import Output, set_current
from krea2kit.errors import EXIT_BLOCKED, EXIT_OK, UsageError

EXIT_CODES_HELP = """\b
Exit codes:
  0    every image was written
  1    runtime error
  2    usage or recipe error (found before any weights load)
  3    at least one prompt or image was blocked by a content filter
  4    weights missing, corrupt or not the expected model
  5    the prompt expander's model gave no usable answer
  130  interrupted (Ctrl-C); finished images are kept, no partial file
  141  stdout was closed by its reader (e.g. | head -1); the run stopped at once
  143  terminated (SIGTERM); handled like Ctrl-C"""

verbosity = [
    click.option("-q", "--quiet", count=True, help="No progress or summary (-qq: errors only)."),
    click.option("-v", "--verbose", count=True, help="More detail on stderr; tracebacks for internal errors."),
]


def with_verbosity(fn):
    for opt in reversed(verbosity):
        fn = opt(fn)
    return fn


def make_output(ctx: click.Context, quiet: int = 0, verbose: int = 0) -> Output:
    parent: Output = ctx.find_object(Output) or Output()
    out = Output(quiet=max(parent.quiet, quiet), verbose=max(parent.verbose, verbose), color=parent.color)
    set_current(out)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="krea2kit")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Colour on stderr (NO_COLOR is honoured).")
@with_verbosity
@click.pass_context
def cli(ctx: click.Context, color: str, quiet: int, verbose: int) -> None:
    """krea2kit: generate images with the Krea 2 model family from TOML recipes.

    An independent project, not affiliated with or endorsed by Krea.
    Results (paths, JSON lines) go to stdout; progress and messages to stderr.
    """
    ctx.obj = Output(quiet=quiet, verbose=verbose, color=color)
    set_current(ctx.obj)
    from krea2kit.plugins import get_host

    host = get_host()
    if host.problems and quiet < 2:
        for line in host.problems:
            ctx.obj.warn(line)
        host.problems.clear()


# --------------------------------------------------------------------------- run
STDIN_PROMPTS_HELP = """\b
--prompt - reads prompts from stdin (UTF-8), one rule per line:
  blank line             skipped
  {"prompt": ..., ...}   a line starting with '{' is a JSON record with prompt (or text)
                         and optionally negative, seed, count, width, height, name,
                         checked like a [[prompts]] entry; anything else in it is an error
  any other line         one prompt, exactly as written ('#' starts no comment)
A prompt that itself starts with '{' is given as a record: {"prompt": "{...}"}.
--prompts FILE|- runs a batch job instead (README "Batch jobs"): the same JSON records
(plus steps, guidance), kohya-style --n/--w/--h/--d/--l/--s lines, and '#' lines are
comments there; finished images are skipped on a re-run (the manifest in output.dir)."""


def _read_stdin_prompts() -> list:
    """Prompts (strings and [[prompts]]-shaped records) from stdin; see STDIN_PROMPTS_HELP."""
    from krea2kit.recipe.loader import parse_prompt_lines, read_stdin_text

    prompts = parse_prompt_lines(read_stdin_text("prompts for --prompt -"))
    if not prompts:
        raise UsageError("--prompt - was given but stdin holds no prompt", key="--prompt")
    return prompts


@cli.command(epilog=STDIN_PROMPTS_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("recipe", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, typed like TOML: --set sampler.steps=4 (repeatable).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Replace the recipe's prompts (repeatable); '-' reads them from stdin, one per line "
                   "(JSON records allowed; rule below).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image on stdout instead of its path.")
@click.option("--dry-run", is_flag=True, help="Validate and list the images that would be made; load nothing.")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=A:B:N",
              help="Render the same seed across N values of slider NAME from A to B, plus a contact sheet.")
@click.option("--prompts", "job_prompts", metavar="FILE|-",
              help="Run a batch job: one image per line of FILE ('-' = stdin; text, JSON lines or kohya-style "
                   "--n/--w/--h/--d/--l/--s lines; '#' lines are comments), resumable via a manifest.")
@click.option("--on", "runner", metavar="RUNNER",
              help="Where a batch job renders: local (default) or a runner plugin's, e.g. ray.")
@click.option("--address", metavar="ADDRESS", help="The runner's cluster address (--on ray: the Ray address).")
@click.option("--runner-opt", "runner_opts", multiple=True, metavar="KEY=VALUE",
              help="A runner option, typed like TOML (repeatable), e.g. --runner-opt workers=2.")
@click.option("--keep-diverse", "keep_diverse", type=click.IntRange(min=1), metavar="K",
              help="Render every image, write only the K most diverse of each prompt's (the same as "
                   "--set diversity.keep=K; scores in --json and the metadata).")
@click.option("--no-expander-cache", "no_expander_cache", is_flag=True,
              help="[expander]: ask the model again instead of using a cached or recorded expansion (the "
                   "same as --set expander.cache=\"refresh\"); the new answer is cached.")
@with_verbosity
@click.pass_context
def run(ctx, recipe, overrides, prompts, as_json, dry_run, sweeps, quiet, verbose, keep_diverse=None,
        job_prompts=None, runner=None, address=None, runner_opts=(), no_expander_cache=False):
    """Generate the images a RECIPE describes.

    RECIPE is a TOML file, '-' for stdin, or an image krea2kit wrote: its embedded
    recipe is re-run as untrusted input, taking prompts, seeds, sizes, model and sampler
    settings, sliders and LoRA names from it; output folder, file names, overwrite, file
    paths (give LoRA files with --set loras.N.path=FILE) and safety settings stay yours,
    and every key it ignores is listed on stderr. Without RECIPE, the default model's
    defaults are used (give --prompt).

    Plain results on stdout are one line per image; control characters and line breaks
    in a path or prompt are shown as backslash escapes (--json gives exact values).
    """
    from krea2kit.cli.run_cmd import run_command

    out = make_output(ctx, quiet, verbose)
    if no_expander_cache:  # [expander] cache = "refresh" (krea2kit.expander.jobs), after the user's own --set
        overrides = (*overrides, 'expander.cache="refresh"')
    if keep_diverse is not None:  # [diversity] keep (krea2kit.diversity), after the user's own --set
        overrides = (*overrides, f"diversity.keep={keep_diverse}")
    if job_prompts == "-" and (recipe == "-" or "-" in prompts):
        raise UsageError("stdin can hold only one of the recipe, --prompt - and --prompts -", key="--prompts")
    if "-" in prompts:
        if recipe == "-":
            raise UsageError("stdin cannot hold both the recipe and the prompts", key="--prompt")
        prompts = tuple(p for p in prompts if p != "-") + tuple(_read_stdin_prompts())
    code = run_command(out, recipe, list(overrides), list(prompts), as_json=as_json, dry_run=dry_run,
                       sweeps=list(sweeps), job_prompts=job_prompts, runner=runner, runner_opts=tuple(runner_opts),
                       address=address)
    ctx.exit(code)


# --------------------------------------------------------------------------- plugins
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the listing (or the --check report) as JSON.")
@click.option("--check", is_flag=True,
              help="Load every registered part with a tiny input and check it against its protocol "
                   "(imports torch; exit 1 when a part fails).")
@click.pass_context
def plugins(ctx, as_json, check):
    """List loaded plugins, their distribution, version and what each registers.

    The plugin contract version (krea2kit.contracts) is shown first; a plugin may state the
    one it needs with KREA2KIT_CONTRACT in its module.
    """
    from krea2kit.plugins import contract_json, get_host

    out: Output = ctx.obj
    host = get_host()
    if check:
        ctx.exit(_check_plugins(out, host, as_json))
    infos = [info.to_json() for info in host.plugins.values()]
    contract = contract_json()
    if as_json:
        out.data(json.dumps({"contract": contract, "plugins": infos}, indent=2))
        return
    out.info(f"plugin contract {contract['version']} (plugins stating {contract['oldest_supported']} to "
             f"{contract['version']} load; reference: {contract['reference']})")
    for info in infos:
        origin = "built-in" if info["builtin"] else f"{info['distribution']} {info['version']}".strip()
        needs = f", contract {info['contract']}" if info["contract"] is not None else ""
        out.data(f"{info['name']} ({origin}{needs})")
        for kind, names in info["registers"].items():
            out.data(f"  {kind}: {', '.join(names)}")
        if info["commands"]:
            out.data(f"  commands: {', '.join(info['commands'])}")


def _check_plugins(out: Output, host, as_json: bool) -> int:
    """``plugins --check``: one line (or JSON object) per part on stdout; 1 when any fails."""
    from krea2kit.errors import EXIT_RUNTIME
    from krea2kit.plugins import contract_json
    from krea2kit.settings import get_settings
    from krea2kit.testing import FAIL, check_registry

    results = check_registry(host.registry, settings=get_settings())
    failed = [r for r in results if r.status == FAIL]
    if as_json:
        out.data(json.dumps({"contract": contract_json(), "ok": not failed,
                             "parts": [r.to_json() for r in results]}, indent=2))
    else:
        for r in results:
            out.data(r.line())
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skip", "fail")}
    summary = f"{counts['ok']} ok, {counts['skip']} skipped, {counts['fail']} failed"
    if failed:
        out.error(f"plugin check: {summary}: " + "; ".join(f"{r.kind} {r.plugin}:{r.name}" for r in failed))
        return EXIT_RUNTIME
    out.info(f"plugin check: {summary}")
    return EXIT_OK


# --------------------------------------------------------------------------- recipe
@cli.group()
def recipe():
    """Check, show and describe recipes."""


@recipe.command("check")
@click.argument("file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value before checking.")
@click.pass_context
def recipe_check(ctx, file, overrides):
    """Validate FILE ('-' = stdin) against the schema and the installed plugins."""
    from krea2kit.api import Session
    from krea2kit.cli.run_cmd import load_and_report

    out: Output = ctx.obj
    from krea2kit.cli.train_cmd import check_training_recipe  # schema = "krea2kit.train/1" (krea2kit train)

    if check_training_recipe(out, file, list(overrides)):
        return
    session, loaded = Session(), load_and_report(out, file, list(overrides))
    from krea2kit.jobs import build_job, job_source

    source, base = job_source(loaded, None)
    if source is not None:  # a [job] recipe (krea2kit.jobs): its prompt file is checked line by line too
        job = build_job(session, loaded, source, base=base)
        out.info(f"ok: {loaded.path}: a job of {job.spec.size} image(s) from {source} with {job.plans[0].model.name}")
        return
    plan = session.plan(loaded)
    if plan.recipe.diversity is not None:  # the [diversity] embedder and its options (krea2kit.diversity)
        from krea2kit.diversity import resolve_embedder

        resolve_embedder(plan, session.host.registry)
    out.info(f"ok: {plan.loaded.path}: {len(plan.jobs)} image(s) with {plan.model.name}, "
             f"{plan.recipe.sampler.name} {plan.steps} steps")


@recipe.command("show")
@click.argument("file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@click.pass_context
def recipe_show(ctx, file, overrides, as_json):
    """Print the fully resolved recipe (defaults and overrides applied) of FILE or an image."""
    from krea2kit.api import Session
    from krea2kit.cli.run_cmd import load_and_report
    from krea2kit.errors import RecipeError

    out: Output = ctx.obj
    loaded = load_and_report(out, file, list(overrides))
    try:
        data = Session().plan(loaded).resolved()
    except RecipeError as exc:
        # An image made with a LoRA or reference picture names its file, which the local user
        # gives to run it; to read the recipe, the image's own record is enough.
        if not loaded.from_image or not (exc.key or "").startswith(("loras.", "references.")):
            raise
        out.warn(f"{exc.message}: showing the image's recipe as recorded, unresolved"
                 + (f" (to resolve it, {exc.hint})" if exc.hint else ""))
        data = loaded.data
    if as_json:
        out.data(json.dumps(data, indent=2))
    else:
        out.data(dump_toml(data).rstrip("\n"))


@recipe.command("schema")
@click.option("--train", "train_schema", is_flag=True, help="The training recipe's schema (krea2kit train).")
@click.pass_context
def recipe_schema(ctx, train_schema=False):
    """Print the recipe JSON Schema (for editor completion of TOML keys)."""
    if train_schema:
        from krea2kit.train.schema import json_schema
    else:
        from krea2kit.recipe.schema import json_schema
    ctx.obj.data(json.dumps(json_schema(), indent=2))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def dump_toml(data: dict) -> str:
    import tomli_w

    return tomli_w.dumps(_drop_none(data))


# --------------------------------------------------------------------------- config
@cli.command()
@click.option("--path", "path_only", is_flag=True, help="Print only the config file's path.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@click.pass_context
def config(ctx, path_only, as_json):
    """Show where the user config file is and what it holds (defaults filled in)."""
    from krea2kit.settings import ENV_CONFIG, config_path, load_settings

    out: Output = ctx.obj
    path = config_path()
    if path_only:
        out.data(str(path))
        return
    settings = load_settings(path)
    data = settings.model_dump(mode="json", exclude={"path"})
    if as_json:
        out.data(json.dumps({"path": str(path), "exists": path.is_file(), "settings": data}, indent=2))
        return
    from krea2kit.env_values import hide  # $KREA2KIT_CONFIG's value is not repeated on stderr

    out.info(hide(f"# {path} ({'exists' if path.is_file() else 'not created yet'}; ${ENV_CONFIG} overrides the location)"))
    out.data(dump_toml(data).rstrip("\n"))


# --------------------------------------------------------------------------- train
from krea2kit.cli.train_cmd import train  # noqa: E402  (torch-free: the trainer loads lazily)

cli.add_command(train)

__all__ = ["cli", "EXIT_OK", "EXIT_BLOCKED"]
