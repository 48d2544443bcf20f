"""Loading a recipe: TOML (or stdin), ``extends`` inheritance, ``--set`` overrides.

Every key remembers the file that set it (``provenance``), so an error found after
merging still names the right file. Tables merge key by key; arrays (``[[prompts]]``,
``[[loras]]``) are replaced whole by the file that sets them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krea2kit.errors import RecipeError, UsageError
from krea2kit.recipe import SCHEMA_ID
from krea2kit.tomlfiles import (MAX_NESTING, MAX_RECIPE_BYTES, FileTooLarge, NotARegularFile, check_nesting,
                                parse_toml, read_text_file, tomllib)

STDIN_NAME = "<stdin>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class LoadedRecipe:
    """A recipe after merging, before validation against the registry."""

    data: dict[str, Any]
    provenance: dict[str, str] = field(default_factory=dict)  # dotted key -> file that set it
    path: str = STDIN_NAME  # the top file ("<stdin>" for stdin)
    name: str = "stdin"  # used for {recipe} in file names
    # Set for a recipe read from an image (untrusted, see recipe/trust.py): the keys dropped
    # from it, and the LoRA files it names ({"name", "file", "sha256"}) without their paths.
    from_image: bool = False
    dropped: list[str] = field(default_factory=list)
    image_loras: list[dict[str, Any]] = field(default_factory=list)
    # ... and the init picture and mask it was made from: {"image": {"file", "sha256"}, "mask": {...}}
    image_init: dict[str, Any] = field(default_factory=dict)

    def file_of(self, key: str) -> str:
        from krea2kit.validation import file_for

        return file_for(key, self.provenance, self.path) or self.path


def _record(data: dict[str, Any], file: str, provenance: dict[str, str], prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        provenance[dotted] = file
        if isinstance(value, dict):
            _record(value, file, provenance, dotted)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ``extends`` may name a parent more than once and parents may share grandparents, so a few
# short lists nested a few levels deep would re-read the same files exponentially often (a
# list of 8 repeated 6 levels deep is 8**6 reads). Real recipes read a handful of files; one
# load reads at most this many (counting repeats) and chains at most this deep.
MAX_EXTENDS_FILES = 64
MAX_EXTENDS_DEPTH = 16


@dataclass
class _LoadState:
    """What one recipe load has read so far, shared by every ``extends`` it follows."""

    provenance: dict[str, str]
    files_read: int = 0


def _load_file(path: Path, chain: tuple[Path, ...], state: _LoadState) -> dict[str, Any]:
    shown = str(path)
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"'extends' forms a cycle: {cycle}", file=str(chain[-1]), key="extends")
    # A parent is named in the message; the top file is already named in front of it.
    where = {"file": str(chain[-1]), "key": "extends"} if chain else {"file": shown}
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise RecipeError(f"'extends' chains more than {MAX_EXTENDS_DEPTH} files deep (at {shown})", **where,
                          hint="a recipe needs a few levels of parents; flatten the chain")
    state.files_read += 1
    if state.files_read > MAX_EXTENDS_FILES:
        raise RecipeError(f"'extends' reads more than {MAX_EXTENDS_FILES} files in all (at {shown}); "
                          "parents named repeatedly are read again each time", **where,
                          hint="name each parent once; a parent shared by several files is merged once per mention")
    it = shown if chain else "it"
    try:
        text = read_text_file(path)
    except FileNotFoundError:
        # a parent is named after the message; the top file is already named in front of it
        raise RecipeError(f"recipe file not found: {shown}" if chain else "recipe file not found", **where) from None
    except NotARegularFile as exc:
        raise RecipeError(f"{it} is {exc.kind}, not a recipe file", **where,
                          hint="recipes and 'extends' name ordinary .toml files") from None
    except FileTooLarge as exc:
        raise RecipeError(f"{it} is {exc.size} bytes, more than a recipe may be ({MAX_RECIPE_BYTES} bytes)",
                          **where, hint="recipes are small text files; check the path") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start})", file=shown,
                          hint="save the recipe as UTF-8") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror or exc}", file=shown) from None
    data = parse_toml(text, shown)
    return _with_parents(data, path.parent, (*chain, path), shown, state)


def _with_parents(data: dict[str, Any], base_dir: Path, chain: tuple[Path, ...], shown: str,
                  state: _LoadState) -> dict[str, Any]:
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise RecipeError("expected a file name or a list of file names", file=shown, key="extends")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, _load_file((base_dir / parent).resolve(), chain, state))
    _record(data, shown, state.provenance)
    return deep_merge(merged, data)


def load_recipe_source(source: str, *, stdin_text: str | None = None) -> LoadedRecipe:
    """Load ``source`` (a path, ``-`` for stdin, or an image with an embedded recipe)."""
    provenance: dict[str, str] = {}
    if source == "-":
        text = stdin_text if stdin_text is not None else read_stdin_text("the recipe")
        data = parse_toml(text, STDIN_NAME)
        data = _with_parents(data, Path.cwd(), (), STDIN_NAME, _LoadState(provenance))
        return LoadedRecipe(data, provenance, STDIN_NAME, "stdin")
    path = Path(source).expanduser()
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_recipe_from_image(path)
    if path.is_dir():
        raise RecipeError("expected a recipe file, got a folder", file=str(path))
    data = _load_file(path.resolve(), (), _LoadState(provenance))
    # Name files as the user wrote them, not resolved absolute paths.
    resolved = str(path.resolve())
    provenance = {k: (str(path) if v == resolved else v) for k, v in provenance.items()}
    return LoadedRecipe(data, provenance, str(path), path.stem)


def load_recipe_from_image(path: Path) -> LoadedRecipe:
    """The recipe embedded in an image krea2kit wrote, as untrusted input: only what an image
    may decide is kept (:mod:`krea2kit.recipe.trust`); ``dropped`` lists the rest."""
    from krea2kit.recipe.trust import untrusted_recipe

    shown = str(path)
    if not path.is_file():
        raise RecipeError("image not found", file=shown)
    from krea2kit.output.metadata import read_image_metadata

    try:
        meta = read_image_metadata(path)
    except Exception as exc:  # Pillow raises many types for broken files
        raise RecipeError(f"cannot read the image: {exc}", file=shown) from None
    record = meta.get("krea2kit")
    no_recipe_hint = "only images written by krea2kit with output.metadata = true carry their recipe"
    if record is None:
        raise RecipeError("the image holds no krea2kit recipe", file=shown, hint=no_recipe_hint)
    if not isinstance(record, dict):
        raise RecipeError(f"the image's krea2kit record is a JSON {_json_kind(record)}, not an object",
                          file=shown, key="krea2kit", hint="the metadata is damaged or was not written by krea2kit")
    recipe = record.get("recipe")
    if recipe is None:
        raise RecipeError("the image holds no krea2kit recipe", file=shown, hint=no_recipe_hint)
    if not isinstance(recipe, dict):
        raise RecipeError(f"the image's recipe is a JSON {_json_kind(recipe)}, not an object",
                          file=shown, key="krea2kit.recipe",
                          hint="the metadata is damaged or was not written by krea2kit")
    check_nesting(recipe, shown)
    data, dropped = untrusted_recipe(recipe)
    loras = record.get("loras")
    image_loras = [x for x in loras if isinstance(x, dict)] if isinstance(loras, list) else []
    image_init = record.get("init") if isinstance(record.get("init"), dict) else {}
    provenance: dict[str, str] = {}
    _record(data, shown, provenance)
    return LoadedRecipe(data, provenance, shown, path.stem, from_image=True, dropped=dropped,
                        image_loras=image_loras, image_init=image_init)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def recorded_file(known: dict[str, Any]) -> str:
    """`` (the image records file 'x.png', sha256 ...)`` for a file an image names, or ``""``."""
    if not known.get("file"):
        return ""
    sha = f", sha256 {known['sha256']}" if known.get("sha256") else ""
    return f" (the image records file {known['file']!r}{sha})"


def check_image_loras(loaded: LoadedRecipe) -> None:
    """A LoRA named by an image is used only from a file the local user gives
    (``--set loras.N.path=FILE``); an image never chooses a local path."""
    loras = loaded.data.get("loras")
    if not loaded.from_image or not isinstance(loras, list):
        return
    for i, entry in enumerate(loras):
        if not isinstance(entry, dict) or "path" in entry:
            continue
        name = entry.get("name") or f"#{i}"
        known = next((x for x in loaded.image_loras if x.get("name") == entry.get("name")), {})
        raise RecipeError(
            f"the image uses LoRA {name!r}{recorded_file(known)}; an image never chooses a local file",
            file=loaded.path, key=f"loras.{i}.path",
            hint=f"give its file: --set loras.{i}.path=/path/to/{known.get('file') or 'lora.safetensors'}",
        )


def image_lora_mismatches(loaded: LoadedRecipe) -> list[str]:
    """For a recipe from an image: the LoRA files the user gave whose sha256 differs from
    the one the image records (the picture will then differ), as messages."""
    from krea2kit.recipe.trust import lora_identity

    loras = loaded.data.get("loras")
    if not loaded.from_image or not isinstance(loras, list):
        return []
    notes = []
    for i, entry in enumerate(loras):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        known = next((x for x in loaded.image_loras if x.get("name") == entry.get("name")), {})
        if not known.get("sha256"):
            continue
        given = lora_identity(str(Path(entry["path"]).expanduser())).get("sha256")
        if given is not None and given != known["sha256"]:
            notes.append(f"loras.{i}.path: the file given is not the one the image was made with "
                         f"(sha256 {given[:12]}…, the image records {known['sha256'][:12]}…); the result will differ")
    return notes


def image_init_mismatches(loaded: LoadedRecipe) -> list[str]:
    """For a recipe from an image: the init picture or mask the user gave whose sha256
    differs from the one the image records (the picture will then differ), as messages."""
    from krea2kit.recipe.init_image import file_sha256

    init = loaded.data.get("init")
    if not loaded.from_image or not isinstance(init, dict):
        return []
    notes = []
    for key in ("image", "mask"):
        known = loaded.image_init.get(key)
        if not isinstance(known, dict) or not known.get("sha256") or not isinstance(init.get(key), str):
            continue
        if not Path(init[key]).expanduser().is_file():  # never hash a FIFO; planning names the problem
            continue
        try:
            given = file_sha256(init[key])
        except OSError:
            continue  # a missing file is reported when the recipe is planned
        if given != known["sha256"]:
            notes.append(f"init.{key}: the file given is not the one the image was made with "
                         f"(sha256 {given[:12]}…, the image records {known['sha256'][:12]}…); the result will differ")
    return notes


# --------------------------------------------------------------------------- stdin
def read_stdin_text(what: str, *, limit: int = MAX_RECIPE_BYTES) -> str:
    """All of stdin as UTF-8 text (a byte-order mark is ignored), at most ``limit`` bytes;
    anything else is a usage error, exit 2, instead of a decoding traceback or reading an
    endless stream (``< /dev/zero``) into memory: at most ``limit + 1`` bytes are read."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # replaced by a text stream (tests, embedding applications)
        text = sys.stdin.read(limit + 1)  # characters: at least as many bytes, so over the limit is still seen
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            _stdin_too_large(what, limit)
    else:
        raw = _read_at_most(stream, limit + 1)
        if len(raw) > limit:
            _stdin_too_large(what, limit)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"stdin is not UTF-8 text (byte {exc.start}: 0x{raw[exc.start]:02x}); expected {what}",
                file=STDIN_NAME, hint="convert it first, e.g. iconv -f LATIN1 -t UTF-8",
            ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_at_most(stream: Any, size: int) -> bytes:
    """Up to ``size`` bytes; a pipe hands data over in pieces, so read until EOF or ``size``."""
    chunks, total = [], 0
    while total < size:
        chunk = stream.read(size - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _stdin_too_large(what: str, limit: int) -> None:
    raise UsageError(f"stdin holds more than {limit} bytes; expected {what}", file=STDIN_NAME,
                     hint="recipes and prompt lists are small text; check what is piped in")


PROMPT_RECORD_KEYS = ("prompt", "text", "negative", "seed", "count", "width", "height", "name")
_RECORD_HINT = ('a JSON record is one object per line, e.g. {"prompt": "a red fox", "seed": 7}; '
                'keys: prompt (or text), negative, seed, count, width, height, name')


def parse_prompt_lines(text: str, *, source: str = STDIN_NAME) -> list[str | dict[str, Any]]:
    """Prompts as ``--prompt -`` reads them, one rule for every line:

    * a blank (or whitespace-only) line is skipped;
    * a line whose first non-blank character is ``{`` is a JSON record: an object with
      ``prompt`` (or ``text``) and optionally ``negative``, ``seed``, ``count``, ``width``,
      ``height``, ``name``, checked exactly like a ``[[prompts]]`` entry; unknown keys,
      duplicate keys and invalid JSON are errors naming the line;
    * any other line, stripped of surrounding blanks, is one prompt, as it is (``#`` starts
      no comment). A prompt that itself starts with ``{`` is written as a record.

    Returns plain strings and ``[[prompts]]``-shaped dicts (``text`` and the keys given).
    """
    import json

    out: list[str | dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("{"):
            out.append(line)
            continue
        where = {"file": source, "key": f"line {n}"}

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            if repeated:
                raise UsageError(f"key {repeated[0]!r} appears twice in the JSON record", **where)
            return dict(pairs)

        try:
            obj = json.loads(line, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"a line starting with '{{' is a JSON record, and this one is not valid JSON: {exc.msg} "
                f"(column {exc.colno})", **where,
                hint="to use a prompt that starts with '{' as it is, write it as a record: "
                     + json.dumps({"prompt": line[:40] + ("..." if len(line) > 40 else "")}),
            ) from None
        out.append(_prompt_record(obj, where))
    return out


def _prompt_record(obj: Any, where: dict[str, str]) -> dict[str, Any]:
    import json

    import pydantic

    from krea2kit.validation import dotted
    from krea2kit.recipe.schema import PromptEntry

    if not isinstance(obj, dict):
        raise UsageError("a JSON record must be an object", **where, hint=_RECORD_HINT)
    unknown = [k for k in obj if k not in PROMPT_RECORD_KEYS]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in the JSON record", **where, hint=_RECORD_HINT)
    if "prompt" in obj and "text" in obj:
        raise UsageError("the JSON record has both 'prompt' and 'text'; give one", **where)
    entry = dict(obj)
    if "prompt" in entry:
        entry["text"] = entry.pop("prompt")
    if "text" not in entry:
        raise UsageError("the JSON record has no 'prompt'", **where, hint=_RECORD_HINT)
    try:  # the [[prompts]] schema, with JSON's own types taken strictly ("64" is not a width)
        PromptEntry.model_validate(entry, strict=True)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = dotted(first["loc"]) or "record"
        key = "prompt" if key == "text" else key
        got = first.get("input")
        raise UsageError(f"{key}: {first['msg'][0].lower()}{first['msg'][1:]}, got {json.dumps(got)}", **where,
                         hint=_RECORD_HINT) from None
    return entry


_SET_RE = re.compile(r"^\s*([A-Za-z_][\w-]*(?:\.[\w-]+)*)\s*=(.*)$", re.S)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is a TOML literal, or a bare string."""
    m = _SET_RE.match(text)
    if not m:
        raise RecipeError(f"--set expects KEY=VALUE with a dotted key, got {text!r}", key="--set",
                          hint="e.g. --set sampler.steps=4 or --set prompt='a red fox'")
    key, raw = m.group(1), m.group(2).strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: treat it as a string, like `--set model.device=cpu`
    except RecursionError:
        raise RecipeError(f"the value is nested more than {MAX_NESTING} levels deep", file="--set", key=key) from None
    check_nesting({key: value}, "--set")
    return key.split("."), value


def apply_overrides(loaded: LoadedRecipe, overrides: list[str]) -> None:
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = loaded.data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"no entry {part} in {'.'.join(parts[:i])}", key=".".join(parts), file="--set")
                node = node[int(part)]
                continue
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, (dict, list)):
                raise RecipeError(f"{'.'.join(parts[:i + 1])} is not a table", key=".".join(parts), file="--set")
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"no entry {last}", key=".".join(parts), file="--set")
            node[int(last)] = value
        else:
            node[last] = value
        key = ".".join(parts)
        loaded.provenance[key] = "--set"
        if isinstance(value, dict):
            _record(value, "--set", loaded.provenance, key)


def ensure_schema_id(loaded: LoadedRecipe) -> None:
    """A missing ``schema`` means the current version; another value is refused clearly."""
    value = loaded.data.setdefault("schema", SCHEMA_ID)
    if value != SCHEMA_ID:
        raise RecipeError(
            f"unsupported recipe schema {value!r}",
            file=loaded.file_of("schema"), key="schema",
            hint=f"this krea2kit reads schema = {SCHEMA_ID!r}",
        )
