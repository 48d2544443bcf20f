"""krea2kit-example: a writer that saves each image as PNG plus a caption sidecar.

Generated images with ``.txt`` captions next to them are what LoRA trainers
(musubi-tuner, ai-toolkit, kohya) read as a dataset, so this turns a recipe into a
dataset generator. It is also the template plugin authors copy: hooks in one module,
nothing heavy imported at import time, options declared with pydantic.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from krea2kit.hookspecs import hookimpl
from krea2kit.registry import OptionsDescriptor, WriterDescriptor

PLUGIN = "krea2kit-example"


class ExampleOptions(BaseModel):
    """The ``[plugins.krea2kit-example]`` table of a recipe."""

    model_config = ConfigDict(extra="forbid")

    caption_extension: str = Field(".txt", pattern=r"^\.[A-Za-z0-9]+$", description="Sidecar file extension")
    prefix: str = Field("", description="Text put before every caption, e.g. a trigger word")


class CaptionWriter:
    """PNG (through krea2kit's own PNG writer, metadata included) + a caption file."""

    extension = ".png"

    def __init__(self, options: ExampleOptions | None = None) -> None:
        self.options = options or ExampleOptions()
        from krea2kit.plugins import get_host

        # Reuse the built-in writer instead of re-implementing metadata and atomic writes.
        self.png = get_host().registry.get("writer", "krea2kit:png").load_part()

    def write(self, image, path: Path, info) -> Path:
        written = self.png.write(image, path, info)
        caption = self.options.prefix + (info.prompt or "")
        sidecar = Path(written).with_suffix(self.options.caption_extension)
        tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
        tmp.write_text(caption + "\n", encoding="utf-8")
        os.replace(tmp, sidecar)  # atomic: a reader never sees half a caption
        return written


def load_writer(options: ExampleOptions | None = None) -> CaptionWriter:
    return CaptionWriter(options)


@hookimpl
def register_writers(register):
    register(WriterDescriptor(
        name="png-caption", summary="PNG plus a .txt caption sidecar (a LoRA training dataset)",
        load=load_writer, extension=".png",
    ))


@hookimpl
def register_options(register):
    register(OptionsDescriptor(name=PLUGIN, summary="Caption sidecar settings", options=ExampleOptions))
