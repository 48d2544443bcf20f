"""Reference images: pictures that condition a run without being its starting point.

``[[references]]`` entries (:class:`krea2kit.recipe.schema.ReferenceEntry`) each give a
picture, a strength, a mode and optionally a RoPE frame index. Two modes, both on the same
token layout (the reference's latents, encoded with the run's VAE and patchified like the
image, appended after every other token, never denoised, their outputs dropped):

* ``in-context``: the convention reference/edit LoRAs are trained with for Krea 2 — the tokens
  join the sequence at RoPE position ``(frame, row, col)`` with ``frame = index + 1`` (the
  3-axis RoPE's first axis; the image is frame 0) and are modulated as clean latents (t = 0)
  while the image keeps its own t. Every token attends to every other.
* ``attention``: training-free key/value injection — the reference runs through the same
  blocks attending only to itself, and the image's attention takes its keys and values as
  extra ones. Attending "only to itself" is what makes this the same as computing the
  reference's K/V in a separate pass and concatenating them (one sequence, one mask).

Strength ``s`` adds ``log(s)`` to the attention logits toward the reference's keys (so its
softmax weight is multiplied by ``s`` before normalisation); ``s = 0`` leaves the reference
out entirely, which is the plain run bit for bit. A slider drives a reference through the
binding target ``"reference:NAME"`` (``lora = "reference:style"`` in a ``[[sliders]]``
entry), so ``run --sweep`` and ``[matrix.slider]`` work unchanged.

Modules: :mod:`krea2kit.recipe.references` (plan time, metadata and re-runs; no torch; in
``recipe/`` because planning calls it and layers import one way) and :mod:`.conditioning`
(the tokens, the mask, the per-step strengths and the denoiser hook; torch).
"""
