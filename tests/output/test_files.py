"""The shared atomic-write helper: names claimed atomically (never given twice, even to
concurrent processes), no temporary file left behind, leftovers never look like results."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from krea2kit import files
from krea2kit.files import (NameTaken, OutputError, atomic_save, atomic_write, is_temp_name,
                                   numbered_names, remove_temp_files, temp_name_for)
from krea2kit.output.metadata import ImageMetadata
from krea2kit.output.writers import write_image


def _write(data: bytes):
    return lambda fp: fp.write(data)


def test_new_name_is_written_whole_and_no_temp_file_remains(tmp_path):
    path = atomic_write(tmp_path / "a.bin", _write(b"hello"))
    assert path == tmp_path / "a.bin" and path.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_existing_name_is_refused_kept_numbered_or_replaced(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"mine")
    with pytest.raises(NameTaken, match="already exists") as err:
        atomic_write(target, _write(b"new"))
    assert err.value.exit_code == 2
    assert target.read_bytes() == b"mine"
    second = atomic_write(target, _write(b"new"), numbered=True)
    assert second == tmp_path / "a-2.png" and second.read_bytes() == b"new"
    third = atomic_write(target, _write(b"newer"), numbered=True)
    assert third == tmp_path / "a-3.png"
    assert atomic_write(target, _write(b"replaced"), overwrite=True) == target
    assert target.read_bytes() == b"replaced"
    assert sorted(os.listdir(tmp_path)) == ["a-2.png", "a-3.png", "a.png"]


def test_numbered_names():
    names = numbered_names(Path("d/x.v1.png"))
    assert [next(names) for _ in range(3)] == [Path("d/x.v1.png"), Path("d/x.v1-2.png"), Path("d/x.v1-3.png")]


def test_failure_while_writing_leaves_nothing(tmp_path):
    def fail(fp):
        fp.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        atomic_write(tmp_path / "a.bin", fail)
    assert os.listdir(tmp_path) == []
    assert not files._live


def test_keyboard_interrupt_while_writing_leaves_nothing(tmp_path):
    def interrupted(fp):
        fp.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.bin", interrupted)
    assert os.listdir(tmp_path) == []


def test_remove_temp_files_cleans_what_is_in_flight(tmp_path):
    """The CLI's last resort on Ctrl-C/SIGTERM: a signal inside the writer's own cleanup."""
    seen = []

    def snapshot_then_cleanup(fp):
        fp.write(b"x")
        seen.extend(p for p in os.listdir(tmp_path))
        remove_temp_files()  # what cli._interrupted does before os._exit
        seen.append(len(os.listdir(tmp_path)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.png", snapshot_then_cleanup)
    assert len(seen) == 2 and is_temp_name(seen[0]) and seen[1] == 0


def test_temp_names_are_hidden_never_images_and_fit(tmp_path):
    long = tmp_path / ("n" * 251 + ".png")
    tmp = temp_name_for(long)
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and is_temp_name(tmp.name)
    assert files.TEMP_MARK in tmp.name and str(os.getpid()) in tmp.name
    assert not tmp.name.endswith((".png", ".jpg", ".jpeg", ".webp"))
    assert len(tmp.name.encode()) <= 255
    assert temp_name_for(long) != tmp  # random part: two writers in one process never collide


def test_a_leftover_temp_file_neither_blocks_the_name_nor_is_taken_for_an_image(tmp_path, cli):
    """What a SIGKILLed writer leaves: a hidden temp file with half an image in it."""
    leftover = temp_name_for(tmp_path / "out" / "img-00-3.png")
    leftover.parent.mkdir()
    leftover.write_bytes(b"\x89PNG\r\n\x1a\n half")
    path = atomic_write(tmp_path / "out" / "img-00-3.png", _write(b"whole"))
    assert path.name == "img-00-3.png"
    res = cli("run", str(leftover))  # not an image krea2kit would read as a recipe
    assert res.code == 2 and "Traceback" not in res.stderr


def test_without_hard_links_an_exclusive_placeholder_claims_the_name(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first = atomic_write(tmp_path / "a.png", _write(b"one"), numbered=True)
    second = atomic_write(tmp_path / "a.png", _write(b"two"), numbered=True)
    assert (first.name, second.name) == ("a.png", "a-2.png")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    with pytest.raises(NameTaken):
        atomic_write(tmp_path / "a.png", _write(b"three"))
    assert sorted(os.listdir(tmp_path)) == ["a-2.png", "a.png"]


def test_atomic_save_for_libraries_that_write_by_name(tmp_path):
    out = atomic_save(tmp_path / "w.safetensors", lambda tmp: Path(tmp).write_bytes(b"tensors"))
    assert out.read_bytes() == b"tensors"
    with pytest.raises(NameTaken):
        atomic_save(out, lambda tmp: Path(tmp).write_bytes(b"other"))
    assert out.read_bytes() == b"tensors" and os.listdir(tmp_path) == ["w.safetensors"]


def test_threads_racing_for_one_name_keep_every_file(tmp_path):
    start = threading.Barrier(8)
    results: list[Path] = []

    def worker(i: int) -> None:
        start.wait()
        results.append(atomic_write(tmp_path / "img.png", _write(f"image {i}".encode()), numbered=True))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 8
    assert sorted(p.read_bytes() for p in results) == sorted(f"image {i}".encode() for i in range(8))
    assert len(os.listdir(tmp_path)) == 8


def _race_worker(folder: str, i: int, start, queue) -> None:
    start.wait()
    im = Image.new("RGB", (8, 8), (i * 20, 0, 0))
    path = write_image(im, Path(folder) / "same-name.png", metadata=ImageMetadata(parameters=f"image {i}"),
                       numbered=True)
    queue.put((i, str(path)))


def test_processes_racing_for_one_name_keep_every_image(tmp_path):
    """Two (here six) runs writing into one folder with the same name template: every image
    is kept under its own path, and each path holds the image its process reported."""
    ctx = multiprocessing.get_context("spawn")  # no torch state forked; like separate runs
    start = ctx.Barrier(6)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), i, start, queue)) for i in range(6)]
    for p in procs:
        p.start()
    reported = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(reported.values())) == 6
    for i, path in reported.items():
        with Image.open(path) as im:
            assert im.getpixel((0, 0)) == (i * 20, 0, 0)
    assert sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in reported.values())
