"""Adapters from the built-in model/safety/output code to the part protocols of
:mod:`krea2kit.contracts` (each loaded as ``load(options, context)``). Imported lazily by
``builtins``."""


def weights_fingerprint(location: str) -> str:
    """The one weights fingerprint of every built-in part: the text encoder's (file names,
    sizes, full safetensors headers and sampled data, :func:`krea2kit.conditioning.weights_identity`),
    so two fine-tunes with the same tensor layout are told apart in image metadata."""
    from krea2kit.conditioning import weights_identity
    from krea2kit.models.weights import open_checkpoint
    from krea2kit.models.quant.detect import is_gguf

    if is_gguf(location):  # no safetensors header to hash (krea2kit.models.quant reads GGUF transformers)
        from krea2kit.models.quant.gguf_reader import gguf_identity

        return gguf_identity(location)
    return weights_identity(open_checkpoint(location).files())
