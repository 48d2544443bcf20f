"""The job manifest: one fsynced line per image, torn lines skipped, one run at a time, and
"finished" meaning an intact file with the recorded hash for the unchanged item."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from krea2kit.errors import UsageError
from krea2kit.jobs.manifest import Manifest, file_sha256, finished, read_lines


def line(index: int, path, sha: str, key: str = "k", status: str = "ok") -> dict:
    return {"index": index, "prompt": "p", "seed": index, "path": str(path), "sha256": sha, "status": status,
            "key": key}


def test_each_line_is_on_disk_when_append_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "out" / "job.manifest.jsonl"
    with Manifest(path) as m:
        m.append(line(0, "a.png", "0" * 64))
        assert len(synced) == 1
        assert [x["index"] for x in read_lines(path)] == [0]  # readable before the next image starts
        m.append(line(1, "b.png", "1" * 64))
        assert len(synced) == 2
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and all(json.loads(x) for x in raw.splitlines())


def test_a_torn_last_line_is_skipped_and_the_next_run_starts_clean(tmp_path):
    path = tmp_path / "job.manifest.jsonl"
    whole = json.dumps(line(0, "a.png", "0" * 64))
    path.write_text(whole + "\n" + whole[: len(whole) // 2])  # killed inside the second write
    assert [x["index"] for x in read_lines(path)] == [0]
    with Manifest(path) as m:
        m.append(line(1, "b.png", "1" * 64))
    assert [x["index"] for x in read_lines(path)] == [0, 1]


def test_one_run_of_a_job_at_a_time(tmp_path):
    path = tmp_path / "job.manifest.jsonl"
    with Manifest(path):
        with pytest.raises(UsageError, match="another run of this job"):
            Manifest(path).open()
    with Manifest(path):  # released when the first run ends
        pass


def test_finished_means_intact_file_same_hash_same_item(tmp_path):
    good, tampered, gone, changed, blocked = (tmp_path / f"{n}.png" for n in ("good", "tampered", "gone",
                                                                             "changed", "blocked"))
    for p in (good, tampered, changed):
        p.write_bytes(p.name.encode())
    sha = {p: hashlib.sha256(p.name.encode()).hexdigest() for p in (good, tampered, gone, changed)}
    assert file_sha256(good) == sha[good] and file_sha256(gone) is None and file_sha256(tmp_path) is None
    tampered.write_bytes(b"edited afterwards")
    lines = [
        line(0, good, "stale", key="k0"),  # an earlier attempt: the later line wins
        line(0, good, sha[good], key="k0"),
        line(1, tampered, sha[tampered], key="k1"),
        line(2, gone, sha[gone], key="k2"),
        line(3, changed, sha[changed], key="old"),  # the job's line 3 changed since
        line(4, blocked, "", key="k4", status="blocked"),
        line(9, good, sha[good], key="k9"),  # not an item of this job any more
    ]
    keys = {i: f"k{i}" for i in range(5)}
    assert list(finished(lines, keys)) == [0]
