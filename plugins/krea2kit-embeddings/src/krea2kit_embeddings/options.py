"""The ``[plugins.krea2kit-embeddings]`` recipe table (light: pydantic only)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

ModelName = Annotated[str, Field(min_length=1, max_length=200)]


class EmbeddingsOptions(BaseModel):
    """Which architecture each embedder builds and the local file its weights come from.
    A ``*_weights`` left out falls back to ``$KREA2KIT_<EMBEDDER>_WEIGHTS``; nothing is ever
    downloaded."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    clip_model: ModelName = Field("ViT-B-32", description="open_clip architecture name (a built-in config; "
                                                          "'hf-hub:' and 'local-dir:' names are refused)")
    clip_weights: str | None = Field(None, description="open_clip weights: a .safetensors file, or a folder "
                                                       "holding open_clip_model.safetensors")
    dinov2_model: ModelName = Field("vit_small_patch14_dinov2.lvd142m", description="timm model name")
    dinov2_weights: str | None = Field(None, description="timm DINOv2 weights: a .safetensors file (the timm "
                                                         "or the original facebookresearch layout) or a folder "
                                                         "holding model.safetensors")
    dinov3_model: ModelName = Field("vit_small_patch16_dinov3.lvd1689m", description="timm model name")
    dinov3_weights: str | None = Field(None, description="timm DINOv3 weights, as dinov2_weights")
    batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="Images per forward pass")
