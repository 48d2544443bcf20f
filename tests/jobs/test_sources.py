"""A job's prompt source: text lines, JSON lines, kohya-style lines, comments, and bad lines
named by file:line (nothing loads)."""

from __future__ import annotations

import pytest

from krea2kit.errors import EXIT_USAGE, UsageError
from krea2kit.jobs.sources import MAX_LINE_CHARS, load_lines, parse_source


def entries(text: str) -> list[dict]:
    return [line.entry.model_dump(exclude_none=True) for line in parse_source(text, "p.txt")]


def bad(text: str) -> UsageError:
    with pytest.raises(UsageError) as info:
        parse_source(text, "p.txt")
    assert info.value.exit_code == EXIT_USAGE
    return info.value


def test_plain_lines_comments_and_blanks():
    text = "\ufeff# a header comment\n\n  a red circle  \n   # indented comment\na blue square, #2 style\n"
    lines = parse_source(text, "p.txt")
    assert [line.entry.text for line in lines] == ["a red circle", "a blue square, #2 style"]
    assert [line.where for line in lines] == ["p.txt:3", "p.txt:5"]  # real line numbers, comments counted


def test_json_lines_carry_the_per_item_settings():
    got = entries('{"prompt": "a fox", "negative": "blurry", "seed": 7, "width": 64, "height": 48, '
                  '"steps": 4, "guidance": 3, "count": 2, "name": "fox"}\n{"text": "#1 fan"}\n')
    assert got[0] == {"text": "a fox", "negative": "blurry", "seed": 7, "width": 64, "height": 48, "steps": 4,
                      "guidance": 3.0, "count": 2, "name": "fox"}
    assert got[1]["text"] == "#1 fan"  # a prompt starting with '#' is written as a record


def test_kohya_lines():
    got = entries("a cat on a mat --n blurry, low quality --w 64 --h 48 --d 42 --l 7.5 --s 20\n"
                  "a dog -- not an option\n"
                  "UPPER --D 5\n")
    assert got[0] == {"text": "a cat on a mat", "negative": "blurry, low quality", "width": 64, "height": 48,
                      "seed": 42, "guidance": 7.5, "steps": 20}
    assert got[1] == {"text": "a dog -- not an option"}  # ' -- ' followed by a space is prompt text
    assert got[2] == {"text": "UPPER", "seed": 5}


@pytest.mark.parametrize("text, line, words", [
    ("ok\na fox --x 3\n", 2, ["unknown option --x", "--n NEGATIVE"]),
    ("a fox --w wide\n", 1, ["--w (width) expects a whole number", "'wide'"]),
    ("a fox --l high\n", 1, ["--l (guidance) expects a number"]),
    ("a fox --d 1 --d 2\n", 1, ["--d is given twice"]),
    ("a fox --w 8\n", 1, ["width", "greater than or equal to 16"]),
    ("a fox --s 0\n", 1, ["steps"]),
    ("--n only a negative\n", 1, ["no prompt text"]),
    ('{"prompt": "a", "width": "64"}\n', 1, ["width", "valid integer", '"64"']),
    ('{"prompt": "a", "seed": -1}\n', 1, ["seed"]),
    ('{"prompt": "a", "sampler": "heun"}\n', 1, ["unknown key 'sampler'"]),
    ('{"prompt": "a", "prompt": "b"}\n', 1, ["'prompt' appears twice"]),
    ('{"prompt": "a", "text": "b"}\n', 1, ["both 'prompt' and 'text'"]),
    ('{"negative": "b"}\n', 1, ["no 'prompt'"]),
    ('{"prompt": "a",}\n', 1, ["not valid JSON"]),
    ("[1, 2]\n", 1, []),  # not '{': a plain prompt, accepted (checked below)
    ('{"prompt": "a", "guidance": true}\n', 1, ["guidance"]),
    ("a\x1b[31m red fox\n", 1, ["control character"]),
])
def test_bad_lines_name_file_and_line(text, line, words):
    if not words:
        assert entries(text) == [{"text": text.strip()}]
        return
    err = bad(text)
    assert err.file == f"p.txt:{line}"
    shown = str(err)
    assert shown.startswith(f"p.txt:{line}: ")
    for word in words:
        assert word in shown
    assert err.hint  # every refusal says how to fix it


def test_an_overlong_line_is_refused_unparsed():
    err = bad("x" * (MAX_LINE_CHARS + 1) + "\n")
    assert "characters long" in err.message and err.file == "p.txt:1"


def test_files_stdin_and_empty_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a\n# c\nb\n")
    assert [x.where for x in load_lines("p.txt", base=tmp_path)] == [f"{tmp_path / 'p.txt'}:1",
                                                                    f"{tmp_path / 'p.txt'}:3"]
    assert [x.entry.text for x in load_lines("-", stdin_text="one\ntwo\n")] == ["one", "two"]
    assert load_lines("-", stdin_text="x\n")[0].where == "<stdin>:1"
    with pytest.raises(UsageError, match="holds no prompt"):
        load_lines("-", stdin_text="# nothing\n\n")
    with pytest.raises(UsageError, match="prompt file not found"):
        load_lines("missing.txt", base=tmp_path)
    with pytest.raises(UsageError, match="a folder, not a file"):
        load_lines(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_lines(str(tmp_path / "latin1.txt"))
