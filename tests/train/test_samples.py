"""Checkpoint samples: the in-training adapter rendered on nano Turbo through the run path,
the same pixels `krea2kit run` gives with the exported file, and a labelled contact sheet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from krea2kit.lora.formats import LoraDelta
from krea2kit.train.samples import render_samples, sheet_path

PROMPT = "a red circle on the left, white background"


@pytest.fixture(scope="module")
def session(tmp_path_factory, one_thread):
    from krea2kit.api import Session
    from krea2kit.settings import CacheSettings, Settings

    return Session(settings=Settings(cache=CacheSettings(dir=str(tmp_path_factory.mktemp("samples-cache")))))


def _adapter(seed=0):
    """A random LoRA on the nano transformer's block projections."""
    from importlib.resources import files

    import krea2kit
    from krea2kit.models.dit_loader import load_dit

    model = load_dit(str(files(krea2kit) / "nano/weights/turbo"))
    g = torch.Generator().manual_seed(seed)
    return {n: LoraDelta(n, "lora", {"down": torch.randn(4, m.in_features, generator=g) * 0.2,
                                     "up": torch.randn(m.out_features, 4, generator=g) * 0.2})
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_samples_on_turbo_with_strengths_and_a_sheet(session, tmp_path):
    out = tmp_path / "samples"
    paths = render_samples(_adapter(), [PROMPT], out_dir=out, step=12, turbo_preset="krea2-nano-turbo",
                           strength=[0.0, 1.0], baseline=True, session=session)
    names = [p.name for p in paths]
    assert names == ["turbo-base-00.png", "turbo-s0-00.png", "turbo-s1-00.png", sheet_path(out, 12).name]
    base, zero, one = (_pixels(p) for p in paths[:3])
    assert np.array_equal(base, zero)  # strength 0 is the model itself
    assert np.abs(base - one).mean() > 2  # the adapter changes the image
    with Image.open(paths[-1]) as sheet:
        assert sheet.width >= 3 * 64 and sheet.height >= 64
    assert not [p for p in (out / "step-000012").iterdir() if p.name.startswith(".")]  # the adapter file is gone


def test_a_sample_is_what_run_makes_with_the_exported_file(session, tmp_path, cli_inproc):
    from krea2kit.train.export import save_adapter

    state = _adapter(seed=1)
    (sample,) = render_samples(state, [PROMPT], out_dir=tmp_path / "s", step=1, turbo_preset="krea2-nano-turbo",
                               strength=0.8, seed=5, session=session, sheet=False)
    lora = save_adapter(state, tmp_path / "style.safetensors", metadata={"steps": 1})
    (tmp_path / "r.toml").write_text(
        f'prompt = "{PROMPT}"\nseed = 5\n[model]\npreset = "krea2-nano-turbo"\n'
        f'[[loras]]\npath = "{lora}"\nstrength = 0.8\n[output]\ndir = "{tmp_path / "run"}"\n')
    res = cli_inproc("run", str(tmp_path / "r.toml"))
    assert res.code == 0, res.stderr
    assert np.array_equal(_pixels(sample), _pixels(res.stdout.strip()))


def test_no_prompts_renders_nothing(session, tmp_path):
    assert render_samples(_adapter(), [], out_dir=tmp_path, step=1, session=session) == []


def test_trainer_samples_on_turbo_and_raw_leave_training_unchanged(session, tmp_path):
    """``[samples]`` of a training run: Turbo and Raw sheets per checkpoint; the Raw samples come
    from the very transformer being trained (its training hooks off, the adapter applied as
    exported), and rendering them changes nothing in the training itself."""
    from safetensors.torch import load_file

    from krea2kit.train.loop import Trainer
    from krea2kit.train.schema import TrainRecipe

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["a red square", "a blue square"][i])

    def train(folder, prompts):
        recipe = TrainRecipe.model_validate({
            "name": "s", "steps": 4, "checkpoint_every": 2, "seed": 3, "base": {"preset": "krea2-nano-raw"},
            "dataset": {"path": str(data), "resolution": 64}, "adapter": {"rank": 2, "targets": ["attention"]},
            "optimizer": {"lr": 1e-2}, "samples": {"prompts": prompts, "on": ["turbo", "raw"], "seed": 2},
            "output": {"path": str(folder / "s.safetensors"), "dtype": "float32"}})
        trainer = Trainer(recipe, session=session)
        try:
            result = trainer.run()
            assert trainer.adapters.multiplier == 1.0
        finally:
            trainer.close()
        return result

    with_samples = train(tmp_path / "a", [PROMPT])
    without = train(tmp_path / "b", [])
    a, b = load_file(str(with_samples.path)), load_file(str(without.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in with_samples.samples)
    assert names == sorted(["turbo-s1-00.png", "raw-s1-00.png"] * 2
                           + ["step-000002-samples.png", "step-000004-samples.png"])
    # the last Raw sample is what a fresh render of Raw with the exported file gives
    raw_last = [p for p in with_samples.samples if p.name == "raw-s1-00.png" and "000004" in str(p)][0]
    (fresh,) = render_samples(with_samples.path, [PROMPT], out_dir=tmp_path / "fresh", step=4, turbo_preset=None,
                              raw_preset="krea2-nano-raw", seed=2, session=session, sheet=False,
                              raw_model={"device": "auto", "dtype": "auto", "offload": "none"})
    assert np.array_equal(_pixels(raw_last), _pixels(fresh))
