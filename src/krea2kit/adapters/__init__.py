"""LoRA-family adapters for the Krea 2 transformer.

* :mod:`.formats` reads every LoRA layout of the ecosystem into one form
  (:class:`~krea2kit.adapters.formats.LoraDelta` per native module name).
* :mod:`.runtime` applies adapters without touching the base weights (strength per
  image and per step) or merges them with an exact restore.
* :mod:`.sliders` turns a slider value into LoRA strengths.
* :mod:`.convert` writes a LoRA in the diffusers, native or kohya layout.
* :mod:`.cli` holds the ``lora`` click group (``inspect``, ``convert``).

Nothing heavy is imported here.
"""
