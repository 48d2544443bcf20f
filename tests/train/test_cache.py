"""The dataset cache: latents and prompt embeddings encoded once with the run's own parts,
re-encoded exactly when an image, a caption or the weights change, rebuilt into the encoder's
layout for a batch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from krea2kit.train.cache import collate, empty_prompt, encode_dataset
from krea2kit.train.dataset import DatasetSpec, load_item_pixels, scan_dataset


@pytest.fixture(scope="module")
def parts(tmp_path_factory, one_thread):
    """The nano preset's VAE and text-encoder parts, loaded the way `krea2kit run` loads them."""
    from krea2kit.api import Session
    from krea2kit.settings import CacheSettings, Settings

    tmp = tmp_path_factory.mktemp("cache-parts")
    session = Session(settings=Settings(cache=CacheSettings(dir=str(tmp / "user-cache"))))
    plan = session.plan(text='prompt = "x"\n[model]\npreset = "krea2-nano-raw"\n')
    quiet = lambda *a, **k: None  # noqa: E731
    vae = session.pipeline.part(plan, "vae", device="cpu", dtype="float32", events=quiet)
    te = session.pipeline.part(plan, "text_encoder", device="cpu", dtype="float32", events=quiet)
    return vae, te


def _dataset(root, captions):
    root.mkdir(exist_ok=True)
    for i, (colour, caption) in enumerate(captions):
        Image.new("RGB", (64, 64), colour).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return scan_dataset(DatasetSpec(path=str(root), resolution=64, repeats=2), base_dir=".")


class _Renamed:
    """A part with another identity (what new weights look like to the cache)."""

    def __init__(self, part, identity):
        self._part, self.identity = part, identity

    def __getattr__(self, name):
        return getattr(self._part, name)


def _counting(events):
    return lambda name, **data: events.append((name, data))


def test_encoded_once_then_read_back(parts, tmp_path):
    vae, te = parts
    scan = _dataset(tmp_path / "d", [((200, 30, 30), "a red square"), ((30, 30, 200), "a blue square"),
                                     ((30, 200, 30), "a red square")])
    events: list = []
    first = encode_dataset(scan, vae=vae, text_encoder=te, cache_dir=tmp_path / "c", events=_counting(events))
    done = dict(events)["cache_done"]
    assert done["latents_encoded"] == 3 and done["texts_encoded"] == 2  # repeats and the shared caption once
    assert len(first) == len(scan.items) == 6
    assert first[0].latent is first[1].latent  # a repeat shares its tensors
    # the latent is the VAE part's encoding of the framed picture, nothing else
    with torch.inference_mode():
        direct = vae.encode(load_item_pixels(scan.items[0]).unsqueeze(0))[0]
    torch.testing.assert_close(first[0].latent, direct, rtol=0, atol=0)
    events.clear()
    again = encode_dataset(scan, vae=vae, text_encoder=te, cache_dir=tmp_path / "c", events=_counting(events))
    done = dict(events)["cache_done"]
    assert done["latents_encoded"] == 0 and done["texts_encoded"] == 0 and done["latents_cached"] == 3
    for a, b in zip(first, again):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.text, b.text)
        assert (a.length, a.suffix_len, a.bucket, a.caption) == (b.length, b.suffix_len, b.bucket, b.caption)


def test_invalidated_by_what_changed_only(parts, tmp_path):
    vae, te = parts
    root = tmp_path / "d"
    scan = _dataset(root, [((200, 30, 30), "a red square"), ((30, 30, 200), "a blue square")])
    cache = tmp_path / "c"
    encode_dataset(scan, vae=vae, text_encoder=te, cache_dir=cache)

    def counts(scan, **swap):
        events: list = []
        encode_dataset(scan, vae=swap.get("vae", vae), text_encoder=swap.get("te", te), cache_dir=cache,
                       events=_counting(events))
        d = dict(events)["cache_done"]
        return d["latents_encoded"], d["texts_encoded"]

    (root / "1.txt").write_text("a blue circle")
    assert counts(scan_dataset(DatasetSpec(path=str(root), resolution=64), base_dir=".")) == (0, 1)
    Image.new("RGB", (64, 64), (200, 200, 30)).save(root / "0.png")
    scan = scan_dataset(DatasetSpec(path=str(root), resolution=64), base_dir=".")
    assert counts(scan) == (1, 0)
    assert counts(scan, vae=_Renamed(vae, "other-vae-weights")) == (2, 0)
    assert counts(scan, te=_Renamed(te, "other-encoder-weights")) == (0, 2)


def test_a_damaged_entry_is_recomputed_not_trusted(parts, tmp_path):
    vae, te = parts
    scan = _dataset(tmp_path / "d", [((200, 30, 30), "a red square")])
    good = encode_dataset(scan, vae=vae, text_encoder=te, cache_dir=tmp_path / "c")
    for f in (tmp_path / "c").rglob("*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-8:] = b"\xff" * 8  # flip the last tensor bytes: the checksum no longer matches
        f.write_bytes(bytes(data))
    events: list = []
    again = encode_dataset(scan, vae=vae, text_encoder=te, cache_dir=tmp_path / "c", events=_counting(events))
    done = dict(events)["cache_done"]
    assert done["corrupt"] == 2 and done["latents_encoded"] == 1 and done["texts_encoded"] == 1
    assert torch.equal(good[0].latent, again[0].latent) and torch.equal(good[0].text, again[0].text)


def test_collate_rebuilds_the_encoders_layout_with_caption_dropout(parts, tmp_path):
    vae, te = parts
    scan = _dataset(tmp_path / "d", [((200, 30, 30), "a red square at the top left, white background"),
                                     ((30, 30, 200), "two blue squares")])
    samples = encode_dataset(scan, vae=vae, text_encoder=te, cache_dir=tmp_path / "c")
    empty = empty_prompt(te)
    batch = [samples[0], samples[2], samples[3]]  # long caption, short caption, short again
    latents, text, mask = collate(batch, drop=[False, False, True], empty=empty)
    with torch.inference_mode():
        hidden, want_mask = te.encode([batch[0].caption, batch[1].caption, ""])
    assert latents.shape == (3, *samples[0].latent.shape)
    assert torch.equal(mask, want_mask)  # [prompt | padding | suffix] per row, as a run conditions
    torch.testing.assert_close(text, hidden, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="empty prompt"):
        collate(batch, drop=[True, False, False])
    # a batch never mixes buckets (the trainer batches one bucket at a time)
    odd = type(samples[0])(latent=torch.zeros(16, 4, 16), text=samples[0].text, text_mask=samples[0].text_mask,
                           caption="", bucket=(128, 32))
    with pytest.raises(ValueError, match="bucket"):
        collate([samples[0], odd])
