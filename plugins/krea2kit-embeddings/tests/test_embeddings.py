"""The krea2kit-embeddings plugin: it follows krea2kit's plugin contract, never loads without
weights the user named (a clear error naming the option), never reads a pickle, and, where
open_clip / timm import, turns a tiny randomly initialised model saved to a tmp file into
embeddings equal to that model's own output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run without installing

import krea2kit_embeddings  # noqa: E402
from krea2kit_embeddings import models  # noqa: E402
from krea2kit_embeddings.options import EmbeddingsOptions  # noqa: E402

from krea2kit.contracts import LoadContext  # noqa: E402
from krea2kit.errors import RecipeError, WeightsError  # noqa: E402
from krea2kit.plugins import Host  # noqa: E402
from krea2kit.testing import check_part, check_plugin  # noqa: E402

NAME = "krea2kit-embeddings"


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # missing, or a torchvision built for another torch
        return False
    return True


needs_timm = pytest.mark.skipif(not _importable("timm"),
                                reason="timm (and a torchvision for this torch) not importable")
needs_open_clip = pytest.mark.skipif(not _importable("open_clip"), reason="open-clip-torch not importable")


def _context(**options) -> LoadContext:
    return LoadContext(role="embedder", name="x", plugin_options=EmbeddingsOptions(**options))


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    for var in models.ENV.values():
        monkeypatch.delenv(var, raising=False)


def test_registers_three_embedders_and_its_table():
    host = Host(load_entry_points=False, extra_plugins=((krea2kit_embeddings, NAME),))
    assert host.plugins[NAME].registers == {"embedder": ["clip", "dinov2", "dinov3"], "options": [NAME]}
    assert all(d.needs_weights for d in host.registry.all("embedder") if d.plugin == NAME)


def test_follows_the_krea2kit_contract():
    """Without weights every embedder is skipped (never failed, never downloaded)."""
    results = check_plugin(krea2kit_embeddings, NAME)
    status = {(r.kind, r.name): r.status for r in results}
    assert status == {("embedder", "clip"): "skip", ("embedder", "dinov2"): "skip",
                      ("embedder", "dinov3"): "skip", ("options", NAME): "ok"}
    assert all("_weights" in r.detail for r in results if r.kind == "embedder")


@pytest.mark.parametrize("loader, option", [(models.load_clip, "clip_weights"), (models.load_dinov2, "dinov2_weights"),
                                            (models.load_dinov3, "dinov3_weights")])
def test_no_weights_is_an_error_naming_the_option(loader, option):
    with pytest.raises(WeightsError) as info:
        loader(None, _context())
    assert info.value.key == f"plugins.{NAME}.{option}" and "never downloads" in info.value.hint
    assert info.value.exit_code == 4


def test_weights_location_rules(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="do not exist"):
        models.weights_file("clip", EmbeddingsOptions(clip_weights=str(tmp_path / "missing.safetensors")))
    pickle = tmp_path / "open_clip_pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="pickled checkpoints are never loaded"):
        models.weights_file("clip", EmbeddingsOptions(clip_weights=str(pickle)))
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"")
    (folder / "b.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="holds 2 .safetensors files"):
        models.weights_file("dinov2", EmbeddingsOptions(dinov2_weights=str(folder)))
    (folder / "model.safetensors").write_bytes(b"")
    assert models.weights_file("dinov2", EmbeddingsOptions(dinov2_weights=str(folder))) == folder / "model.safetensors"
    monkeypatch.setenv("KREA2KIT_DINOV3_WEIGHTS", str(folder / "a.safetensors"))
    assert models.weights_file("dinov3", EmbeddingsOptions()) == folder / "a.safetensors"


def test_remote_model_names_are_refused(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(RecipeError, match="remote or folder config"):
        models.load_clip(None, _context(clip_model="hf-hub:someone/model", clip_weights=str(weights)))
    with pytest.raises(RecipeError, match="remote or folder config"):
        models.load_dinov2(None, _context(dinov2_model="hf_hub:someone/model", dinov2_weights=str(weights)))


def _images():
    return [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200)),
            Image.new("RGB", (33, 70), (10, 200, 10))]


@needs_timm
def test_dinov2_on_a_tiny_random_timm_model(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    context = _context(dinov2_model="test_vit", dinov2_weights=str(tmp_path))
    embedder = models.load_dinov2(None, context)
    out = embedder.embed(_images())
    data = timm.data.resolve_data_config({}, model=net)
    with torch.inference_mode():
        batch = models.prepare(_images(), tuple(data["input_size"][1:]), data["mean"], data["std"],
                               crop_pct=data["crop_pct"], interpolation=data["interpolation"])
        expected = torch.nn.functional.normalize(net(batch), dim=1)
    assert out.shape == (3, net.num_features) and torch.allclose(out, expected, atol=1e-5)
    assert embedder.name.startswith("dinov2:test_vit:")
    host = Host(load_entry_points=False, extra_plugins=((krea2kit_embeddings, NAME),))
    descriptor = host.registry.get("embedder", "dinov2")
    assert check_part(descriptor, part=embedder).status == "ok"
    # a file of another architecture is a weights error naming the option, not a traceback
    with pytest.raises(WeightsError) as info:
        models.load_dinov2(None, _context(dinov2_model="test_vit2", dinov2_weights=str(tmp_path)))
    assert info.value.key == f"plugins.{NAME}.dinov2_weights"


@needs_open_clip
def test_clip_on_a_tiny_random_open_clip_model(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "krea2kit-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    net = open_clip.create_model("krea2kit-tiny-clip", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    embedder = models.load_clip(None, _context(clip_model="krea2kit-tiny-clip",
                                               clip_weights=str(tmp_path / "tiny.safetensors")))
    out = embedder.embed(_images())
    with torch.inference_mode():
        batch = models.prepare(_images(), (32, 32), models.CLIP_MEAN, models.CLIP_STD)
        expected = torch.nn.functional.normalize(net.encode_image(batch), dim=1)
    assert out.shape == (3, 16) and torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(RecipeError, match="no model"):
        models.load_clip(None, _context(clip_model="no-such-clip", clip_weights=str(tmp_path / "tiny.safetensors")))
