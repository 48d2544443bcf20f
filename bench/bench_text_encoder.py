"""Text-encoder cost for one 40-token prompt in each token layout, on a random Qwen3 tower on CPU.

    python bench/bench_text_encoder.py [--size mid|small] [--reps 3] [--threads 2]

Layouts, as the pipeline's text-encoder part runs them (``krea2kit.parts.text_encoder``):

* ``official`` (the default for Krea 2 presets, ``model.layout = "official"``): the tower runs
  the official padded block ``[prefix | prompt | PAD | suffix]`` (546 tokens for max_length
  512), and the output keeps 512 positions (zeros in the padding);
* ``compact`` (the nano presets' layout): the tower runs the real tokens only
  (``prefix + prompt + suffix``) and the output is trimmed to ``prompt + suffix``;
* ``cache``: a prompt-cache hit of the official layout (the tower is released first).

Times are measured in one process (ratios against ``official``); peak memory is the growth of
the peak RSS during one encode (Linux), each layout in its own subprocess. The last lines check
both layouts against the tests' oracle ``tests/support/oracles.encode_padded_reference`` on the real
tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

from pathlib import Path

import torch

from krea2kit.conditioning import Krea2TextEncoder, PromptEmbeddingCache
from krea2kit.models.text_encoder import Qwen3TextConfig, Qwen3TextTower
from krea2kit.models.tokenizer import QwenTokenizer, build_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' oracle
from support.oracles import encode_padded_reference  # noqa: E402

# Random towers of Qwen3-VL's architecture at bench sizes, tapped like Krea 2 (every third
# layer, the last tap one before the top: Krea 2 taps 35 of 36).
SIZES = {
    # hidden 1024, 12 layers, 16/8 heads of 64, SwiGLU 3072
    "mid": (Qwen3TextConfig(vocab_size=4096, hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=64, mrope_section=(16, 8, 8)),
            (2, 5, 8, 11)),
    # hidden 256, 8 layers, 4/2 heads of 64, SwiGLU 768: a quick smoke run
    "small": (Qwen3TextConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, mrope_section=(16, 8, 8)),
              (1, 4, 7)),
}
PROMPT_TOKENS = 40
LAYOUTS = ("official", "compact", "cache")


def build(tmp: str, size: str) -> tuple[Krea2TextEncoder, str]:
    config, taps = SIZES[size]
    build_tiny_tokenizer(tmp)
    tok = QwenTokenizer.from_file(tmp)
    torch.manual_seed(0)
    tower = Qwen3TextTower.for_taps(config, taps).eval().requires_grad_(False)
    enc = Krea2TextEncoder(tower, tok, taps=taps, identity="bench")
    words = "a photo of a red fox sitting in the snow soft morning light on film".split()
    prompt, i = "", 0
    while enc.tokenize([prompt], warn=False).prompt_lens[0] < PROMPT_TOKENS:
        prompt = (prompt + " " + words[i % len(words)]).strip()
        i += 1
    return enc, prompt


def encode(enc: Krea2TextEncoder, prompt: str, layout: str, cache_dir: str):
    """One encode the way the pipeline's text-encoder part runs ``layout``."""
    official = layout != "compact"
    enc.exact_layout = official
    length = enc.template.max_length if official else None
    cache = PromptEmbeddingCache(cache_dir) if layout == "cache" else None
    return enc.encode([prompt], cache=cache, length=length)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(layout: str, size: str, cache_dir: str) -> None:
    """Peak RSS growth of one encode: reset the high-water mark (Linux clear_refs), encode, read it."""
    with tempfile.TemporaryDirectory() as tmp:
        enc, prompt = build(tmp, size)
        enc.encode(["warm up"])  # one-off library set-up is not the layout's cost
        if layout == "cache":
            encode(enc, prompt, layout, cache_dir)  # fill, then measure a hit
            enc.release()  # a hit must not need the tower
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kib("VmRSS")
        encode(enc, prompt, layout, cache_dir)
        after = _status_kib("VmHWM")
    print(json.dumps({"peak_kib": after - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.child:
        child(args.child, args.size, args.cache_dir)
        return
    config, taps = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache_dir:
        enc, prompt = build(tmp, args.size)
        tokens = enc.tokenize([prompt])
        print(f"size {args.size}: hidden {config.hidden_size}, {len(enc.tower.layers)} of {config.num_hidden_layers} "
              f"layers, taps {taps}; prompt {tokens.prompt_lens[0]} tokens; torch threads {args.threads}")
        print(f"tower tokens: official {tokens.prefix_len + enc.template.max_length}, compact {len(tokens.ids[0])}; "
              f"output L: official {enc.template.max_length}, compact {tokens.trimmed_length}")
        times = {}
        for layout in LAYOUTS:
            encode(enc, prompt, layout, cache_dir)  # warm-up (and cache fill)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                encode(enc, prompt, layout, cache_dir)
            times[layout] = (time.perf_counter() - t0) / args.reps
        ref, ref_mask = encode_padded_reference(enc, [prompt])
        errors = {}
        for layout in ("official", "compact"):
            hidden, mask = encode(enc, prompt, layout, cache_dir)
            errors[layout] = (ref[0][ref_mask[0]] - hidden[0][mask[0]]).abs().max().item()
        peaks = {}
        for layout in LAYOUTS:
            with tempfile.TemporaryDirectory() as cd:
                out = subprocess.run([sys.executable, __file__, "--child", layout, "--cache-dir", cd,
                                      "--size", args.size, "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True,
                                     # big blocks via mmap, returned on free: the peak is not hidden by
                                     # memory freed earlier and reused by the allocator
                                     env={**os.environ, "PYTHONWARNINGS": "ignore",
                                          "MALLOC_MMAP_THRESHOLD_": "65536"})
                peaks[layout] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    base = times["official"]
    print(f"{'layout':<10}{'time/encode':>14}{'vs official':>13}{'peak RSS growth':>18}")
    for layout in LAYOUTS:
        print(f"{layout:<10}{times[layout] * 1e3:>11.2f} ms{base / times[layout]:>12.1f}x{peaks[layout]:>14.1f} MiB")
    for layout, err in errors.items():
        print(f"max abs diff {layout} vs padded reference on real tokens: {err:.2e}")


if __name__ == "__main__":
    main()
