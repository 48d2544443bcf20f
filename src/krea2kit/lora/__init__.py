"""LoRA-family adapters for the Krea 2 transformer.

* :mod:`.formats` reads every LoRA layout of the ecosystem into one form
  (:class:`~krea2kit.lora.formats.LoraDelta` per native module name).
* :mod:`.apply` applies adapters without touching the base weights (strength per
  image and per step) or merges them with an exact restore.
* :mod:`.sliders` turns a slider value into LoRA strengths (and holds the one schema of
  the ``"lora"`` slider kind).
* :mod:`.convert` writes a LoRA in the diffusers, native or kohya layout.

The ``lora`` commands (``inspect``, ``convert``) live in :mod:`krea2kit.cli.lora_cmd`.

Nothing heavy is imported here.
"""
