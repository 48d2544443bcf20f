"""The ``transformers`` expander backend: local generation with the Qwen3-VL-4B-Instruct weights
the user already has for the text encoder (the same folder), through its own language-model
head and ``transformers``' ``generate`` (the optional extra ``krea2kit[expander]``).

Krea 2 conditions on Qwen3-VL-4B-Instruct's hidden states; the full Hugging Face folder also
holds what it needs to write text: ``config.json``, the tokenizer and an LM head (Qwen3-VL-4B
ties it to the token embedding, ``tie_word_embeddings``; bigger models store ``lm_head.weight``).
A folder without them (krea2kit's nano encoder, a truncated tower, ComfyUI's single file) is
refused before anything loads, with what is missing and the fix.

The model is text-only here (no image input), loaded for the expansion step and freed before
the image models load. Greedy decoding at ``temperature = 0``; otherwise sampling seeded with
``seed`` inside a forked RNG (the run's own random state is untouched).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from krea2kit.contracts import LoadContext
from krea2kit.errors import ExpanderError, WeightsError
from krea2kit.expander.answers import usable

EXTRA_HINT = "install the optional extra: pip install 'krea2kit[expander]' (transformers>=4.57)"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Qwen's chat format (ChatML), used when a tokenizer carries no chat template of its own.
_CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _text_config(raw: dict) -> dict:
    return raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw


def _weight_keys(folder: Path) -> set[str]:
    from krea2kit.models.weights import open_checkpoint

    try:
        return set(open_checkpoint(folder, what="expander weights").keys())
    except WeightsError:
        return set()


def check_folder(folder: Path, *, came_from: str) -> dict:
    """The folder's ``config.json`` when it holds a whole language model that can generate;
    else a :class:`WeightsError` (exit 4) naming the folder, what is missing and the fix."""
    fix = ("point expander.weights in the user config at the Hugging Face folder of Qwen3-VL-4B-Instruct "
           "(config.json, tokenizer.json, model*.safetensors), or use [expander] backend = \"openai\"")
    if not folder.exists():
        raise WeightsError(f"the transformers expander's weights folder does not exist (from {came_from})",
                           file=str(folder), key="expander.weights", hint=fix)
    if not folder.is_dir():
        raise WeightsError(f"the transformers expander needs a model folder, and this is a single file (from "
                           f"{came_from}): a single-file text encoder (e.g. ComfyUI's) carries no config.json, "
                           "tokenizer or LM head", file=str(folder), key="expander.weights", hint=fix)
    keys = _weight_keys(folder)
    missing: list[str] = []
    raw: dict = {}
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WeightsError(f"config.json cannot be read: {exc}", file=str(config_file),
                               key="expander.weights", hint=fix) from None
    else:
        missing.append("config.json")
    if not (folder / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    text = _text_config(raw) if isinstance(raw, dict) else {}
    tied = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings")) if raw else False
    has_head = any(k.endswith("lm_head.weight") for k in keys)
    if not has_head and not tied:
        missing.append("lm_head.weight (and config.json does not tie it to the embedding)" if raw
                       else "lm_head.weight")
    layers = {int(m.group(1)) for k in keys if (m := _LAYER.search(k)) and "visual" not in k}
    wanted = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if isinstance(wanted, int) and layers and max(layers) + 1 < wanted:
        missing.append(f"decoder layers {max(layers) + 1}..{wanted - 1} (it holds {max(layers) + 1} of {wanted})")
    if not keys:
        missing.append("model weights (*.safetensors)")
    if missing:
        raise WeightsError(
            f"not a complete language model, so it cannot write prompts (from {came_from}): missing "
            + "; ".join(missing) + ". A text tower kept only to condition images (like krea2kit's nano "
            "encoder) has no LM head", file=str(folder), key="expander.weights", hint=fix)
    return raw


class TransformersExpander:
    """:class:`krea2kit.contracts.PromptExpander` running a causal LM with ``transformers``."""

    def __init__(self, folder: Path, config: dict, *, device: str = "cpu", dtype: str = "float32") -> None:
        self.folder = folder
        self.config = config
        self.device = device
        self.dtype = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        name = config.get("_name_or_path") or folder.name
        # Known without loading the model, so a cached answer never loads 4B parameters.
        self.identity = f"transformers:{Path(str(name)).name}:{self._fingerprint()}"

    def _ensure_loaded(self) -> None:
        """Load the tokenizer and model on the first expansion (cache hits never get here)."""
        if self.model is not None:
            return
        try:
            import transformers
        except ImportError:
            raise ExpanderError("the transformers expander backend needs the transformers package",
                                key="expander.backend", hint=EXTRA_HINT) from None
        import torch

        transformers.utils.logging.disable_progress_bar()  # stderr carries krea2kit's own progress
        folder, config, device, dtype = self.folder, self.config, self.device, self.dtype
        model_type = str(config.get("model_type", ""))
        if model_type == "qwen3_vl":  # text-only use of the VL model: its own class keeps the weight names
            cls = transformers.Qwen3VLForConditionalGeneration
        else:
            cls = transformers.AutoModelForCausalLM
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = cls.from_pretrained(str(folder), dtype=getattr(torch, dtype), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds for a bad folder
            raise WeightsError(f"transformers cannot load this folder: {type(exc).__name__}: {str(exc)[:300]}",
                               file=str(folder), key="expander.weights",
                               hint="check the folder is a complete Hugging Face model (and transformers is "
                                    "recent enough: pip install -U 'krea2kit[expander]')") from None
        self.model.to(device).eval()

    def _fingerprint(self) -> str:
        """A short hash of the config and weight file sizes: another model, another cache key."""
        import hashlib

        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for p in sorted(self.folder.glob("*.safetensors")):
            digest.update(f"{p.name}:{p.stat().st_size}".encode())
        return digest.hexdigest()[:12]

    def _prompt_ids(self, prompt: str, system_prompt: str) -> Any:
        tok = self.tokenizer
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
        else:
            text = _CHATML.format(system=system_prompt, user=prompt)
        return tok(text, return_tensors="pt", add_special_tokens=False)

    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = set()
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i >= 0:
                ids.add(i)
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        return sorted(ids)

    def expand(self, prompt: str, *, system_prompt: str, seed: int, temperature: float, max_tokens: int) -> str:
        import torch

        self._ensure_loaded()
        inputs = self._prompt_ids(prompt, system_prompt).to(self.device)
        stop = self._stop_ids()
        greedy = temperature <= 0
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_tokens), "do_sample": not greedy,
                                  "eos_token_id": stop or None, "pad_token_id": stop[0] if stop else None}
        if greedy:  # the folder's generation_config may ask for sampling: this call does not
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=float(temperature))
        try:
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(int(seed))
                out = self.model.generate(**inputs, **kwargs)
        except Exception as exc:
            raise ExpanderError(f"local generation failed: {type(exc).__name__}: {str(exc)[:200]}",
                                key="expander", hint="check the model folder, or set expander.on_failure = "
                                                     "\"original\"") from None
        new = out[0, inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return usable(text, where=f"transformers, {self.folder.name}",
                      hint="raise expander.max_tokens, or set expander.on_failure = \"original\"")


def load(options: Any, context: LoadContext) -> TransformersExpander:
    """``context.location``: the run's text encoder weights (the host locates them); the user
    config's ``expander.weights`` / ``expander.device`` override."""
    from krea2kit.expander.config import local_weights

    import importlib

    try:
        importlib.import_module("transformers")  # the extra, checked before any file is read
    except ImportError:
        raise ExpanderError("the transformers expander backend needs the transformers package",
                            key="expander.backend", hint=EXTRA_HINT) from None
    location, came_from = local_weights(context.settings, context.location)
    if not location:
        raise WeightsError("the transformers expander has no weights folder", key="expander.weights",
                           hint="set expander.weights in the user config to the Qwen3-VL-4B-Instruct folder")
    folder = Path(location)
    config = check_folder(folder, came_from=came_from)
    settings = context.settings
    device = (getattr(getattr(settings, "expander", None), "device", None) or context.device or "cpu")
    return TransformersExpander(folder, config, device=device, dtype=context.dtype or "float32")
