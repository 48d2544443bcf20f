"""Writing a trained adapter: every layout reads back to the same weight change (krea2kit's
reader, and diffusers/PEFT for the default layout), with the training metadata that
`lora inspect` shows and local paths kept out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support.presets import TINY_DIT

from krea2kit.files import NameTaken
from krea2kit.lora.convert import kron_split
from krea2kit.lora.formats import LoraDelta, load_lora, native_to_diffusers
from krea2kit.models.dit import SingleStreamDiT
from krea2kit.train.export import RECIPE_KEY, TRAIN_KEY, save_adapter, training_info

RECIPE = """schema = "krea2kit.train/1"
steps = 40
[base]
preset = "krea2-nano-raw"
weights = { dit = "/home/someone/models/raw.safetensors", vae = { env = "MY_VAE" } }
[dataset]
path = "/home/someone/private/photos"
resolution = 64
[samples]
turbo_weights = { dit = "/home/someone/models/turbo.safetensors" }
[output]
path = "/home/someone/loras/style.safetensors"
work_dir = "/home/someone/runs/style"
"""


def _linears():
    with torch.device("meta"):
        model = SingleStreamDiT(TINY_DIT)
    # one rank for every module (the rank-1 text projector left out; mixed ranks are lora convert's tests)
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "txtfusion.projector"}


def _lora_state(rank=4, alpha=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: LoraDelta(n, "lora", {"down": torch.randn(rank, m.in_features, generator=g) * 0.1,
                                     "up": torch.randn(m.out_features, rank, generator=g) * 0.1}, scale=alpha / rank)
            for n, m in _linears().items()}


def _lokr_state(rank=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in _linears().items():
        (o1, o2), (i1, i2) = kron_split(m.out_features), kron_split(m.in_features)
        if min(o2, i2) <= 2 * rank:
            continue
        out[n] = LoraDelta(n, "lokr", {"w1": torch.randn(o1, i1, generator=g),
                                       "w2_a": torch.randn(o2, rank, generator=g) * 0.1,
                                       "w2_b": torch.randn(rank, i2, generator=g) * 0.1}, scale=0.5)
    return out


META = {"base_model": "krea2-nano-raw", "base_weights_hash": "abc123", "adapter": "lora", "rank": 4, "alpha": 8,
        "trigger": "zq style", "steps": 40, "dataset_hash": "d" * 64, "recipe": RECIPE}


@pytest.mark.parametrize("fmt", ["diffusers", "native", "kohya"])
def test_every_layout_reads_back_to_the_same_change(tmp_path, fmt):
    state = _lora_state()
    path = save_adapter(state, tmp_path / f"a-{fmt}.safetensors", format=fmt, metadata=META)
    back = load_lora(path)
    assert set(back.deltas) == set(state)
    assert back.kinds() == {"lora": len(state)}
    for name, delta in state.items():
        torch.testing.assert_close(back.deltas[name].dense(), delta.dense(), rtol=1e-6, atol=1e-7)
    assert back.base_model == "base_model=krea2-nano-raw" and back.trigger_words == ["zq style"]
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left behind


def test_lokr_reads_back_through_peft_layout(tmp_path):
    state = _lokr_state()
    assert state
    back = load_lora(save_adapter(state, tmp_path / "k.safetensors", metadata={"adapter": "lokr"}))
    for name, delta in state.items():
        torch.testing.assert_close(back.deltas[name].dense(), delta.dense(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # importing diffusers takes seconds
def test_diffusers_layout_is_what_diffusers_and_peft_load(tmp_path, one_thread):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = _lora_state(seed=3)
    path = save_adapter(state, tmp_path / "a.safetensors", metadata=META)
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    torch.manual_seed(0)
    ref = diffusers.Krea2Transformer2DModel(**TINY_DIT.to_diffusers()).eval()
    ref.load_lora_adapter(str(path), prefix="transformer", adapter_name="trained")
    adapted = {n for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == {native_to_diffusers(n) for n in state}
    for name, delta in state.items():
        got = ref.get_submodule(native_to_diffusers(name)).get_delta_weight("trained").detach()
        torch.testing.assert_close(got, delta.dense(), rtol=1e-5, atol=1e-6)


def test_metadata_and_portable_recipe(tmp_path):
    path = save_adapter(_lora_state(), tmp_path / "a.safetensors", metadata=META)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    info = training_info(meta)
    for key in ("base_model", "base_weights_hash", "adapter", "rank", "alpha", "trigger", "steps", "dataset_hash"):
        assert info[key] == META[key], key
    assert info["krea2kit_version"]
    assert "/home/someone" not in json.dumps(meta)  # no local folder leaks through a shared LoRA
    recipe = meta[RECIPE_KEY]
    assert 'path = "photos"' in recipe and 'dit = "raw.safetensors"' in recipe and 'env = "MY_VAE"' in recipe
    assert 'dit = "turbo.safetensors"' in recipe and 'work_dir = "style"' in recipe
    for scale_key in ("rank", "lora_alpha", "lora_scale"):  # the krea-2 trainer layout would rescale by these
        assert scale_key not in meta
    kept = save_adapter(_lora_state(), tmp_path / "b.safetensors", metadata=META, local_paths=True)
    with safe_open(str(kept), "pt") as fh:
        assert "/home/someone/private/photos" in fh.metadata()[RECIPE_KEY]
    assert training_info({"other": "x"}) is None and training_info({TRAIN_KEY: "not json"}) is None


def test_overwrite_rule_and_bad_input(tmp_path):
    path = save_adapter(_lora_state(), tmp_path / "a.safetensors", metadata=META)
    before = path.read_bytes()
    with pytest.raises(NameTaken):
        save_adapter(_lora_state(seed=9), path, metadata=META, overwrite=False)
    assert path.read_bytes() == before
    save_adapter(_lora_state(seed=9), path, metadata=META)  # checkpoints replace (atomically)
    assert path.read_bytes() != before
    from krea2kit.errors import UsageError

    with pytest.raises(UsageError, match="format"):
        save_adapter(_lora_state(), tmp_path / "c.safetensors", format="comfy", metadata=META)
    assert save_adapter(_lora_state(), tmp_path / "d.safetensors", dtype=torch.bfloat16, metadata=META)
    assert load_lora(tmp_path / "d.safetensors").dtypes() == {"bfloat16": len(_linears())}


def test_lora_inspect_shows_training_fields(tmp_path, cli_inproc):
    path = save_adapter(_lora_state(), tmp_path / "style.safetensors", metadata={**META, "trigger": "zq\x1b[31m"})
    res = cli_inproc("lora", "inspect", str(path))
    assert res.code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "training:    (krea2kit train)" in lines
    assert any(line.split() == ["dataset_hash:", "d" * 64] for line in lines)
    assert any(line.split() == ["base_model:", "krea2-nano-raw"] for line in lines)
    assert "  recipe:" in lines and '    path = "photos"' in lines
    assert "\x1b" not in res.stdout  # text from the file cannot drive the terminal
    res = cli_inproc("lora", "inspect", str(path), "--json")
    info = json.loads(res.stdout)
    assert info["training"]["steps"] == 40 and info["training"]["rank"] == 4
    # lora convert keeps the training record
    out = tmp_path / "style-kohya.safetensors"
    assert cli_inproc("lora", "convert", str(path), "--to", "kohya", str(out)).code == 0
    assert json.loads(cli_inproc("lora", "inspect", str(out), "--json").stdout)["training"]["dataset_hash"] == "d" * 64


def test_recipe_given_as_a_validated_model_dump(tmp_path):
    """The trainer may hand the recipe as a model dump (unset values are None: TOML has none)."""
    from krea2kit.train.schema import TrainRecipe

    recipe = TrainRecipe.model_validate({"base": {"preset": "krea2-nano-raw", "weights": {"dit": "/m/raw.safetensors"}},
                                         "dataset": {"path": "/home/someone/data", "resolution": 64}})
    path = save_adapter(_lora_state(), tmp_path / "a.safetensors",
                        metadata={**META, "recipe": recipe.model_dump(mode="json", by_alias=True)})
    text = training_info(load_lora(path).metadata)["recipe"]
    assert 'path = "data"' in text and 'dit = "raw.safetensors"' in text and "/home/someone" not in text
    from krea2kit.tomlfiles import parse_toml

    again = TrainRecipe.model_validate(parse_toml(text, "<metadata>"))  # still a valid training recipe
    assert again.dataset.resolution == 64
