"""krea2kit's own parts, registered through the same public hooks a third-party plugin
uses. Every ``load`` is a lazy ``"module:function"`` reference: nothing here imports
torch, so listing plugins and ``--help`` stay fast."""

from __future__ import annotations

from krea2kit.contracts import CONTRACT_VERSION
from krea2kit.hookspecs import hookimpl
from krea2kit.models.contract import LatentContract
from krea2kit.registry import (
    DiTDescriptor,
    FilterDescriptor,
    LoraFormatDescriptor,
    ModelDescriptor,
    SamplerDescriptor,
    SliderDescriptor,
    TextEncoderDescriptor,
    VAEDescriptor,
    WriterDescriptor,
)
from krea2kit.registry import PromptExpanderDescriptor

KREA2KIT_CONTRACT = CONTRACT_VERSION  # built-ins always follow the current plugin contract

# Official defaults (krea-ai/krea-2 README and sampling.py): Turbo 8 steps, g = 0,
# fixed mu 1.15; Raw 52 steps, g = 3.5, resolution-aware mu. The official inference
# script reads the transformer file from $OSS_TURBO / $OSS_RAW; so do we.
KREA2_PRESETS = (
    ModelDescriptor(
        name="krea2-turbo", summary="Krea 2 Turbo (12.8B, distilled): 8 steps, guidance 0, mu 1.15",
        dit_config="krea2-turbo", vae_config="qwen-image",
        steps=8, guidance=0.0, mu=1.15, width=1024, height=1024,
        weights_env={"dit": "OSS_TURBO"}, hf_repos=("krea/Krea-2-Turbo",),
    ),
    ModelDescriptor(
        name="krea2-raw", summary="Krea 2 Raw (12.8B, undistilled): 52 steps, guidance 3.5, resolution-aware mu",
        dit_config="krea2-raw", vae_config="qwen-image",
        steps=52, guidance=3.5, mu=None, width=1024, height=1024,
        weights_env={"dit": "OSS_RAW"}, hf_repos=("krea/Krea-2-Raw",),
    ),
)

# The embedded nano family: tiny members of the Krea 2 architecture whose weights ship
# inside this package, so a fresh machine can run the whole pipeline offline.
NANO_PRESETS = (
    ModelDescriptor(
        name="krea2-nano-turbo", summary="krea2kit's embedded nano model (Turbo-style: 8 steps, guidance 0)",
        dit_config="", vae_config="",
        steps=8, guidance=0.0, mu=1.15, width=128, height=128, release_text_encoder=False, layout="compact",
        weights={"dit": "krea2kit:nano/weights/turbo", "text_encoder": "krea2kit:nano/weights/text_encoder",
                 "vae": "krea2kit:nano/weights/vae"},
    ),
    ModelDescriptor(
        name="krea2-nano-raw", summary="krea2kit's embedded nano model (Raw-style: guidance on, resolution-aware mu)",
        dit_config="", vae_config="",
        steps=24, guidance=3.5, mu=None, width=128, height=128, release_text_encoder=False, layout="compact",
        weights={"dit": "krea2kit:nano/weights/raw", "text_encoder": "krea2kit:nano/weights/text_encoder",
                 "vae": "krea2kit:nano/weights/vae"},
    ),
)


@hookimpl
def register_models(register):
    for preset in KREA2_PRESETS + NANO_PRESETS:
        register(preset)


@hookimpl
def register_dits(register):
    register(DiTDescriptor(
        name="krea2", summary="Krea 2 single-stream DiT (native, diffusers and ComfyUI weight layouts)",
        load="krea2kit.parts.dit:load",
    ))


@hookimpl
def register_text_encoders(register):
    register(TextEncoderDescriptor(
        name="qwen3-vl", summary="Qwen3-VL text tower tapped at 12 layers, Krea 2 chat template (native)",
        load="krea2kit.parts.text_encoder:load",
    ))


@hookimpl
def register_vaes(register):
    register(VAEDescriptor(
        name="qwen-image", summary="Qwen-Image VAE as a 2D network (f8, 16 channels); the Krea 2 latent space",
        load="krea2kit.parts.vae:load_qwen", contract=LatentContract(16, 8, 1, "mean-std"),
    ))
    register(VAEDescriptor(
        name="flux2", summary="FLUX.2 VAE (f8, 32 channels, 2x2 patchified batch-norm normalisation)",
        load="krea2kit.parts.vae:load_flux2", contract=LatentContract(32, 8, 2, "batchnorm-patchified"),
    ))


@hookimpl
def register_samplers(register):
    from krea2kit.sampler_options import BUILTIN_SAMPLERS

    for row in BUILTIN_SAMPLERS:
        register(SamplerDescriptor(name=row.name, summary=row.summary, load="krea2kit.sampling:load",
                                   options=row.options, stochastic=row.stochastic))


@hookimpl
def register_writers(register):
    for fmt, ext in (("png", ".png"), ("jpeg", ".jpg"), ("webp", ".webp")):
        register(WriterDescriptor(name=fmt, summary=f"{fmt.upper()} with provenance metadata, written atomically",
                                  load=f"krea2kit.parts.writers:{fmt}", extension=ext))


@hookimpl
def register_filters(register):
    register(FilterDescriptor(
        name="prompt-rules", summary="Built-in prompt filter: evasion-normalised category rules",
        load="krea2kit.parts.filters:prompt_rules", target="prompt", mandatory=True,
        options="krea2kit.parts.filters:PromptRulesOptions"))
    register(FilterDescriptor(
        name="nsfw-image", summary="Built-in image filter: OpenNSFW classifier shipped in a PyPI wheel (offline)",
        load="krea2kit.parts.filters:nsfw_image", target="image", mandatory=True,
        options="krea2kit.parts.filters:NsfwImageOptions"))


@hookimpl
def register_lora_formats(register):
    # One module per key layout; LyCORIS LoKr/LoHa, DoRA and full deltas read under each.
    # Asked after every plugin's formats (krea2kit.parts.lora_formats.open_lora).
    for module, summary in (
        ("diffusers", "diffusers / PEFT names (official Krea style LoRAs, the diffusers trainer)"),
        ("native", "native module names (ComfyUI, ai-toolkit, PEFT on the native model)"),
        ("krea_training", "krea-2 trainer output (bare .lora_A/.lora_B, metadata rank, lora_alpha, lora_scale)"),
        ("kohya", "kohya / musubi-tuner lora_unet_ names with alpha"),
        ("lycoris", "SimpleTuner LyCORIS names (lycoris_<diffusers name>), fused q/k/v split"),
    ):
        register(LoraFormatDescriptor(name=module.replace("_", "-"), summary=summary,
                                      load=f"krea2kit.lora.formats.{module}:load"))


@hookimpl
def register_sliders(register):
    register(SliderDescriptor(
        name="lora", summary="Drive [[loras]] strengths with one value (concept sliders, style dials)",
        load="krea2kit.parts.sliders:load", options="krea2kit.lora.sliders:LoraSliderOptions",
        check_options={"lora": "detail", "range": [-2.0, 2.0]}))


@hookimpl
def register_prompt_expanders(register):
    # Where each talks to (endpoint, key, weights folder) comes from the user config or the
    # environment (krea2kit.expander.config), never from a recipe.
    register(PromptExpanderDescriptor(
        name="openai", summary="Any OpenAI-compatible chat endpoint (llama.cpp server, Ollama, vLLM, LM Studio)",
        load="krea2kit.expander.openai_chat:load", needs="endpoint"))
    register(PromptExpanderDescriptor(
        name="transformers", summary="Local generation with the Qwen3-VL-4B text encoder's own weights "
                                     "(extra: krea2kit[expander])",
        load="krea2kit.expander.local_transformers:load", needs="weights"))


@hookimpl
def register_embedders(register):
    from krea2kit.registry import EmbedderDescriptor

    # Weight-free and offline, so diversity scores work on a fresh install; learned embedders
    # (CLIP, DINOv2) come from the plugins/krea2kit-embeddings distribution.
    register(EmbedderDescriptor(
        name="lab-hog", summary="Weight-free: Lab colour layout + edge-orientation histograms, fixed random "
                                "projection (offline, deterministic)",
        load="krea2kit.parts.embedders:load"))


@hookimpl
def register_runners(register):
    from krea2kit.registry import RunnerDescriptor

    # Scale-out runners (Ray: plugins/krea2kit-ray) register through this same hook.
    register(RunnerDescriptor(name="local", summary="Render a job's images in this process, in item order",
                              load="krea2kit.jobs.runner:load_local"))


@hookimpl
def register_commands(cli):
    from krea2kit.cli.lora_cmd import lora_group
    from krea2kit.cli.vae_cmd import vae

    cli.add_command(vae)
    cli.add_command(lora_group)
