"""The training dataset: scanning a folder or a manifest, skipping bad files, buckets, framing."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from krea2kit.errors import EXIT_USAGE, RecipeError
from krea2kit.train.dataset import (
    DatasetSpec, bucket_sizes, choose_bucket, dataset_hash, load_item_pixels, scan_dataset,
)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _image(path: Path, size=(64, 64), colour=(200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    _image(d / "a.png")
    (d / "a.txt").write_text("a red square\n")
    _image(d / "sub" / "wide.jpg", size=(128, 64), colour=(20, 20, 200))
    (d / "sub" / "wide.txt").write_text("a blue field")
    _image(d / "nocaption.png")
    (d / "broken.png").write_bytes(b"not an image at all")
    (d / "broken.txt").write_text("x")
    _image(d / "latin1.png")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _png_header_only(d / "bomb.png", 20000, 20000)
    (d / "bomb.txt").write_text("huge")
    (d / ".hidden").mkdir()
    _image(d / ".hidden" / "skip.png")
    (d / ".hidden" / "skip.txt").write_text("never read")
    (d / "notes.md").write_text("not an image")
    return d


def test_folder_scan_keeps_good_pairs_and_reports_each_bad_file(folder):
    scan = scan_dataset(DatasetSpec(path=str(folder), resolution=64), base_dir="/")
    assert sorted(i.image_path.name for i in scan.unique) == ["a.png", "wide.jpg"]
    reasons = dict(scan.skipped)
    assert set(reasons) == {"nocaption.png", "broken.png", "latin1.png", "bomb.png"}
    assert "no caption file nocaption.txt" in reasons["nocaption.png"]
    assert "not an image" in reasons["broken.png"]
    assert "UTF-8" in reasons["latin1.png"]
    assert "pixels" in reasons["bomb.png"]  # refused from its header, never decoded
    captions = {i.image_path.name: i.caption for i in scan.unique}
    assert captions == {"a.png": "a red square", "wide.jpg": "a blue field"}
    report = "\n".join(scan.report())
    assert "2 image(s)" in report and "4 skipped" in report and "bomb.png" in report


def test_trigger_repeats_and_relative_path(folder):
    spec = DatasetSpec(path="data", resolution=64, repeats=3, trigger="zq style")
    scan = scan_dataset(spec, base_dir=folder.parent)
    assert len(scan.items) == 6 and len(scan.unique) == 2
    assert scan.items.count(scan.unique[0]) == 3  # the same object: cached once
    assert all(i.caption.startswith("zq style, ") for i in scan.unique)


def test_buckets_follow_the_aspect_ratio():
    for res, mult in ((64, 16), (1024, 16), (768, 16)):
        sizes = bucket_sizes(res, mult)
        assert sizes[0] == (res, res)
        for w, h in sizes:
            assert w % mult == 0 and h % mult == 0 and w * h <= res * res
            assert max(w, h) / min(w, h) <= 4
        assert {(h, w) for w, h in sizes} == set(sizes)  # portrait and landscape alike
    w, h = choose_bucket(1920, 1080, 1024)
    assert w > h and abs(w / h - 16 / 9) < 0.1
    assert choose_bucket(1080, 1920, 1024) == (h, w)
    assert choose_bucket(3000, 1000, 1024, buckets=False) == (1024, 1024)


def test_wide_image_gets_a_wide_bucket_and_is_centre_cropped(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    im = Image.new("RGB", (192, 64), (255, 0, 0))  # red | green | blue thirds
    im.paste((0, 255, 0), (64, 0, 128, 64))
    im.paste((0, 0, 255), (128, 0, 192, 64))
    im.save(d / "x.png")
    (d / "x.txt").write_text("stripes")
    wide = scan_dataset(DatasetSpec(path=str(d), resolution=64), base_dir=".").unique[0]
    assert wide.bucket[0] > wide.bucket[1] and wide.size == (192, 64)
    pixels = load_item_pixels(wide)
    assert tuple(pixels.shape) == (3, wide.bucket[1], wide.bucket[0])
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    square = scan_dataset(DatasetSpec(path=str(d), resolution=64, buckets=False), base_dir=".").unique[0]
    assert square.bucket == (64, 64)
    px = load_item_pixels(square)
    # cover + centre crop keeps the middle third: green, not a squeezed red/green/blue
    centre = px[:, 32, 32]
    assert centre[1] > 0.9 and centre[0] < -0.9 and centre[2] < -0.9


def test_manifest(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "one.png")
    _image(tmp_path / "img" / "two.png", size=(64, 128))
    lines = [json.dumps({"image": "img/one.png", "caption": "first"}), "{not json",
             json.dumps({"image": "img/two.png", "caption": "second"}), json.dumps({"image": "img/missing.png",
                                                                                   "caption": "gone"}),
             json.dumps({"caption": "no image"}), json.dumps({"image": "img/one.png"}), ""]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    scan = scan_dataset(DatasetSpec(manifest="train.jsonl", resolution=64), base_dir=tmp_path)
    assert [i.caption for i in scan.unique] == ["first", "second"]
    assert scan.unique[1].bucket[1] > scan.unique[1].bucket[0]
    assert len(scan.skipped) == 4
    assert any("not found" in why for _, why in scan.skipped)


def test_no_usable_image_is_a_clear_usage_error(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    _image(d / "only.png")  # no caption
    with pytest.raises(RecipeError) as err:
        scan_dataset(DatasetSpec(path=str(d)), base_dir=".", recipe_file="train.toml")
    e = err.value
    assert e.exit_code == EXIT_USAGE and e.key == "dataset.path" and e.file == "train.toml"
    assert str(d) in e.message and "only.png" in e.message and ".txt" in (e.hint or "")
    with pytest.raises(RecipeError, match="does not exist"):
        scan_dataset(DatasetSpec(path=str(tmp_path / "nope")), base_dir=".")


def test_spec_is_strict():
    from pydantic import ValidationError

    for bad in ({"path": "a", "manifest": "b"}, {}, {"path": "a", "resolutoin": 64}, {"path": "a", "repeats": 0},
                {"path": "a", "caption_ext": "txt"}, {"path": "a", "resolution": "64"}):
        with pytest.raises(ValidationError):
            DatasetSpec(**bad)


def test_dataset_hash_follows_content_not_names(folder, tmp_path):
    spec = DatasetSpec(path=str(folder), resolution=64)
    first = dataset_hash(scan_dataset(spec, base_dir="."))
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert dataset_hash(scan_dataset(DatasetSpec(path=str(moved), resolution=64), base_dir=".")) == first
    (moved / "a.txt").write_text("a red square, edited")
    second = dataset_hash(scan_dataset(DatasetSpec(path=str(moved), resolution=64), base_dir="."))
    assert second != first
    _image(moved / "a.png", colour=(201, 30, 30))
    assert dataset_hash(scan_dataset(DatasetSpec(path=str(moved), resolution=64), base_dir=".")) != second


def test_through_the_cli_dry_run(folder, tmp_path, cli_inproc):
    """`krea2kit train --dry-run` scans the data and reports skips; an empty dataset is exit 2."""
    recipe = tmp_path / "t.toml"
    recipe.write_text(f'schema = "krea2kit.train/1"\n[base]\npreset = "krea2-nano-raw"\n'
                      f'[dataset]\npath = "{folder}"\nresolution = 64\n')
    res = cli_inproc("train", str(recipe), "--dry-run", "--json")
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["images"] == 2 and info["skipped"] == 4 and len(info["dataset_hash"]) == 64
    assert "bomb.png" in res.stderr and "no caption file nocaption.txt" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe.write_text(f'schema = "krea2kit.train/1"\n[base]\npreset = "krea2-nano-raw"\n'
                      f'[dataset]\npath = "{empty}"\n')
    res = cli_inproc("train", str(recipe), "--dry-run")
    assert res.code == EXIT_USAGE
    assert "dataset.path" in res.stderr and str(empty) in res.stderr and "hint:" in res.stderr
    assert "Traceback" not in res.stderr


def test_exif_orientation_is_applied(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    im = Image.new("RGB", (128, 64), (10, 10, 10))
    im.paste((250, 250, 250), (0, 0, 64, 64))  # stored: white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display" (a portrait phone photo)
    im.save(d / "p.jpg", exif=exif.tobytes(), quality=95)
    (d / "p.txt").write_text("a photo")
    item = scan_dataset(DatasetSpec(path=str(d), resolution=64), base_dir=".").unique[0]
    assert item.size == (64, 128) and item.bucket[1] > item.bucket[0]  # portrait, as shown
    px = load_item_pixels(item)
    assert px[:, 4, px.shape[2] // 2].mean() > 0.8 and px[:, -4, px.shape[2] // 2].mean() < -0.8  # white on top
