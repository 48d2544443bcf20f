"""Prompt expansion: a language model rewrites a short prompt into a fuller description before
it is encoded (the ``[expander]`` recipe table, the ``register_prompt_expanders`` hook).

Krea's guide for Krea 2 suggests expanding short prompts with an LLM and ships a system prompt
"to use with the LLM of your choice"; krea2kit ships its own (``system_prompt.txt``), written
on the same principles: stay faithful, keep the medium and subject, quote text to render
verbatim, one paragraph, no over-specification.

Modules, one concern each:

* :mod:`.config`: where a backend talks to (endpoint, key, weights), from the user config and
  the environment only, never from a recipe;
* :mod:`.openai_chat`: any OpenAI-compatible ``/chat/completions`` endpoint (standard library);
* :mod:`.local_transformers`: local generation with Qwen3-VL-4B's own LM head (``transformers``);
* :mod:`.cache`: answers kept on disk, so a re-run is deterministic and offline;
* :mod:`.answers`: cleaning a model's answer, refusing empty and refused ones;
* :mod:`.jobs`: the pipeline step (originals filtered, expanded, filtered again by the caller).

Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

from krea2kit.errors import EXIT_EXPANDER, ExpanderError

__all__ = ["EXIT_EXPANDER", "ExpanderError"]
