"""Interrupted training resumes bit for bit on the CPU: a run stopped (Ctrl-C) between
checkpoints and resumed from the last one ends with exactly the adapter, losses and
optimizer state of an uninterrupted run. Checkpoints hold no pickles and are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from krea2kit.errors import UsageError
from krea2kit.train import checkpoint as ckpt
from krea2kit.train.loop import Trainer
from krea2kit.train.schema import TrainRecipe


def _dataset(folder):
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i, (w, h) in enumerate([(32, 32), (32, 32), (48, 24), (32, 32)]):  # two buckets
        im = Image.new("RGB", (w, h), (230, 230, 230))
        ImageDraw.Draw(im).rectangle([4, 4, w // 2, h // 2], fill=(40 * i, 90, 200 - 40 * i))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square number {i}")


def _recipe(tmp_path, **over):
    data = {"name": "r", "steps": 7, "checkpoint_every": 3, "seed": 5, "batch_size": 2, "caption_dropout": 0.3,
            "base": {"preset": "krea2-nano-raw"},
            "dataset": {"path": str(tmp_path / "data"), "resolution": 32},
            "adapter": {"rank": 2, "targets": ["attention", "first"]},
            "optimizer": {"lr": 2e-3}, "schedule": {"kind": "cosine", "warmup": 2},
            "output": {"path": str(tmp_path / "out" / "r.safetensors"), "dtype": "float32"}}
    data.update(over)
    return TrainRecipe.model_validate(data)


def _final(trainer):
    opt = ckpt.optimizer_to_files(trainer.optimizer)[0]
    return trainer.adapters.tensors(), opt


def test_interrupted_run_resumes_bit_for_bit(tmp_path, session):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _dataset(tmp_path / "a" / "data")
    _dataset(tmp_path / "b" / "data")

    straight = Trainer(_recipe(tmp_path / "a"), session=session)
    try:
        res_a = straight.run()
        adapter_a, opt_a = _final(straight)
    finally:
        straight.close()

    class Stop(KeyboardInterrupt):
        pass

    def ctrl_c_at_5(event, **data):
        if event == "train_step" and data["step"] == 5:
            raise Stop()

    first = Trainer(_recipe(tmp_path / "b"), session=session, events=ctrl_c_at_5)
    try:
        with pytest.raises(Stop):
            first.run()
    finally:
        first.close()
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(first.work_dir)] == [3]
    assert not (tmp_path / "b" / "out" / "r.safetensors").exists()

    # without --resume the checkpoints are not silently overwritten
    with pytest.raises(UsageError, match="--resume"):
        Trainer(_recipe(tmp_path / "b"), session=session).run()

    # torch's global generator is restored from the checkpoint too: disturb it first
    torch.manual_seed(12345)
    events = []
    second = Trainer(_recipe(tmp_path / "b"), session=session, events=lambda e, **d: events.append((e, d)))
    try:
        res_b = second.run(resume=True)
        adapter_b, opt_b = _final(second)
    finally:
        second.close()
    assert [d["step"] for e, d in events if e == "resumed"] == [3]
    assert res_b.start_step == 3 and res_b.losses == res_a.losses  # losses 1-3 from the checkpoint, 4-7 redone
    assert adapter_a.keys() == adapter_b.keys() and opt_a.keys() == opt_b.keys()
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    from safetensors.torch import load_file

    fa, fb = load_file(str(res_a.path)), load_file(str(res_b.path))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_resume_refuses_another_recipe_and_extends_steps(tmp_path, session):
    _dataset(tmp_path / "data")
    t = Trainer(_recipe(tmp_path, steps=3), session=session)
    try:
        t.run()
    finally:
        t.close()
    other = Trainer(_recipe(tmp_path, steps=4, optimizer={"lr": 1e-2}, output={
        "path": str(tmp_path / "out" / "r.safetensors"), "overwrite": True}), session=session)
    try:
        with pytest.raises(UsageError, match="different recipe") as info:
            other.run(resume=True)
        assert "optimizer.lr" in str(info.value) and "-> 0.01" in str(info.value)  # names what changed
    finally:
        other.close()
    more = Trainer(_recipe(tmp_path, output={"path": str(tmp_path / "out" / "r.safetensors"), "overwrite": True,
                                             "dtype": "float32"}), session=session)
    try:
        res = more.run(resume=True, steps=5)  # more steps, same trajectory: allowed
    finally:
        more.close()
    assert res.start_step == 3 and res.steps == 5 and len(res.losses) == 5


def test_checkpoints_are_safetensors_and_json_and_atomic(tmp_path):
    ads = {"m.down": torch.randn(2, 3), "m.up": torch.zeros(4, 2)}
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 1, adapter=ads, optimizer=opt, state={"fingerprint": "f"})
    for f in path.iterdir():  # no pickle anywhere: safetensors headers or JSON
        head = f.read_bytes()[:2]
        assert f.suffix in (".safetensors", ".json") and head != b"\x80\x04"
    state = json.loads((path / "state.json").read_text())
    assert state["format"] == ckpt.FORMAT and state["optimizer"]["param_groups"][0]["lr"] == 0.1
    # a half-written checkpoint (killed mid-write) is never taken for one, and is cleaned up
    stale = tmp_path / ".ckpt-tmp-999-dead"
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"partial")
    assert ckpt.list_checkpoints(tmp_path) == [path]
    ckpt.remove_stale_temps(tmp_path)
    assert not stale.exists()
    # the optimizer state round-trips exactly
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([p2], lr=0.5)
    c = ckpt.load_checkpoint(path, opt2, restore_rng_state=False)
    assert c.step == 1 and torch.equal(c.adapter["m.down"], ads["m.down"])
    a, b = ckpt.optimizer_to_files(opt)[0], ckpt.optimizer_to_files(opt2)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert opt2.param_groups[0]["lr"] == 0.1
    (path / "state.json").write_text('{"format": "other"}')
    with pytest.raises(UsageError, match="unknown checkpoint format"):
        ckpt.load_checkpoint(path)
