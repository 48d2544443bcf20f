"""The pipeline takes its numbers from the parts' declarations, not from Krea 2: the size
multiple is the VAE's factor times the transformer's patch, the noise has the VAE's
channels, and parts that do not fit or lack a protocol member are refused by name."""

from __future__ import annotations

import json

import pytest

from plugin_factory import make_plugin

VAES = '''
import torch.nn.functional as F
from krea2kit.hookspecs import hookimpl
from krea2kit.models.contract import LatentContract
from krea2kit.registry import VAEDescriptor

KREA2KIT_CONTRACT = 2


class Pool:
    """Latents at 1/FACTOR scale: the first 3 channels are the pooled image."""

    def __init__(self, channels, factor):
        self.identity = f"pool-{channels}-{factor}"
        self.contract = LatentContract(channels=channels, factor=factor)

    def encode(self, images):
        small = F.avg_pool2d(images, self.contract.factor)
        return F.pad(small, (0, 0, 0, 0, 0, self.contract.channels - 3))

    def decode(self, latents):
        return F.interpolate(latents[:, :3].clamp(-1, 1), scale_factor=self.contract.factor)


class NoDecode:
    identity = "x"
    contract = LatentContract(channels=16, factor=8)

    def encode(self, images):
        return images


@hookimpl
def register_vaes(register):
    register(VAEDescriptor(name="f4", summary="16 channels at 1/4", load=lambda o, c: Pool(16, 4)))
    register(VAEDescriptor(name="c4", summary="4 channels at 1/8", load=lambda o, c: Pool(4, 8)))
    register(VAEDescriptor(name="nodecode", summary="lacks decode", load=lambda o, c: NoDecode()))
'''


@pytest.fixture
def env(tmp_path):
    site = make_plugin(tmp_path / "site", "krea2kit-vaes", "k2vaes", VAES)
    (tmp_path / "r.toml").write_text('prompt = "a red circle"\nwidth = 40\nheight = 40\n[sampler]\nsteps = 1\n'
                                     '[output]\ndir = "out"\n')
    return {"PYTHONPATH": str(site), "KREA2KIT_PLUGINS": "krea2kit-vaes"}


@pytest.mark.slow
def test_size_multiple_and_latents_come_from_the_parts(cli, env, tmp_path):
    from PIL import Image

    from krea2kit.sampling import resolution_mu

    auto = ("--set", 'sampler.mu="auto"')  # the resolution-aware shift counts the parts' tokens
    own = cli("run", "r.toml", "--json", *auto, env=env)  # Qwen-Image VAE: f 8 x patch 2 = 16
    assert own.code == 0, own.stderr
    assert "not a multiple of 16; generating 48x48" in own.stderr
    assert json.loads(own.stdout)["mu"] == resolution_mu(3 * 3)
    f4 = cli("run", "r.toml", "--json", *auto, "--set", 'model.vae="f4"', "--set", 'output.name="f4"', env=env)
    assert f4.code == 0, f4.stderr
    assert "not a multiple" not in f4.stderr  # 40 = 5 x (4 x 2)
    record = json.loads(f4.stdout)
    assert Image.open(tmp_path / record["path"]).size == (40, 40)
    assert record["mu"] == resolution_mu(5 * 5)


@pytest.mark.slow
def test_parts_that_do_not_fit_are_refused_by_name(cli, env):
    channels = cli("run", "r.toml", "--set", 'model.vae="c4"', env=env)
    assert channels.code == 4, channels.stderr
    assert "4 channels" in channels.stderr and "takes 16 latent channels" in channels.stderr
    lacking = cli("run", "r.toml", "--set", 'model.vae="nodecode"', env=env)
    assert lacking.code == 1, lacking.stderr
    assert "'nodecode'" in lacking.stderr and "krea2kit-vaes" in lacking.stderr
    assert "lacks decode()" in lacking.stderr and "Traceback" not in lacking.stderr
