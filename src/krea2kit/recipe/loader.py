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

from krea2kit.errors import RecipeError
from krea2kit.recipe import SCHEMA_ID

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STDIN_NAME = "<stdin>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class LoadedRecipe:
    """A recipe after merging, before validation against the registry."""

    data: dict[str, Any]
    provenance: dict[str, str] = field(default_factory=dict)  # dotted key -> file that set it
    path: str = STDIN_NAME  # the top file ("<stdin>" for stdin)
    name: str = "stdin"  # used for {recipe} in file names

    def file_of(self, key: str) -> str:
        from krea2kit.recipe.errors import file_for

        return file_for(key, self.provenance, self.path) or self.path


def parse_toml(text: str, file: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", file=file, hint="check quotes, brackets and '=' near that line") from None


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


def _load_file(path: Path, chain: tuple[Path, ...], provenance: dict[str, str]) -> dict[str, Any]:
    shown = str(path)
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"'extends' forms a cycle: {cycle}", file=str(chain[-1]), key="extends")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = {"file": str(chain[-1]), "key": "extends"} if chain else {"file": shown}
        raise RecipeError(f"recipe file not found: {shown}", **where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe: {exc}", file=shown) from None
    data = parse_toml(text, shown)
    return _with_parents(data, path.parent, (*chain, path), shown, provenance)


def _with_parents(data: dict[str, Any], base_dir: Path, chain: tuple[Path, ...], shown: str,
                  provenance: dict[str, str]) -> dict[str, Any]:
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise RecipeError("expected a file name or a list of file names", file=shown, key="extends")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, _load_file((base_dir / parent).resolve(), chain, provenance))
    _record(data, shown, provenance)
    return deep_merge(merged, data)


def load_recipe_source(source: str, *, stdin_text: str | None = None) -> LoadedRecipe:
    """Load ``source`` (a path, ``-`` for stdin, or an image with an embedded recipe)."""
    provenance: dict[str, str] = {}
    if source == "-":
        text = stdin_text if stdin_text is not None else sys.stdin.read()
        data = parse_toml(text, STDIN_NAME)
        data = _with_parents(data, Path.cwd(), (), STDIN_NAME, provenance)
        return LoadedRecipe(data, provenance, STDIN_NAME, "stdin")
    path = Path(source).expanduser()
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_recipe_from_image(path)
    if path.is_dir():
        raise RecipeError("expected a recipe file, got a folder", file=str(path))
    data = _load_file(path.resolve(), (), provenance)
    # Name files as the user wrote them, not resolved absolute paths.
    resolved = str(path.resolve())
    provenance = {k: (str(path) if v == resolved else v) for k, v in provenance.items()}
    return LoadedRecipe(data, provenance, str(path), path.stem)


def load_recipe_from_image(path: Path) -> LoadedRecipe:
    """The fully resolved recipe embedded in an image krea2kit wrote."""
    if not path.is_file():
        raise RecipeError("image not found", file=str(path))
    from krea2kit.output.metadata import read_image_metadata

    try:
        meta = read_image_metadata(path)
    except Exception as exc:  # Pillow raises many types for broken files
        raise RecipeError(f"cannot read the image: {exc}", file=str(path)) from None
    recipe = (meta.get("krea2kit") or {}).get("recipe")
    if not isinstance(recipe, dict):
        raise RecipeError(
            "the image holds no krea2kit recipe",
            file=str(path),
            hint="only images written by krea2kit with output.metadata = true carry their recipe",
        )
    data = dict(recipe)
    provenance: dict[str, str] = {}
    _record(data, str(path), provenance)
    return LoadedRecipe(data, provenance, str(path), path.stem)


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
