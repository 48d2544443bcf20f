"""Hook specifications: the whole public plugin interface of krea2kit.

Every hook is registration-style: krea2kit calls it with a ``register`` callable and
the plugin calls ``register(descriptor)`` once per part it provides. Descriptors are
light (a name, a summary, an options schema and a lazy ``load``), so listing plugins
never imports torch. Built-in parts are registered through these same hooks
(``krea2kit.builtins``).

A plugin implements any subset of these hooks::

    from krea2kit.hookspecs import hookimpl
    from krea2kit.registry import SamplerDescriptor

    @hookimpl
    def register_samplers(register):
        register(SamplerDescriptor(name="midpoint", summary="...", load=_load))

Hook implementations may accept fewer arguments than the spec (pluggy prunes them),
so new keyword arguments can be added here without breaking old plugins.

What each registered part's ``load`` is called with and must return is the plugin
contract in :mod:`krea2kit.contracts`: every kind is loaded as ``load(options, context)``.
Its version (``CONTRACT_VERSION``, shown by ``krea2kit plugins --json``) covers these hooks
too; a plugin states the version it was written for as ``KREA2KIT_CONTRACT = 2``.
"""

from __future__ import annotations

import pluggy

PROJECT = "krea2kit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_models(register):
    """Register model presets (``ModelDescriptor``): a named family member that names its
    transformer, text encoder and VAE parts, its default weights and sampling defaults."""


@hookspec
def register_dits(register):
    """Register diffusion transformer backbones (``DiTDescriptor``)."""


@hookspec
def register_vaes(register):
    """Register autoencoders (``VAEDescriptor``) with the latent contract they produce."""


@hookspec
def register_text_encoders(register):
    """Register text encoders (``TextEncoderDescriptor``)."""


@hookspec
def register_samplers(register):
    """Register samplers (``SamplerDescriptor``): plain functions
    ``sampler(denoise, x, sigmas, *, generator=None, callback=None, **options)``."""


@hookspec
def register_lora_formats(register):
    """Register LoRA file layouts (``LoraFormatDescriptor``): detect and parse a file into
    krea2kit's internal per-module form."""


@hookspec
def register_sliders(register):
    """Register slider kinds (``SliderDescriptor``): map a slider value to adapter strengths."""


@hookspec
def register_filters(register):
    """Register content filters (``FilterDescriptor``) for prompts or images. Every
    registered filter runs on every run; any block wins; a failing filter blocks.
    ``mandatory`` ones can be switched off only by the deployer (``safety.unfiltered``)."""


@hookspec
def register_writers(register):
    """Register output writers (``WriterDescriptor``), selected by ``output.format``."""


@hookspec
def register_prompt_expanders(register):
    """Register prompt expander backends (``PromptExpanderDescriptor``), selected by a recipe's
    ``[expander] backend``: a language model that rewrites a short prompt into a fuller one."""


@hookspec
def register_embedders(register):
    """Register image embedders (``EmbedderDescriptor``), selected by a recipe's ``[diversity]
    embedder``: images to L2-normalised vectors for diversity scores and selection."""


@hookspec
def register_runners(register):
    """Register job runners (``RunnerDescriptor``): where a batch job's items render
    (``krea2kit run JOB --on NAME``). krea2kit's own is ``local``; a runner only decides
    where each item runs, never its seed, pixels or file name."""


@hookspec
def register_commands(cli):
    """Add click commands or groups to the ``krea2kit`` command line: ``cli.add_command(...)``."""


@hookspec
def register_options(register):
    """Declare the schema of this plugin's ``[plugins.<name>]`` recipe table
    (``OptionsDescriptor``). The table is validated against it before anything loads,
    and the validated options reach the plugin's parts through ``load(options)``."""
