"""Where weights come from: recipe, the preset's env var, the user config, package data,
an existing local Hugging Face cache — and a clear error when none has them."""

from __future__ import annotations

import pytest

from krea2kit.errors import WeightsError
from krea2kit.locate import locate_weights
from krea2kit.plugins import Host
from krea2kit.settings import PresetWeights, Settings


@pytest.fixture(scope="module")
def turbo():
    return Host(load_entry_points=False).registry.get("model", "krea2-turbo")


@pytest.fixture
def clean(monkeypatch, tmp_path):
    monkeypatch.delenv("OSS_TURBO", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_order_recipe_env_config_cache(turbo, clean, monkeypatch):
    snap = clean / "hub" / "models--krea--Krea-2-Turbo" / "snapshots" / "abc123"
    (snap / "transformer").mkdir(parents=True)
    (snap / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    settings = Settings()
    assert locate_weights(turbo, "dit", None, settings) == (str(snap / "transformer"), "Hugging Face cache (krea/Krea-2-Turbo)")
    settings = Settings(weights={"krea2-turbo": PresetWeights(dit="/models/turbo.safetensors")}, path="/cfg.toml")
    assert locate_weights(turbo, "dit", None, settings) == ("/models/turbo.safetensors", "config /cfg.toml")
    monkeypatch.setenv("OSS_TURBO", "/env/turbo.safetensors")
    assert locate_weights(turbo, "dit", None, settings) == ("/env/turbo.safetensors", "$OSS_TURBO")
    assert locate_weights(turbo, "dit", "/recipe/t.safetensors", settings) == ("/recipe/t.safetensors", "recipe")


def test_nothing_found_says_every_way_to_fix_it(turbo, clean):
    with pytest.raises(WeightsError) as err:
        locate_weights(turbo, "vae", None, Settings(path="/cfg.toml"))
    text = str(err.value)
    assert "no vae weights found for model 'krea2-turbo'" in text
    assert "[model.weights] vae" in text and "[weights.krea2-turbo]" in text and "never downloads" in text


def test_package_weights_of_the_nano_models(clean):
    nano = Host(load_entry_points=False).registry.get("model", "krea2-nano-turbo")
    location, how = locate_weights(nano, "dit", None, Settings())
    assert how == "package" and location.endswith("nano/weights/turbo")
