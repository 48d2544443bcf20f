"""The recipe schema, version 1 (``schema = "krea2kit.recipe/1"``).

Every table forbids unknown keys, and types are strict: ``seed = true``, ``width = "64"``
and ``steps = 8.0`` are errors, not quietly converted (an integer is accepted where a float
is expected); ``nan`` and ``inf`` are refused everywhere. Values left out (``None``) are
filled from the model preset when the recipe is resolved (``krea2kit recipe show`` prints
the result).
Sampler-specific settings sit in ``[sampler]`` beside the common ones and are checked
against the schema the chosen sampler declares; ``[plugins.<name>]`` tables are
checked against the schema that plugin declares.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import Strict as StrictType

from krea2kit.recipe import SCHEMA_ID

# Pixel sizes: at least one 16-pixel patch cell, at most what anyone renders on one GPU.
MIN_SIZE = 16
MAX_SIZE = 8192

# Seeds are kept in the signed 64-bit range: torch.Generator.manual_seed takes up to 2**64 - 1,
# but JSON consumers and the A1111 "Seed:" field commonly parse a signed int64.
MAX_SEED = 2**63 - 1

Size = Annotated[int, Field(ge=MIN_SIZE, le=MAX_SIZE)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

# Strict types and finite numbers (see the module docstring), for every table of the recipe.
STRICT_TYPES = ConfigDict(strict=True, allow_inf_nan=False)



def check_device(value: str) -> str:
    """A ``device`` value: auto, cpu, cuda, cuda:N or mps (run and training recipes alike)."""
    base = value.split(":", 1)[0]
    if base not in {"auto", "cpu", "cuda", "mps"} or (":" in value and not value.split(":", 1)[1].isdigit()):
        raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
    return value

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, **STRICT_TYPES)


class EnvRef(Strict):
    """``{env = "VAR"}``: the value comes from an environment variable (optional default)."""

    env: str = Field(min_length=1)
    default: str | None = None


WeightRef = Union[str, EnvRef]


class Weights(Strict):
    dit: WeightRef | None = Field(None, description="Transformer weights: a .safetensors file or a diffusers transformer/ folder")
    text_encoder: WeightRef | None = Field(None, description="Text encoder folder (weights + tokenizer.json)")
    vae: WeightRef | None = Field(None, description="VAE weights: a file or a diffusers vae/ folder")


class ModelSection(Strict):
    preset: str | None = Field(None, description="Model preset name (see `krea2kit plugins`); default: the built-in default model")
    dit: str | None = Field(None, description="Override the preset's transformer part")
    text_encoder: str | None = Field(None, description="Override the preset's text-encoder part")
    vae: str | None = Field(None, description="Override the preset's VAE part")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    weights: Weights = Field(default_factory=Weights)
    layout: Literal["official", "compact"] | None = Field(
        None, description="Token layout: 'official' reproduces the reference's padded sequence (bit-identical "
                          "images in bf16); 'compact' drops padding (faster, equal up to rounding). "
                          "Default: the preset's (official for Krea 2, compact for the nano models)")
    vae_tile_threshold: Annotated[int, Field(ge=64 * 64)] | None = Field(
        None, description="Decode in overlapping tiles above this many pixels (default: the VAE's own, bounded memory)")
    weights_dtype: Literal["auto", "fp8", "int8"] = Field(
        "auto", description="Transformer weight storage: 'auto' keeps the file's (bf16 files load at model.dtype, "
                            "quantized files stay quantized); 'fp8' / 'int8' quantize a full-precision file while "
                            "loading it (embedders, time/text MLPs, text projector, last layer, norms and "
                            "modulations stay full precision). The text encoder has its own key below")
    text_encoder_weights_dtype: Literal["auto", "fp8", "int8"] = Field(
        "auto", description="Text-encoder weight storage: 'auto' keeps the file's; 'fp8' / 'int8' quantize a "
                            "full-precision file while loading it (the decoder layers' projections; the "
                            "embedding table and norms stay full precision)")
    offload: Literal["none", "text-encoder", "blocks"] | None = Field(
        None, description="'text-encoder': free the text encoder once the prompts are encoded; 'blocks': that, and "
                          "keep the transformer blocks in host memory, streaming each to the device while the one "
                          "before computes (two blocks on the device; same images, slower); 'none': keep everything "
                          "loaded (faster repeated runs in one process). Default: the preset's (Krea 2: text-encoder)")
    quant_compute: Literal["auto", "dequantize", "scaled-mm"] = Field(
        "auto", description="How fp8/int8 layers (quantized files or weights_dtype) compute: 'scaled-mm' multiplies "
                            "in low precision (fp8: torch._scaled_mm with per-token activation scales, sm_89+; int8: "
                            "torch._int_mm, sm_75+; the CPU runs both, slowly for fp8); 'dequantize' dequantizes "
                            "one layer at a time and multiplies at model.dtype; 'auto': scaled-mm on CUDA GPUs that "
                            "have it, dequantize elsewhere. Each image's metadata records the path taken")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


class SamplerSection(BaseModel):
    """Common sampler settings; other keys are the chosen sampler's own options."""

    model_config = ConfigDict(extra="allow", **STRICT_TYPES)

    name: str | None = Field(None, description="Sampler name (default: the preset's)")
    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Annotated[float, Field(ge=0.0, le=100.0)] | None = Field(
        None, description="Guidance strength in the convention below; Krea: v = cond + g(cond - uncond), on when g > 0")
    convention: Literal["krea", "standard"] = Field(
        "krea", description="'krea': v = cond + g(cond-uncond); 'standard': v = uncond + s(cond-uncond), s = g + 1")
    mu: float | Literal["auto"] | None = Field(
        None, description="Shift mu; 'auto' = resolution-aware (0.5 at 256 tokens to 1.15 at 6400, unclamped)")

    def extra_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _standard_guidance(self):
        if self.convention == "standard" and self.guidance is not None and 0 < self.guidance < 1:
            raise ValueError("with convention = 'standard' the guidance scale s must be 0 (off) or >= 1 (s = 1 + Krea g)")
        return self


class PromptEntry(Strict):
    text: str = Field(description="The prompt")
    negative: str | None = None
    seed: Seed | None = None
    count: Annotated[int, Field(ge=1, le=10000)] | None = None
    width: Size | None = None
    height: Size | None = None
    name: str | None = Field(None, description="A label for output file names: the {name} field (default: the prompt slug)")
    expand: bool | None = Field(None, description="[expander]: expand this prompt (true) or keep it as written "
                                                  "(false); default: expander.enabled")


class LoraEntry(Strict):
    path: WeightRef
    strength: float = 1.0
    name: str | None = Field(None, description="Label for sliders and metadata (default: the file stem)")
    trigger: str | None = Field(None, description="Appended to every prompt when the LoRA is active")
    # strict=False on the pair only: TOML gives a list, which strict mode would refuse as a
    # tuple; its two items stay strict integers.
    steps: Annotated[tuple[Annotated[int, StrictType(), Field(ge=0)], Annotated[int, StrictType(), Field(ge=1)]],
                     Field(strict=False)] | None = Field(
        None, description="[start, end): apply only on these sampler steps")
    strict: bool = Field(False, description="Error on keys that match no module instead of listing them")

    @model_validator(mode="after")
    def _range(self):
        if self.steps is not None and self.steps[0] >= self.steps[1]:
            raise ValueError("steps = [start, end) needs start < end")
        return self


class SliderEntry(BaseModel):
    """A named control; other keys are the slider kind's own settings."""

    model_config = ConfigDict(extra="allow", **STRICT_TYPES)

    name: str
    value: float = 0.0
    kind: str = "lora"


class SafetySection(Strict):
    filters: list[str] = Field(default_factory=list, description="Filters this recipe requires to be installed "
                                                              "(every registered filter runs in any case)")
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-filter settings, e.g. {nsfw-image = {threshold = 0.7}}")


class OutputSection(Strict):
    dir: str = Field("krea2kit-out", description="Output folder (relative to the working directory)")
    name: str = Field("{recipe}-{index:04d}-{seed}", description="File name template without extension")
    format: str = Field("png", description="Writer name: png, jpeg, webp or a plugin's")
    quality: Annotated[int, Field(ge=1, le=100)] | None = None
    metadata: bool = Field(True, description="Write generation parameters and the recipe into the image (the AI marker is always written)")
    include_prompt: bool = Field(True, description="Keep the prompt text in the metadata (false: privacy)")
    overwrite: bool = Field(False, description="Replace existing files instead of adding -2, -3, ...")
    sheet: bool = Field(False, description="With [matrix]: also write a labelled contact sheet of all the images")


class InitSection(Strict):
    """Image-to-image: start from a picture instead of pure noise; with a mask, inpainting."""

    image: str = Field(min_length=1, description="The starting picture (PNG, JPEG, WebP...); resized to cover the "
                                                 "image size and center-cropped (relative paths start in the "
                                                 "current folder)")
    strength: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.75, description="How much to change it: 1.0 starts from pure noise (text-to-image), 0.0 returns the "
                          "picture (through the VAE)")
    mask: str | None = Field(None, description="Inpainting mask, same framing as the image: white = repaint, "
                                               "black = keep, grey = in between")
    mask_blur: Annotated[float, Field(ge=0.0, le=256.0)] = Field(
        0.0, description="Feather the mask edge by this many pixels (a Gaussian blur radius)")


class ReferenceEntry(Strict):
    """``[[references]]``: a picture that conditions the image (style, colour, subject) without
    being its starting point (krea2kit.references)."""

    image: str = Field(min_length=1, description="The reference picture (PNG, JPEG, WebP...); framed to the image "
                                                 "size like [init]; relative paths start in the recipe's folder "
                                                 "(in the current folder when given with --set)")
    strength: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        1.0, description="How much the image attends to it: 0 = not used at all (bit-identical to no "
                         "reference), 1 = as the model would, above 1 = more (a log(strength) attention bias)")
    mode: Literal["in-context", "attention"] = Field(
        "in-context", description="'in-context': its latent tokens join the sequence at their own RoPE frame (the "
                                  "convention reference/edit LoRAs are trained with); 'attention': training-free, "
                                  "its keys and values from the same blocks are added to the image's attention")
    frame: Annotated[int, Field(ge=0, le=1024)] | None = Field(
        None, description="RoPE frame index (the first position axis) of its tokens; default: its place in "
                          "[[references]] + 1 (the image itself is frame 0)")
    name: str | None = Field(None, description="Label for sliders (lora = \"reference:NAME\") and metadata "
                                               "(default: the file stem)")


class VariationSection(Strict):
    """Variations (AUTOMATIC1111's "variation seed"): the image's own starting noise is
    spherically interpolated toward the noise of a second seed by ``strength``."""

    seed: Seed = Field(description="The variation seed (image i of a prompt uses seed + i when per_image)")
    strength: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="0: the image's own noise (the plain image); 1: the variation seed's noise "
                         "(the image that seed would give); in between: a slerp of the two")
    per_image: bool = Field(True, description="Image i of a prompt entry uses seed + i (as seeds do); false: "
                                              "every image uses the same variation seed")


class ExpanderSection(Strict):
    """``[expander]``: rewrite each prompt into a fuller one with a language model before it is
    encoded (Krea's advice for short prompts). Which server or weights it uses is the local
    user's choice (the user config's ``[expander]``), never the recipe's."""

    enabled: bool = Field(False, description="Expand every prompt (a [[prompts]] entry's expand = true/false "
                                             "decides for that entry)")
    backend: str = Field("openai", description="Expander backend: openai (any OpenAI-compatible chat endpoint), "
                                               "transformers (local Qwen3-VL-4B), or a plugin's")
    seed: Seed = Field(0, description="Sampling seed sent to the model (same seed + settings: same answer, "
                                      "where the backend honours it)")
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = Field(
        0.0, description="Sampling temperature; 0 = greedy (the most repeatable)")
    max_tokens: Annotated[int, Field(ge=16, le=4096)] = Field(512, description="Longest answer, in tokens")
    on_failure: Literal["error", "original"] = Field(
        "error", description="When the model cannot answer: 'error' stops the run (exit 5); 'original' keeps "
                             "the prompt as written, with a warning")
    system_prompt: str | None = Field(None, min_length=1, description="A text file with another system prompt "
                                                                      "(default: krea2kit's own); relative to "
                                                                      "the current folder")
    cache: Literal["use", "refresh"] = Field(
        "use", description="'use': answers already in the cache (or recorded in an image being re-run) are "
                           "taken without asking the model; 'refresh': ask again and store the new answer")


class DiversitySection(BaseModel):
    """``[diversity]``: score how different a prompt's images are and, with ``keep``, write only
    the ``keep`` most diverse of them (krea2kit.diversity). Other keys are the embedder's own
    options, checked against its schema."""

    model_config = ConfigDict(extra="allow", **STRICT_TYPES)

    embedder: str = Field("lab-hog", description="Embedder part: lab-hog (built in, weight-free) or a plugin's "
                                                 "(e.g. clip, dinov2 from krea2kit-embeddings)")
    keep: Annotated[int, Field(ge=1, le=10000)] | None = Field(
        None, description="Of each prompt's images, write only this many, the most diverse (the others are "
                          "rendered, scored and never written); default: write all, with their scores")
    method: Literal["max-min", "vendi"] = Field(
        "max-min", description="Selection: 'max-min' adds the image farthest from those kept; 'vendi' the one "
                               "that raises the kept set's Vendi score the most (both greedy, deterministic)")

    def extra_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MatrixSection(Strict):
    """``[matrix]``: the recipe is rendered once for every combination of these values (the
    cartesian product, in this key order, the last axis changing fastest)."""

    prompt: dict[str, Annotated[list[str], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict, description="Prompt fragments: {name = [...]} fills {matrix.name} in prompts and negatives")
    seed: Annotated[list[Seed], Field(min_length=1, max_length=1000)] | None = Field(
        None, description="Seeds (each replaces the recipe's and every prompt entry's seed)")
    guidance: Annotated[list[Annotated[float, Field(ge=0.0, le=100.0)]], Field(min_length=1, max_length=1000)] | None = Field(
        None, description="sampler.guidance values (in the recipe's sampler.convention)")
    steps: Annotated[list[Annotated[int, Field(ge=1, le=1000)]], Field(min_length=1, max_length=1000)] | None = Field(
        None, description="sampler.steps values")
    lora: dict[str, Annotated[list[float], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict, description="LoRA strengths by [[loras]] name: {style = [0.0, 1.0]}")
    slider: dict[str, Annotated[list[float], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict, description="Slider values by [[sliders]] name: {detail = [-1.0, 1.0]}")


class JobSection(Strict):
    """``[job]``: run the recipe as a batch job over a prompt file (krea2kit.jobs): one image
    per line (times ``count``), resumable through a manifest in the output folder."""

    prompts: str = Field(min_length=1, description="The prompt file: text, JSON lines or kohya-style lines, one "
                                                   "item per line; relative to this recipe. `--prompts FILE` "
                                                   "replaces it. Never taken from an image's recipe")


class Recipe(Strict):
    """A whole generation run."""

    schema_: Literal["krea2kit.recipe/1"] = Field(SCHEMA_ID, alias="schema")
    extends: str | list[str] | None = Field(None, description="Recipe(s) this one builds on, relative to this file")
    description: str = ""
    prompt: str | None = Field(None, description="A single prompt (or use [[prompts]])")
    negative: str = Field("", description="Default negative prompt")
    seed: Seed = 0
    count: Annotated[int, Field(ge=1, le=10000)] = 1
    width: Size | None = None
    height: Size | None = None
    prompts: list[PromptEntry] = Field(default_factory=list)
    model: ModelSection = Field(default_factory=ModelSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    loras: list[LoraEntry] = Field(default_factory=list)
    init: InitSection | None = Field(None, description="Image-to-image / inpainting: [init] image, strength, mask")
    references: Annotated[list[ReferenceEntry], Field(max_length=16)] = Field(
        default_factory=list, description="Reference images: [[references]] image, strength, mode, frame, name")
    variation: VariationSection | None = Field(None, description="Variation seed and strength (A1111 semantics)")
    expander: ExpanderSection | None = Field(None, description="Prompt expansion with a language model: "
                                                               "[expander] enabled, backend, seed, temperature ...")
    diversity: DiversitySection | None = Field(
        None, description="Diversity scores of each prompt's images; keep = K writes only the K most diverse")
    matrix: MatrixSection | None = Field(None, description="Render every combination of prompt fragments, seeds, "
                                                            "guidance, steps, LoRA strengths and slider values")
    sliders: list[SliderEntry] = Field(default_factory=list)
    safety: SafetySection = Field(default_factory=SafetySection)
    output: OutputSection = Field(default_factory=OutputSection)
    job: JobSection | None = Field(None, description="Batch job: a prompt file rendered image by image, resumable")
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [lora.name for lora in self.loras if lora.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"LoRA names must be unique, repeated: {', '.join(dupes)}")
        sliders = [s.name for s in self.sliders]
        dupes = sorted({n for n in sliders if sliders.count(n) > 1})
        if dupes:
            raise ValueError(f"slider names must be unique, repeated: {', '.join(dupes)}")
        return self


def schema_document(model: type[BaseModel], schema_id: str, title: str) -> dict:
    """``model``'s JSON Schema as a standalone document (draft 2020-12, an ``$id`` from the
    recipe's ``schema`` value), for editors that complete TOML keys from it."""
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://krea2kit.invalid/schema/{schema_id}.json"
    schema["title"] = title
    return schema


def json_schema() -> dict:
    """JSON Schema of the recipe (for editors that complete TOML keys from it)."""
    return schema_document(Recipe, SCHEMA_ID, "krea2kit recipe")
