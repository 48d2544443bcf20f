"""A model's answer made into a prompt, or refused.

Chat models wrap answers in ways an image prompt must not carry: a ``<think>`` block (Qwen3
reasoning models), surrounding quotes, a "Prompt:" label, line breaks. A model may also
decline. Both backends pass their text through :func:`clean_answer`.
"""

from __future__ import annotations

import re

from krea2kit.errors import ExpanderError

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:expanded\s+prompt|prompt|description)\s*:\s*", re.IGNORECASE)
# Openings of a declined request. Only checked on short answers: a real description that
# happens to start with "I cannot" is not a two-line apology.
_REFUSALS = ("i'm sorry", "i am sorry", "sorry,", "i can't", "i cannot", "i can not", "i won't", "i will not",
             "i'm unable", "i am unable", "i'm not able", "i am not able", "as an ai")
_REFUSAL_MAX_CHARS = 300


def clean_answer(text: str) -> str:
    """One paragraph of plain text: think blocks, a leading label, outer quotes and line breaks gone."""
    text = _THINK.sub(" ", text)
    if "<think>" in text.lower():  # an unfinished think block (max_tokens ran out inside it)
        text = text[: text.lower().index("<think>")]
    text = "".join(c if c.isprintable() or c.isspace() else " " for c in text)  # no control characters
    text = " ".join(text.split())
    text = _LABEL.sub("", text, count=1)
    # Outer quotes around the whole answer only; quotes inside are text to render.
    for left, right in (('"', '"'), ("\u201c", "\u201d"), ("'", "'")):
        inner = text[1:-1]
        if len(text) >= 2 and text.startswith(left) and text.endswith(right) and left not in inner and right not in inner:
            text = text[1:-1].strip()
    return text


def usable(text: str, *, where: str, hint: str) -> str:
    """``text`` cleaned, or an :class:`ExpanderError` when it is empty or a refusal."""
    cleaned = clean_answer(text)
    if not cleaned:
        raise ExpanderError(f"the prompt expander ({where}) gave an empty answer", key="expander", hint=hint)
    if len(cleaned) <= _REFUSAL_MAX_CHARS and cleaned.lower().startswith(_REFUSALS):
        raise ExpanderError(f"the prompt expander ({where}) refused the prompt: {cleaned[:120]!r}", key="expander",
                            hint="rephrase the prompt, use another model, or set expander.on_failure = \"original\" "
                                 "to keep prompts it declines as written")
    return cleaned
