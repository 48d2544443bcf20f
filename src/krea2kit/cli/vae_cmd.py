"""``krea2kit vae roundtrip``: encode, decode, save, print PSNR (checks weights and tiling)."""

from __future__ import annotations

import json

import click

from krea2kit.errors import UsageError


@click.group()
def vae():
    """Autoencoder tools."""


@vae.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--vae", "vae_name", default="qwen-image", show_default=True, help="Registered VAE name.")
@click.option("--weights", type=click.Path(), help="VAE weights (file or folder); default: the model's.")
@click.option("--model", "model_name", default=None, help="Take the VAE weights of this model preset.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Where to save the result (default: IMAGE-roundtrip.png).")
@click.option("--tile", default="auto", show_default=True, help="'auto', 'off' or a tile size in pixels.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the path and PSNR.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.pass_context
def roundtrip(ctx, image, vae_name, weights, model_name, out_path, tile, device, as_json, overwrite):
    """Encode IMAGE with a VAE, decode it again, save the result and print the PSNR."""
    from pathlib import Path

    from krea2kit.cli.console import Output
    from krea2kit.locate import locate_weights
    from krea2kit.pipeline import pick_device, pick_dtype
    from krea2kit.plugins import get_host
    from krea2kit.runtime.vae_tools import check_destination, roundtrip_image
    from krea2kit.settings import get_settings

    out: Output = ctx.find_object(Output) or Output()
    host = get_host()
    descriptor = host.registry.get("vae", vae_name, key="--vae")
    settings = get_settings()
    if weights is None:
        preset = None
        if model_name:
            preset = host.registry.get("model", model_name, key="--model")
        else:
            for candidate in host.registry.all("model"):
                if candidate.vae == descriptor.name:
                    preset = candidate if preset is None or candidate.name.startswith("krea2-nano") else preset
        if preset is None:
            raise UsageError(f"no model preset uses VAE {vae_name!r}; give --weights", key="--weights")
        weights, _ = locate_weights(preset, "vae", None, settings)
        config = preset.vae_config
    else:
        config = ""
    if tile not in {"auto", "off"} and not tile.isdigit():
        raise UsageError("--tile must be 'auto', 'off' or a number of pixels", key="--tile")
    src = Path(image)
    dest = Path(out_path) if out_path else src.with_name(f"{src.stem}-roundtrip.png")
    check_destination(src, dest, overwrite=overwrite)  # before any weights load
    dev = pick_device(device)
    from krea2kit.contracts import LoadContext

    part = descriptor.load_part(None, LoadContext(role="vae", name=descriptor.name, location=str(weights),
                                                  config=config, dtype=pick_dtype("float32", dev), device=dev,
                                                  settings=settings))
    result = roundtrip_image(part, src, dest, tile=None if tile == "off" else (tile if tile == "auto" else int(tile)),
                             overwrite=overwrite, weights=str(weights))
    dest = result["path"]
    for note in result["notes"]:
        out.warn(note)
    if as_json:
        out.data(json.dumps({"path": str(dest), "psnr": result["psnr"], "vae": descriptor.name,
                             "weights": str(weights), "size": result["size"]}))
    else:
        out.data(str(dest))
        out.info(f"PSNR {result['psnr']:.2f} dB ({descriptor.name}, {result['size'][0]}x{result['size'][1]})")
