"""krea2kit plugin: learned image embedders for ``[diversity]`` (krea2kit.diversity).

Registers the embedders ``clip`` (open-clip-torch), ``dinov2`` and ``dinov3`` (timm) and the
``[plugins.krea2kit-embeddings]`` table that says where their weights are. Weights are only
ever read from a local ``.safetensors`` file (or a folder holding one) the user names there or
in ``$KREA2KIT_CLIP_WEIGHTS`` / ``$KREA2KIT_DINOV2_WEIGHTS`` / ``$KREA2KIT_DINOV3_WEIGHTS``;
nothing is downloaded, and a missing location is a ``WeightsError`` naming the option.

Importing this module is cheap (pydantic only): torch, open_clip and timm are imported when
an embedder is loaded.
"""

from krea2kit.hookspecs import hookimpl
from krea2kit.registry import EmbedderDescriptor, OptionsDescriptor

__version__ = "0.1.0"
KREA2KIT_CONTRACT = 2  # the krea2kit plugin contract this plugin is written for
PLUGIN = "krea2kit-embeddings"  # the entry-point name: the [plugins.krea2kit-embeddings] table


@hookimpl
def register_embedders(register):
    register(EmbedderDescriptor(
        name="clip", summary="CLIP image tower (open-clip-torch) on local weights: [plugins.krea2kit-embeddings] "
                             "clip_model, clip_weights",
        load="krea2kit_embeddings.models:load_clip", needs_weights=True, version=__version__))
    register(EmbedderDescriptor(
        name="dinov2", summary="DINOv2 ViT (timm) on local weights: [plugins.krea2kit-embeddings] dinov2_model, "
                               "dinov2_weights",
        load="krea2kit_embeddings.models:load_dinov2", needs_weights=True, version=__version__))
    register(EmbedderDescriptor(
        name="dinov3", summary="DINOv3 ViT (timm >= 1.0.20) on local weights: [plugins.krea2kit-embeddings] "
                               "dinov3_model, dinov3_weights",
        load="krea2kit_embeddings.models:load_dinov3", needs_weights=True, version=__version__))


@hookimpl
def register_options(register):
    register(OptionsDescriptor(name=PLUGIN, summary="Models and local weights of the clip, dinov2, dinov3 embedders",
                               options="krea2kit_embeddings.options:EmbeddingsOptions", version=__version__))
