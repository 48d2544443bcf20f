"""A batch job's prompt source: a text file (or stdin), one item per line.

Every line is untrusted input (a prompt list may come from anyone, or from a script). The
whole source is read and checked before anything loads; a bad line is a
:class:`~krea2kit.errors.UsageError` (exit 2) naming ``file:line`` and the fix.

One rule per line, whatever the file's name:

* blank, or whose first non-blank character is ``#``: skipped (a comment);
* first non-blank character ``{``: a JSON record (JSON lines): ``prompt`` (or ``text``) and
  optionally ``negative``, ``seed``, ``width``, ``height``, ``steps``, ``guidance``,
  ``count``, ``name``; JSON's own types, strictly (``"64"`` is not a width);
* holds `` --n``/``--w``/``--h``/``--d``/``--l``/``--s`` options: a kohya-style sample prompt
  line (sd-scripts' ``--sample_prompts`` format): the text before the first option is the
  prompt; ``--n`` negative, ``--w``/``--h`` size, ``--d`` seed, ``--l`` guidance (in the
  recipe's ``sampler.convention``), ``--s`` steps;
* anything else: the prompt, stripped of surrounding blanks.

A prompt that itself starts with ``#`` or ``{`` or holds `` --word`` is written as a record:
``{"prompt": "#1 fan"}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from krea2kit.errors import UsageError
from krea2kit.recipe.schema import PromptEntry

#: A prompt list may hold many thousands of lines; anything bigger is refused unread.
MAX_PROMPT_FILE_BYTES = 64 << 20
#: One line, one image description: a longer line is a mistake (or an attack on memory).
MAX_LINE_CHARS = 100_000

STDIN_SOURCE = "<stdin>"

#: kohya option letter -> the record key it sets
KOHYA_OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps"}
_KOHYA_SPLIT = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
_RECORD_HINT = ('a JSON line is one object, e.g. {"prompt": "a red fox", "seed": 7}; keys: prompt (or text), '
                'negative, seed, width, height, steps, guidance, count, name')
_KOHYA_HINT = ("kohya-style options are --n NEGATIVE, --w WIDTH, --h HEIGHT, --d SEED, --l GUIDANCE, --s STEPS; "
               "a prompt holding ' --word' itself is written as a JSON line: {\"prompt\": \"...\"}")


class JobLine(PromptEntry):
    """One line of a prompt source: a ``[[prompts]]`` entry plus per-line sampler settings."""

    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Annotated[float, Field(ge=0.0, le=100.0)] | None = Field(
        None, description="sampler.guidance for this line, in the recipe's sampler.convention")


@dataclass(frozen=True)
class SourceLine:
    """A checked line: where it came from (``file:line``) and what it asks for."""

    where: str
    entry: JobLine


def read_source(source: str, *, base: Path | None = None, stdin_text: str | None = None) -> tuple[str, str]:
    """``(shown name, text)`` of a prompt source: a file path (relative to ``base`` when
    given, e.g. the recipe's folder), or ``-`` for stdin. Regular UTF-8 files only."""
    from krea2kit.tomlfiles import FileTooLarge, NotARegularFile, read_text_file

    if source == "-":
        if stdin_text is None:
            from krea2kit.recipe.loader import read_stdin_text

            stdin_text = read_stdin_text("prompts, one per line", limit=MAX_PROMPT_FILE_BYTES)
        return STDIN_SOURCE, stdin_text
    path = Path(source).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    shown = str(path)
    fix = "give a text or JSON-lines file of prompts, one per line"
    try:
        return shown, read_text_file(path, limit=MAX_PROMPT_FILE_BYTES)
    except FileNotFoundError:
        raise UsageError("prompt file not found", file=shown, hint=fix) from None
    except NotARegularFile as exc:
        raise UsageError(f"the prompt source is {exc.kind}, not a file", file=shown, hint=fix) from None
    except FileTooLarge as exc:
        raise UsageError(f"the prompt file is {exc.size} bytes, more than {MAX_PROMPT_FILE_BYTES}", file=shown,
                         hint="split it into several jobs") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"not UTF-8 text (byte {exc.start})", file=shown, hint="save the file as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read the prompt file: {exc.strerror or exc}", file=shown) from None


def parse_source(text: str, source: str) -> list[SourceLine]:
    """Every item line of ``text`` (see the module docstring), checked; UsageError naming
    ``source:line`` for the first bad one."""
    if text.startswith("\ufeff"):
        text = text[1:]
    out: list[SourceLine] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{n}"
        if len(line) > MAX_LINE_CHARS:
            raise UsageError(f"the line is {len(line)} characters long, more than {MAX_LINE_CHARS}", file=where,
                             hint="one line is one image's prompt; check the file")
        if any(ord(c) < 32 and c != "\t" for c in line):
            raise UsageError("the line holds a control character", file=where,
                             hint="prompts are plain text; remove it (a JSON line can carry \\u escapes)")
        if line.startswith("{"):
            values = _json_record(line, where)
        elif _KOHYA_SPLIT.search(line):
            values = _kohya(line, where)
        else:
            values = {"text": line}
        out.append(SourceLine(where, _validated(values, where)))
    return out


def _json_record(line: str, where: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise UsageError(f"key {repeated[0]!r} appears twice in the JSON line", file=where, hint=_RECORD_HINT)
        return dict(pairs)

    try:
        obj = json.loads(line, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise UsageError(f"a line starting with '{{' is a JSON line, and this one is not valid JSON: {exc.msg} "
                         f"(column {exc.colno})", file=where,
                         hint="to use a prompt that starts with '{' as it is, write it as a JSON line: "
                              '{"prompt": "..."}') from None
    except RecursionError:
        raise UsageError("the JSON line is nested too deeply", file=where, hint=_RECORD_HINT) from None
    if not isinstance(obj, dict):
        raise UsageError("a JSON line must be an object", file=where, hint=_RECORD_HINT)
    allowed = set(JobLine.model_fields) | {"prompt"}
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in the JSON line", file=where, hint=_RECORD_HINT)
    if "prompt" in obj and "text" in obj:
        raise UsageError("the JSON line has both 'prompt' and 'text'; give one", file=where, hint=_RECORD_HINT)
    values = dict(obj)
    if "prompt" in values:
        values["text"] = values.pop("prompt")
    if "text" not in values:
        raise UsageError("the JSON line has no 'prompt'", file=where, hint=_RECORD_HINT)
    return values


def _kohya(line: str, where: str) -> dict[str, Any]:
    """``prompt --n neg --w 512 --d 7``: the prompt, then options (sd-scripts' sample prompt
    format, its ``--n/--w/--h/--d/--l/--s`` subset). Numbers are parsed here, so a bad value
    names its option."""
    pieces = _KOHYA_SPLIT.split(line)  # [prompt, opt, value, opt, value, ...]
    values: dict[str, Any] = {"text": pieces[0].strip()}
    for opt, value in zip(pieces[1::2], pieces[2::2]):
        key = KOHYA_OPTIONS.get(opt.lower())
        if key is None:
            raise UsageError(f"unknown option --{opt} in a kohya-style prompt line", file=where, hint=_KOHYA_HINT)
        if key in values:
            raise UsageError(f"option --{opt} is given twice", file=where, hint=_KOHYA_HINT)
        value = value.strip()
        if key == "negative":
            values[key] = value
            continue
        try:
            values[key] = float(value) if key == "guidance" else int(value)
        except ValueError:
            kind = "a number" if key == "guidance" else "a whole number"
            raise UsageError(f"--{opt} ({key}) expects {kind}, got {value!r}", file=where, hint=_KOHYA_HINT) from None
    return values


def _validated(values: dict[str, Any], where: str) -> JobLine:
    import pydantic

    from krea2kit.validation import dotted

    if isinstance(values.get("guidance"), int) and not isinstance(values["guidance"], bool):
        values["guidance"] = float(values["guidance"])  # JSON 3 is a fine guidance, as TOML's is
    try:
        entry = JobLine.model_validate(values, strict=True)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = dotted(first["loc"]) or "line"
        key = "prompt" if key == "text" else key
        got = json.dumps(first.get("input"), default=str)
        raise UsageError(f"{key}: {first['msg'][0].lower()}{first['msg'][1:]}, got {got}", file=where,
                         hint=_RECORD_HINT) from None
    if not entry.text.strip():
        raise UsageError("the line has no prompt text", file=where, hint="put the prompt before the first --option")
    return entry


def load_lines(source: str, *, base: Path | None = None, stdin_text: str | None = None) -> list[SourceLine]:
    """Read and check a whole prompt source; at least one item, or a UsageError."""
    shown, text = read_source(source, base=base, stdin_text=stdin_text)
    lines = parse_source(text, shown)
    if not lines:
        raise UsageError("the prompt source holds no prompt (only blank or # lines)", file=shown,
                         hint="one prompt per line; see `krea2kit run --help`")
    return lines
