"""The append-only JSONL audit log."""

import json
import multiprocessing as mp
import os
import stat

import pytest

from krea2kit.safety.audit import AuditLog, prompt_sha256
from krea2kit.safety.verdict import Decision, Verdict

DEC = Decision("prompt", (Verdict("krea2kit.prompt", "1.0+ab", "block", "sexual/minors", None, "rule x"),
                          Verdict("other", "2", "allow", None, 0.125, "")))


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_line_per_verdict_hash_mode(tmp_path):
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")
    assert log.record("run-1", "prompt", "secret prompt", DEC) == 2
    rows = _read(log.path)
    assert [r["filter"] for r in rows] == ["krea2kit.prompt", "other"]
    r = rows[0]
    assert r["run_id"] == "run-1" and r["kind"] == "prompt" and r["item"] is None
    assert r["filter_version"] == "1.0+ab" and r["action"] == "block" and r["decision"] == "block"
    assert r["category"] == "sexual/minors" and r["score"] is None and rows[1]["score"] == 0.125
    assert r["prompt_sha256"] == prompt_sha256("secret prompt")
    assert r["time"].endswith("Z") and r["time"][:4].isdigit()
    assert "secret prompt" not in log.path.read_text(encoding="utf-8")
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600


def test_text_and_none_modes_and_image_records(tmp_path):
    text = AuditLog(tmp_path / "t.jsonl", prompt_mode="text")
    text.record("r", "prompt", "a cat", DEC)
    assert _read(text.path)[0]["prompt"] == "a cat"
    none = AuditLog(tmp_path / "n.jsonl", prompt_mode="none")
    img = Decision("image", (Verdict("nsfw", "1", "allow", None, 0.01),))
    none.record("r", "image", "out/0001.png", img, prompt="a cat")
    row = _read(none.path)[0]
    assert row["item"] == "out/0001.png" and "prompt" not in row and "prompt_sha256" not in row
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "x", prompt_mode="plain")


def test_append_only_and_unfiltered_runs_are_logged(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", fsync=True)
    log.record("r1", "prompt", "p", DEC)
    log.record("r2", "image", "img", Decision("image", ()), extra={"unfiltered": True})
    rows = list(log)
    assert [r["run_id"] for r in rows] == ["r1", "r1", "r2"]
    assert rows[2]["filter"] is None and rows[2]["action"] == "allow" and rows[2]["unfiltered"] is True


def _writer(path, worker, n):
    log = AuditLog(path)
    for i in range(n):
        log.record(f"w{worker}-{i}", "prompt", "x" * (worker * 300 + i), DEC)


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = tmp_path / "c.jsonl"
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    procs = [ctx.Process(target=_writer, args=(path, w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = _read(path)  # every line parses: no torn writes
    assert len(rows) == 4 * 100 * 2
    # the two lines of one record stay adjacent
    for a, b in zip(rows[::2], rows[1::2]):
        assert a["run_id"] == b["run_id"] and (a["filter"], b["filter"]) == ("krea2kit.prompt", "other")
