"""The ``lora`` command group: ``inspect`` and ``convert``.

Register with :func:`register_commands` (``cli.add_command(lora_group)``). Errors are raised as
:class:`~krea2kit.errors.Krea2kitError` subclasses; the main CLI prints them and maps exit codes.
"""

from __future__ import annotations

import json

import click

from krea2kit.errors import UsageError

_DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@click.group("lora")
def lora_group() -> None:
    """Inspect and convert LoRA files (every Krea 2 layout: diffusers, native, kohya, LyCORIS)."""


@lora_group.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="print a JSON object instead of text")
@click.option("--strict", is_flag=True, help="fail if some keys match no Krea 2 module")
def inspect_cmd(file: str, as_json: bool, strict: bool) -> None:
    """Show a LoRA's layout, modules, kinds, ranks, scales, base model and trigger words."""
    from krea2kit.parts.lora_formats import open_lora
    from krea2kit.plugins import get_host

    lora = open_lora(file, get_host().registry.all("lora_format"), strict=strict)
    info = lora.summary()
    from krea2kit.train.export import training_info

    training = training_info(lora.metadata)  # a LoRA `krea2kit train` wrote: how it was made
    if training is not None:
        info["training"] = training
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))  # one JSON line, as every --json
        return
    cov = ", ".join(f"{k} {v}" for k, v in sorted(info["coverage"].items()))
    lines = [
        f"file:        {info['path']}",
        f"layout:      {info['layout']}" + (f" (prefix {info['key_prefix']!r})" if info["key_prefix"] else ""),
        f"tensors:     {info['tensors']}",
        f"modules:     {info['modules']} ({cov})",
        f"kinds:       {', '.join(f'{k} x{v}' for k, v in info['kinds'].items())}" + ("  + DoRA" if info["dora"] else ""),
        f"ranks:       {', '.join(f'{k} x{v}' for k, v in info['ranks'].items()) or '-'}",
        f"scales:      {', '.join(f'{k} x{v}' for k, v in info['scales'].items())}",
        f"dtypes:      {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}",
        f"base model:  {info['base_model'] or 'not stated'} (reported only; LoRAs trained on Raw load onto Turbo)",
        f"triggers:    {', '.join(info['trigger_words']) or '-'}",
        f"unmatched:   {info['unmatched']}" + (f" ({', '.join(info['unmatched_keys'][:5])}"
                                                + (" ..." if info["unmatched"] > 5 else "") + ")" if info["unmatched"] else ""),
    ]
    lines += [f"note:        {n}" for n in info["notes"]]
    if training is not None:  # text from the file: control characters escaped, one line each
        from krea2kit.cli.console import escape_line

        lines.append("training:    (krea2kit train)")
        lines += [escape_line(f"  {k + ':':<18} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
                  for k, v in training.items() if k != "recipe"]
        if training.get("recipe"):
            lines.append("  recipe:")
            lines += [f"    {escape_line(line)}" for line in str(training["recipe"]).rstrip().splitlines()]
    click.echo("\n".join(lines))


@lora_group.command("convert")
@click.argument("file", type=click.Path(exists=True, dir_okay=True, path_type=str))
@click.option("--to", "layout", required=True, type=click.Choice(["diffusers", "native", "kohya"]),
              help="target layout: diffusers (transformer.*, PEFT LoRA or LoKr), native (diffusion_model.*, "
                   "ComfyUI/ai-toolkit) or kohya (lora_unet_*)")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--dtype", type=click.Choice(list(_DTYPES)), default="keep", show_default=True,
              help="tensor dtype of the written file")
@click.option("--strict", is_flag=True, help="fail if some keys match no Krea 2 module")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def convert_cmd(file: str, layout: str, out: str, dtype: str, strict: bool, overwrite: bool) -> None:
    """Rewrite FILE in another LoRA layout as OUT (the weight change is kept: exactly, or to
    one rounding where a scale is baked into bf16/fp16 weights).

    \b
    --to diffusers writes what diffusers' load_lora_adapter and PEFT load, with the
    alpha/rank scale baked into the weights: readers that ignore the file's metadata
    (ComfyUI, a bare state dict) apply it at the same strength as those that read it.
    LoKr becomes PEFT LoKr (lokr_w1, lokr_w2 or lokr_w2_a/_b; its LoKrConfig in the
    lora_adapter_metadata): Krea2Transformer2DModel.load_lora_adapter loads it, but
    Krea2Pipeline.load_lora_weights (diffusers 0.42) refuses LoKr keys, so call the
    transformer's method. LoHa, full diffs and DoRA need --to native or kohya.
    """
    from pathlib import Path

    import torch

    from krea2kit.lora.convert import write_lora
    from krea2kit.parts.lora_formats import open_lora
    from krea2kit.plugins import get_host

    if Path(out).exists() and not overwrite:
        raise UsageError(f"{out} exists", hint="pass --overwrite to replace it")
    if Path(out).resolve() == Path(file).resolve():
        raise UsageError("the output would overwrite the input file")
    lora = open_lora(file, get_host().registry.all("lora_format"), strict=strict)
    dt = getattr(torch, _DTYPES[dtype]) if _DTYPES[dtype] else None
    path = write_lora(lora, out, layout, dtype=dt, overwrite=overwrite)
    msg = f"wrote {path}: {len(lora)} modules, {lora.layout} -> {layout}"
    if lora.unmatched:
        msg += f" ({len(lora.unmatched)} unmatched keys left out)"
    click.echo(msg)


def register_commands(cli: click.Group) -> None:
    """Hook for the main CLI: adds the ``lora`` group."""
    cli.add_command(lora_group)
