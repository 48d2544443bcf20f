"""The training recipe (``schema = "krea2kit.train/1"``): the same TOML language as a run
recipe (``extends``, ``--set``, strict types, errors naming file and key), its own tables.

::

    schema = "krea2kit.train/1"
    name = "ink-style"            # the adapter's name (default: the recipe's file stem)
    trigger = "ink style"         # written into the file's metadata; dataset.trigger adds it to captions
    steps = 1000
    seed = 0
    batch_size = 1
    caption_dropout = 0.05        # share of captions replaced by the empty prompt
    checkpoint_every = 250

    [base]                        # the frozen model trained on: Raw (training on Turbo is a known mistake)
    preset = "krea2-raw"
    weights = { dit = "/models/krea2/raw.safetensors" }
    [dataset]                     # krea2kit.train.dataset.DatasetSpec
    path = "data/ink"
    [adapter]
    kind = "lora"                 # or "lokr"
    rank = 32
    alpha = 32
    targets = ["all"]             # presets: all, blocks, attention, attention-mlp; or globs on native names
    [optimizer]
    name = "adamw"                # or "adamw8bit" (bitsandbytes)
    lr = 1e-4
    [schedule]
    kind = "constant"             # or "cosine"
    warmup = 0
    [timesteps]
    shift = "resolution"          # Krea's resolution-aware mu; a number (1.15 = Turbo's); "uniform"
    [samples]
    prompts = ["ink style, a fox"]
    on = ["turbo"]                # and/or "raw"
    [output]
    path = "loras/ink-style.safetensors"
    format = "diffusers"

A ``[slider]`` table switches to concept-slider training (:mod:`krea2kit.train.slider`); it
needs no ``[dataset]``.

Torch-free: ``recipe check`` validates a training recipe without loading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from krea2kit.recipe.schema import STRICT_TYPES, EnvRef, Seed, Size, schema_document
from krea2kit.train.dataset import DatasetSpec

TRAIN_SCHEMA_ID = "krea2kit.train/1"
#: The Krea 2 community's settings that train well on Raw (the diffusers trainer's defaults:
#: rank = alpha = 32; lr 1e-4, up to 3e-4).
DEFAULT_RANK = 32
DEFAULT_LR = 1e-4

WeightRef = Union[str, EnvRef]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, **STRICT_TYPES)


class BaseWeights(_Strict):
    dit: WeightRef | None = Field(None, description="Raw transformer weights (a .safetensors file or a diffusers transformer/ folder)")
    text_encoder: WeightRef | None = None
    vae: WeightRef | None = None


class BaseSection(_Strict):
    preset: str = Field("krea2-raw", description="The model trained on: a Raw preset (krea2-raw; krea2-nano-raw for tests)")
    weights: BaseWeights = Field(default_factory=BaseWeights)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Frozen weights' dtype (auto: bf16 on CUDA, fp32 on CPU); the adapter trains in fp32")
    weights_dtype: Literal["auto", "fp8", "int8"] = Field(
        "auto", description="Frozen transformer storage: 'fp8' / 'int8' quantize it while loading (QLoRA-style)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from krea2kit.recipe.schema import check_device

        return check_device(value)


class AdapterSection(_Strict):
    kind: Literal["lora", "lokr"] = "lora"
    rank: Annotated[int, Field(ge=1, le=4096)] = DEFAULT_RANK
    alpha: Annotated[float, Field(gt=0, le=1e6)] | None = Field(None, description="Scale = alpha / rank (default: alpha = rank)")
    targets: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(min_length=1, max_length=200)] = Field(
        default_factory=lambda: ["all"],
        description="Linears to adapt: presets all (every Linear), blocks, attention, attention-mlp; or globs on "
                    "native names ('blocks.*.attn.wq')")
    factor: int = Field(-1, ge=-1, le=4096, description="LoKr: Kronecker factor (-1: the most balanced split)")

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0:
            raise ValueError("factor must be -1 (balanced) or a positive size")
        return v


class OptimizerSection(_Strict):
    name: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes (CUDA)")
    lr: Annotated[float, Field(gt=0, le=1.0)] = DEFAULT_LR
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]],
                     Field(strict=False)] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0, le=1.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0, le=10.0)] = 0.01
    max_grad_norm: Annotated[float, Field(ge=0)] = Field(1.0, description="Clip the gradient norm (0: no clipping)")


class ScheduleSection(_Strict):
    kind: Literal["constant", "cosine"] = "constant"
    warmup: Annotated[int, Field(ge=0, le=10_000_000)] = Field(0, description="Linear warm-up steps")
    min_lr: Annotated[float, Field(ge=0, le=1.0)] = Field(0.0, description="cosine: the final lr as a share of lr")


class TimestepSection(_Strict):
    shift: Union[Literal["resolution", "uniform"], Annotated[float, Field(ge=-10, le=10)]] = Field(
        "resolution", description="'resolution': t = sigmoid(N(0,1) + mu) with Krea's resolution-aware mu "
                                  "(0.5 at 256 tokens .. 1.15 at 6400); a number: that mu; 'uniform': t ~ U(0,1)")


class SliderSection(_Strict):
    """Concept-slider training (Gandikota et al. 2023): no dataset; the adapter learns to move
    ``target`` toward ``positive`` at +1 and toward ``negative`` at -1."""

    target: str = Field(description="What the slider acts on, e.g. 'a shape'")
    positive: str = Field(min_length=1, description="The attribute at +1, e.g. 'a large shape'")
    negative: str = Field(min_length=1, description="The attribute at -1, e.g. 'a small shape'")
    neutral: str | None = Field(None, description="Prompt the noisy latents come from (default: target)")
    preserve: list[str] = Field(default_factory=list, description="Attributes to keep (each is added to every "
                                                                   "prompt in turn, so the slider does not learn them)")
    guidance: Annotated[float, Field(gt=0, le=100)] = Field(
        4.0, description="eta: how far along (positive - negative) the target is moved")
    width: Size = 64
    height: Size = 64
    denoise_steps: Annotated[int, Field(ge=0, le=1000)] = Field(
        4, description="Partly denoised latents to train on: 0 trains on noised pure noise (no sampling)")
    range: Annotated[tuple[float, float], Field(strict=False)] = Field(
        (-1.0, 1.0), description="The [[sliders]] range written with the adapter")

    @model_validator(mode="after")
    def _range(self):
        if not self.range[0] < self.range[1]:
            raise ValueError("range = [min, max] needs min < max")
        return self


class SamplesSection(_Strict):
    prompts: Annotated[list[str], Field(max_length=64)] = Field(default_factory=list)
    on: Annotated[list[Literal["turbo", "raw"]], Field(min_length=1, max_length=2)] = Field(
        default_factory=lambda: ["turbo"], description="Render the samples on Turbo (8 steps, guidance 0) and/or Raw")
    every: Annotated[int, Field(ge=1)] | None = Field(None, description="Steps between sample sheets (default: checkpoint_every)")
    turbo: str | None = Field(None, description="The Turbo preset (default: the base preset with raw -> turbo)")
    turbo_weights: BaseWeights = Field(default_factory=BaseWeights)
    strength: float = Field(1.0, ge=-100, le=100, description="Adapter strength for the samples")
    seed: Seed = 0
    width: Size | None = None
    height: Size | None = None


class TrainOutputSection(_Strict):
    path: str | None = Field(None, description="The adapter file (default: <name>.safetensors in the current folder)")
    format: Literal["diffusers", "native", "kohya"] = Field(
        "diffusers", description="diffusers: the official Krea LoRA layout; native / kohya as `lora convert` writes")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="Tensors' dtype in the file")
    overwrite: bool = Field(False, description="Replace an existing adapter file")
    work_dir: str | None = Field(None, description="Checkpoints and sample sheets (default: <path>.train/)")


class TrainRecipe(_Strict):
    schema_: Literal["krea2kit.train/1"] = Field(TRAIN_SCHEMA_ID, alias="schema")
    extends: str | list[str] | None = None
    description: str = ""
    name: str | None = Field(None, description="The adapter's name (default: the recipe's file stem)")
    trigger: str | None = Field(None, description="Trigger phrase recorded in the file (dataset.trigger adds it to captions)")
    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    seed: Seed = 0
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 1
    caption_dropout: Annotated[float, Field(ge=0, le=1)] = 0.05
    checkpoint_every: Annotated[int, Field(ge=1)] = 250
    gradient_checkpointing: bool = Field(False, description="Recompute each block in the backward pass (less memory)")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16: autocast the forward (CUDA); the adapter stays fp32")
    base: BaseSection = Field(default_factory=BaseSection)
    dataset: DatasetSpec | None = None
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    timesteps: TimestepSection = Field(default_factory=TimestepSection)
    slider: SliderSection | None = None
    samples: SamplesSection = Field(default_factory=SamplesSection)
    output: TrainOutputSection = Field(default_factory=TrainOutputSection)

    @model_validator(mode="after")
    def _mode(self):
        if self.slider is None and self.dataset is None:
            raise ValueError("a training recipe needs [dataset] (or [slider] for concept-slider training)")
        if self.slider is not None and self.dataset is not None:
            raise ValueError("give [dataset] or [slider], not both (a slider trains from prompts alone)")
        return self

    @property
    def mode(self) -> str:
        return "slider" if self.slider is not None else "lora"

    @property
    def alpha(self) -> float:
        return float(self.adapter.alpha if self.adapter.alpha is not None else self.adapter.rank)


def is_training_recipe(data: dict[str, Any]) -> bool:
    """A recipe's data is a training recipe (its ``schema`` says so)."""
    return isinstance(data, dict) and data.get("schema") == TRAIN_SCHEMA_ID


def json_schema() -> dict:
    """JSON Schema of the training recipe (editor completion of its TOML keys)."""
    return schema_document(TrainRecipe, TRAIN_SCHEMA_ID, "krea2kit training recipe")


def load_training_recipe(source: str, overrides: list[str] | tuple[str, ...] = ()):
    """``(TrainRecipe, LoadedRecipe)`` from a TOML file (``-``: stdin) with ``--set`` overrides.

    The same loader as run recipes (``extends``, size and depth caps, provenance per key), so an
    error names the file that set the key. A recipe without ``schema`` is read as a training
    recipe; a run recipe's schema is refused with a pointer to ``krea2kit run``.
    """
    from krea2kit.errors import RecipeError
    from krea2kit.recipe import SCHEMA_ID
    from krea2kit.recipe.loader import apply_overrides, load_recipe_source
    from krea2kit.validation import validate_model

    if Path(source).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        raise RecipeError("a training recipe is a TOML file, not an image", file=source,
                          hint="krea2kit run IMAGE re-runs an image's recipe")
    loaded = load_recipe_source(source)
    apply_overrides(loaded, list(overrides))
    value = loaded.data.setdefault("schema", TRAIN_SCHEMA_ID)
    if value != TRAIN_SCHEMA_ID:
        hint = ("this is a run recipe: render it with krea2kit run" if value == SCHEMA_ID
                else f"a training recipe says schema = {TRAIN_SCHEMA_ID!r}")
        raise RecipeError(f"unsupported training recipe schema {value!r}", file=loaded.file_of("schema"),
                          key="schema", hint=hint)
    recipe = validate_model(TrainRecipe, loaded.data, file=loaded.path, provenance=loaded.provenance)
    return recipe, loaded
