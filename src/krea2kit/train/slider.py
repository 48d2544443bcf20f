"""Concept-slider training (Concept Sliders, Gandikota et al. 2023, arXiv 2311.12092), for a
flow-matching model.

The paper trains a LoRA so that, applied at strength +1, the model's prediction for the
*target* prompt moves along the direction between a *positive* and a *negative* attribute
prompt (its "guided score" objective)::

    ε*(x, c_t) = ε(x, c_t) + η · (ε(x, c_+) − ε(x, c_−))

with ``ε`` the frozen model. Here the model predicts a velocity, which is linear in the noise
prediction at a fixed ``t`` (``v = (ε − x_t)/(1 − t)`` in the official convention), so the same
target holds for ``v``. We train both signs in every step (ai-toolkit's "full slide"): at
multiplier +1 toward ``v_t + η (v_+ − v_−)`` and at −1 toward ``v_t − η (v_+ − v_−)``, so the
adapter's signed strength moves one attribute. ``preserve`` attributes (the paper's
disentanglement prompts) are added to all three prompts in turn, one drawn per step, so the
direction is learnt for each of them and none of them is.

The latents trained on are the frozen model's own: pure noise partly denoised (``denoise_steps``
Euler steps with the neutral prompt, adapter off) to a time ``t`` drawn like the main
objective's (Krea's resolution shift), as the reference code partly denoises before each
update. No images are needed.

The trained adapter is an ordinary LoRA file whose metadata names it a slider (``slider``:
target, positive, negative, range); beside it a run recipe ``<name>.slider.toml`` binds it as a
``[[sliders]]`` entry on the Turbo preset, so ``krea2kit run NAME.slider.toml --sweep
NAME=-1:1:5`` renders the sweep.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from krea2kit.train.objective import pad_text, sample_timesteps, shift_mu, velocity


def _join(prompt: str, attribute: str) -> str:
    return f"{prompt}, {attribute}" if attribute else prompt


class SliderObjective:
    """The slider loss for one recipe; prompts are encoded once, on construction."""

    def __init__(self, recipe, dit, text_encoder, *, channels: int, factor: int, multiple: int):
        s = recipe.slider
        self.recipe = recipe
        self.spec = s
        self.dit = dit
        self.neutral = s.neutral if s.neutral is not None else s.target
        self.attributes = [""] + list(s.preserve)
        prompts = [self.neutral]
        for a in self.attributes:
            prompts += [_join(s.target, a), _join(s.positive, a), _join(s.negative, a)]
        self.prompts = list(dict.fromkeys(prompts))
        self.embeddings = {}
        with torch.inference_mode():
            for p in self.prompts:  # one at a time: the compact layout of a batch pads to its longest
                hidden, mask = text_encoder.encode([p])
                m = mask[0].to("cpu", torch.bool)
                self.embeddings[p] = (hidden[0].to("cpu", torch.float32)[m].clone(), None)
        self.shape = (1, channels, s.height // factor, s.width // factor)
        self.mu = shift_mu(recipe.timesteps.shift, s.width, s.height, multiple)

    def prompt_hash(self) -> str:
        data = json.dumps({"prompts": self.prompts, "shape": self.shape}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()

    def _text(self, prompts: list[str]):
        txt, mask = pad_text([self.embeddings[p] for p in prompts])
        dev = self.dit.device
        return txt.to(dev), mask.to(dev)

    @torch.no_grad()
    def _start(self, gen: torch.Generator, t: torch.Tensor, adapters) -> torch.Tensor:
        """Pure noise denoised by the frozen model (adapter off) from time 1 to ``t``."""
        dev = self.dit.device
        x = torch.randn(self.shape, generator=gen).to(dev)
        steps = self.spec.denoise_steps
        t_end = float(t[0])
        if steps == 0:
            return x * t_end  # noised "nothing": x_t of x0 = 0, the mean image
        txt, mask = self._text([self.neutral])
        sigmas = torch.linspace(1.0, t_end, steps + 1).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = velocity(self.dit, x, torch.full((1,), s, device=dev), txt, mask).to(x.dtype)
            x = x + (s_next - s) * v
        return x

    def backward(self, step: int, gen: torch.Generator, adapters) -> float:
        """Both slides of step ``step``: loss at +1 and at −1, each back-propagated at once
        (so gradient checkpointing recomputes each pass at the multiplier it ran with).
        Returns the mean loss; a non-finite value is returned before any backward."""
        s = self.spec
        attr = self.attributes[int(torch.randint(len(self.attributes), (1,), generator=gen))]
        t = sample_timesteps(gen, 1, self.mu)
        dev = self.dit.device
        adapters.multiplier = 0.0
        try:
            x = self._start(gen, t, adapters)
            prompts = [_join(s.target, attr), _join(s.positive, attr), _join(s.negative, attr)]
            txt, mask = self._text(prompts)
            tt = t.to(dev).expand(3)
            with torch.no_grad():
                v = velocity(self.dit, x.expand(3, -1, -1, -1), tt, txt, mask).float()
            v_target, direction = v[0:1], (v[1:2] - v[2:3]) * s.guidance
            txt_t, mask_t = txt[0:1], mask[0:1]
            total = 0.0
            for sign in (1.0, -1.0):
                adapters.multiplier = sign
                pred = velocity(self.dit, x, t.to(dev), txt_t, mask_t).float()
                loss = F.mse_loss(pred, v_target + sign * direction) * 0.5
                value = float(loss.detach())
                if not torch.isfinite(loss):
                    return float("nan")
                loss.backward()
                total += value
            return total
        finally:
            adapters.multiplier = 1.0

    # -- what the file says about itself -------------------------------------------
    def slider_metadata(self, name: str) -> dict:
        s = self.spec
        return {"name": name, "target": s.target, "positive": s.positive, "negative": s.negative,
                "preserve": list(s.preserve), "guidance": s.guidance, "range": list(s.range)}

    def write_slider_recipe(self, name: str, adapter: Path, recipe, *, turbo_preset: str,
                            overwrite: bool = False) -> Path:
        """``<adapter stem>.slider.toml`` beside the adapter: a run recipe on Turbo with the
        adapter as ``[[loras]]`` and a ``[[sliders]]`` entry driving it."""
        import tomli_w

        from krea2kit.files import atomic_write

        s = self.spec
        weights = {k: v for k, v in recipe.samples.turbo_weights.model_dump(exclude_none=True).items()}
        model: dict = {"preset": turbo_preset}
        if weights:
            model["weights"] = weights
        data = {
            "description": f"concept slider {name!r}: {s.negative!r} (-) .. {s.positive!r} (+), trained by krea2kit "
                           f"train; render a sweep with: krea2kit run THIS_FILE --sweep {name}="
                           f"{s.range[0]:g}:{s.range[1]:g}:5",
            "prompt": s.target, "width": s.width, "height": s.height,
            "model": model,
            "loras": [{"path": str(Path(adapter).resolve()), "name": name}],
            "sliders": [{"name": name, "kind": "lora", "lora": name, "value": 0.0,
                         "range": [float(s.range[0]), float(s.range[1])]}],
        }
        text = tomli_w.dumps(data).encode()
        target = Path(adapter).with_name(Path(adapter).stem + ".slider.toml")
        return atomic_write(target, lambda fp: fp.write(text), overwrite=overwrite)
