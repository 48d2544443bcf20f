"""krea2kit-example: a writer that saves each image as PNG plus a caption sidecar.

Generated images with ``.txt`` captions next to them are what LoRA trainers
(musubi-tuner, ai-toolkit, kohya) read as a dataset, so this turns a recipe into a
dataset generator. It is also the template plugin authors copy: hooks in one module,
nothing heavy imported at import time, options declared with pydantic, every ``load``
called as ``load(options, context)`` (krea2kit plugin contract 2, ``krea2kit.contracts``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from krea2kit.contracts import LoadContext, OutputInfo
from krea2kit.hookspecs import hookimpl
from krea2kit.files import atomic_write
from krea2kit.registry import OptionsDescriptor, WriterDescriptor

PLUGIN = "krea2kit-example"
KREA2KIT_CONTRACT = 2  # the krea2kit plugin contract this plugin is written for


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
        self.png = get_host().registry.get("writer", "krea2kit:png").load_part(None, LoadContext(role="writer"))

    def write(self, image, path: Path, info: OutputInfo) -> Path:
        written = self.png.write(image, path, info)
        caption = self.options.prefix + (info.prompt or "")
        sidecar = Path(written).with_suffix(self.options.caption_extension)
        # krea2kit's shared helper: atomic (a reader never sees half a caption), and its hidden
        # temporary file is removed on errors, Ctrl-C and SIGTERM. The caption belongs to the
        # image whose name was just claimed, so it replaces a stale sidecar of that name.
        atomic_write(sidecar, lambda fp: fp.write((caption + "\n").encode("utf-8")), overwrite=True)
        return written


def load_writer(options: None, context: LoadContext) -> CaptionWriter:
    """``load(options, context)``: a writer has no options of its own; this plugin's
    ``[plugins.krea2kit-example]`` table arrives as ``context.plugin_options``."""
    return CaptionWriter(context.plugin_options)


@hookimpl
def register_writers(register):
    register(WriterDescriptor(
        name="png-caption", summary="PNG plus a .txt caption sidecar (a LoRA training dataset)",
        load=load_writer, extension=".png",
    ))


@hookimpl
def register_options(register):
    register(OptionsDescriptor(name=PLUGIN, summary="Caption sidecar settings", options=ExampleOptions))
