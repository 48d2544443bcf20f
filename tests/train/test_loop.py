"""The training loop on the embedded nano Raw (CPU, 32x32 images, a few steps): adapters
learn, checkpoints are written atomically and pruned, the exported file reproduces the
trained model through krea2kit's own LoRA loader, a NaN stops cleanly, LoKr trains."""

from __future__ import annotations

import json
import math

import pytest
import torch

from krea2kit.errors import UsageError
from krea2kit.train import checkpoint as ckpt
from krea2kit.train.loop import Trainer, TrainingError, enable_gradient_checkpointing
from krea2kit.train.schema import TrainRecipe


def make_dataset(folder, n=3, size=32):
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (235, 235, 235))
        d = ImageDraw.Draw(im)
        for y in range(0, size, 6):
            d.rectangle([0, y, size - 1, y + 2], fill=(20, 20, 20))
        d.ellipse([8, 8, size - 8, size - 8], fill=[(200, 30, 30), (30, 160, 40), (30, 50, 200)][i % 3])
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(["a red circle", "a green circle", "a blue circle"][i % 3])
    return folder


def recipe(tmp_path, **over) -> TrainRecipe:
    data = {"name": "t", "steps": 4, "checkpoint_every": 2, "seed": 1, "caption_dropout": 0.25,
            "base": {"preset": "krea2-nano-raw"},
            "dataset": {"path": str(tmp_path / "data"), "resolution": 32, "trigger": "striped"},
            "adapter": {"rank": 2, "targets": ["attention"]},
            "optimizer": {"lr": 1e-3},
            "output": {"path": str(tmp_path / "out" / "t.safetensors"), "dtype": "float32"}}
    for k, v in over.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return TrainRecipe.model_validate(data)


def run(r, session, **kw):
    t = Trainer(r, session=session)
    try:
        return t, t.run(**kw)
    finally:
        t.close()


def test_trains_checkpoints_and_exports_what_it_trained(tmp_path, session):
    from krea2kit.lora.apply import attach_adapters
    from krea2kit.lora.formats import load_lora
    from krea2kit.train.objective import velocity

    make_dataset(tmp_path / "data")
    r = recipe(tmp_path, steps=6)
    events = []
    t = Trainer(r, session=session, events=lambda e, **d: events.append((e, d)))
    try:
        res = t.run()
        assert res.steps == 6 and len(res.losses) == 6 and all(math.isfinite(v) for v in res.losses)
        # up factors left zero-init: they moved
        assert all(torch.count_nonzero(ad.up) > 0 for _, ad in t.adapters.items())
        kept = ckpt.list_checkpoints(t.work_dir)
        assert [ckpt.checkpoint_step(p) for p in kept] == [4, 6]  # every 2 steps, newest KEEP=2 kept
        assert sorted(q.name for q in kept[-1].iterdir()) == ["adapter.safetensors", "optimizer.safetensors",
                                                              "rng.safetensors", "state.json"]
        state = json.loads((kept[-1] / "state.json").read_text())
        assert state["step"] == 6 and state["data_position"] == {"epoch": 2, "batch": 0}
        steps = [d["step"] for e, d in events if e == "train_step"]
        assert steps == [1, 2, 3, 4, 5, 6]
        # the file, read back by krea2kit's own loader, reproduces the trained model (fp32)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 4, 4, generator=g)
        txt = torch.randn(1, 6, t.dit.config.txtlayers, t.dit.config.txtdim, generator=g)
        tt = torch.tensor([0.6])
        with torch.no_grad():
            trained = velocity(t.dit, x, tt, txt, None)
            t.adapters.multiplier = 0.0
            base = velocity(t.dit, x, tt, txt, None)
            t.adapters.multiplier = 1.0
            lora = load_lora(res.path)
            assert lora.layout == "diffusers" and len(lora) == len(t.adapters.names)
            t.adapters.detach()
            with attach_adapters(t.dit, [lora]):
                loaded = velocity(t.dit, x, tt, txt, None)
        assert (trained - base).abs().max().item() > 1e-4
        err = (loaded - trained).abs().max().item()
        assert err <= 1e-5, err
    finally:
        t.close()


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, session, monkeypatch):
    make_dataset(tmp_path / "data")
    r = recipe(tmp_path, steps=6)
    t = Trainer(r, session=session)
    real = Trainer.loss

    def poisoned(self, step):
        loss = real(self, step)
        return loss * float("nan") if step == 2 else loss

    monkeypatch.setattr(Trainer, "loss", poisoned)
    try:
        with pytest.raises(TrainingError) as info:
            t.run()
    finally:
        t.close()
    msg = str(info.value)
    assert "step 3" in msg and "not finite" in msg and "ckpt-0000002" in msg and "hint:" in msg
    assert info.value.exit_code == 1
    kept = ckpt.list_checkpoints(t.work_dir)
    assert [ckpt.checkpoint_step(p) for p in kept] == [2]
    c = ckpt.load_checkpoint(kept[-1], restore_rng_state=False)
    assert all(torch.isfinite(v).all() for v in c.adapter.values())
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_lokr_trains_and_loads(tmp_path, session):
    from krea2kit.lora.formats import load_lora

    make_dataset(tmp_path / "data")
    r = recipe(tmp_path, steps=2, adapter={"kind": "lokr", "rank": 2, "targets": ["attention"]})
    t, res = run(r, session)
    lora = load_lora(res.path)
    assert lora.kinds() == {"lokr": len(t.adapters.names)}
    for name, ad in t.adapters.items():
        err = (lora.deltas[name].dense() - ad.dense().detach()).abs().max().item()
        assert err <= 1e-6, (name, err)


def test_refusals_before_loading(tmp_path, session):
    make_dataset(tmp_path / "data")
    out = tmp_path / "out" / "t.safetensors"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"x")
    with pytest.raises(UsageError, match="exists"):
        Trainer(recipe(tmp_path), session=session).run()
    r = recipe(tmp_path, output={"overwrite": True}, optimizer={"name": "adamw8bit"})
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        events = []
        t = Trainer(r, session=session, events=lambda e, **d: events.append(e))
        try:
            with pytest.raises(UsageError, match="bitsandbytes") as info:
                t.run()
        finally:
            t.close()
        assert info.value.key == "optimizer.name" and info.value.exit_code == 2
        assert "train_start" not in events and not t._loaded  # refused before anything loaded


def test_gradient_checkpointing_changes_no_gradient(tmp_path, session):
    make_dataset(tmp_path / "data")
    t = Trainer(recipe(tmp_path), session=session)
    try:
        t.load()
        grads = []
        for checkpointing in (False, True):
            undo = enable_gradient_checkpointing(t.dit) if checkpointing else None
            t.optimizer.zero_grad(set_to_none=True)
            t.loss(0).backward()
            grads.append([p.grad.clone() for p in t.params])
            if undo:
                undo()
        err = max((a - b).abs().max().item() for a, b in zip(*grads))
        assert err <= 1e-6, err
        assert any(g.abs().sum() > 0 for g in grads[0])
    finally:
        t.close()


def test_quantized_frozen_base_trains(tmp_path, session):
    """weights_dtype = "int8": the frozen transformer stays quantized (QuantLinear), the
    adapters hook the same modules and learn."""
    from krea2kit.models.quant.linear import QuantLinear

    make_dataset(tmp_path / "data")
    t = Trainer(recipe(tmp_path, steps=2, base={"preset": "krea2-nano-raw", "weights_dtype": "int8"},
                       adapter={"rank": 2, "targets": ["blocks"]}), session=session)
    try:
        res = t.run()
        quantized = [n for n in t.adapters.names if isinstance(t.dit.get_submodule(n), QuantLinear)]
        assert quantized and len(t.adapters.names) == 32  # 4 nano blocks x 8 Linears
        assert all(math.isfinite(v) for v in res.losses)
        assert all(torch.count_nonzero(ad.up) > 0 for _, ad in t.adapters.items())
    finally:
        t.close()


def test_samples_render_on_turbo_at_each_checkpoint(tmp_path, session):
    """[samples]: the prompts rendered on nano Turbo with the in-training adapter at every
    checkpoint, one contact sheet each, in the work folder; the trainer's own hooks stay on."""
    make_dataset(tmp_path / "data")
    events = []
    r = recipe(tmp_path, steps=2, checkpoint_every=1,
               samples={"prompts": ["striped, a red circle"], "width": 32, "height": 32})
    t = Trainer(r, session=session, events=lambda e, **d: events.append((e, d)))
    try:
        res = t.run()
        assert t.adapters.multiplier == 1.0
    finally:
        t.close()
    sheets = [p for p in res.samples if p.name.endswith("-samples.png")]
    assert [p.name for p in sheets] == ["step-000001-samples.png", "step-000002-samples.png"]
    assert all(p.is_file() and p.parent == t.work_dir / "samples" for p in sheets)
    assert [d["step"] for e, d in events if e == "samples" and d["path"] in sheets] == [1, 2]
