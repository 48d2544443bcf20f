"""``krea2kit train``: LoRA / LoKr adapters and concept sliders trained on the Raw checkpoint,
meant to run on Turbo (Krea's own advice: "train LoRAs on Raw and apply them on Turbo").

* :mod:`.schema`: the training recipe (``schema = "krea2kit.train/1"``), torch-free.
* :mod:`.adapters`: trainable LoRA / LoKr modules hooked onto the frozen transformer's Linears.
* :mod:`.objective`: the flow-matching loss in the official convention, timesteps with Krea's
  resolution shift, caption dropout.
* :mod:`.slider`: the concept-slider objective (Gandikota et al. 2023).
* :mod:`.checkpoint`: atomic, pickle-free checkpoints that resume bit for bit.
* :mod:`.loop`: the training loop (optimizer, schedule, progress events, checkpoints).
* :mod:`.dataset`, :mod:`.cache`, :mod:`.export`, :mod:`.memory_plan`, :mod:`.samples`: the
  data, the latent / embedding cache, the adapter file, the memory plan and the sample sheets.

Nothing heavy is imported here.
"""
