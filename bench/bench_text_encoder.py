"""Text-encoder cost for one 40-token prompt: official padded-to-512 block vs the exact trimmed
path vs a prompt-cache hit, on a mid-size random Qwen3 tower on CPU.

    python bench/bench_text_encoder.py [--reps 3] [--threads 2]

Times are measured in one process (ratios against the padded run); peak memory is the
growth of the peak RSS during one encode (Linux), each variant in its own subprocess.
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

import torch

from krea2kit.conditioning import Krea2TextEncoder, PromptEmbeddingCache
from krea2kit.models.text_encoder import PRESETS, Qwen3TextTower
from krea2kit.models.tokenizer import QwenTokenizer, build_tiny_tokenizer

CONFIG = PRESETS["mid"]  # hidden 1024, 12 layers, 16/8 heads of 64, SwiGLU 3072
TAPS = (2, 5, 8, 11)  # 11 of 12 layers, like Krea 2's 35 of 36
PROMPT_TOKENS = 40


def build(tmp: str) -> tuple[Krea2TextEncoder, str]:
    build_tiny_tokenizer(tmp)
    tok = QwenTokenizer.from_file(tmp)
    torch.manual_seed(0)
    tower = Qwen3TextTower.for_taps(CONFIG, TAPS).eval().requires_grad_(False)
    enc = Krea2TextEncoder(tower, tok, taps=TAPS, identity="bench")
    words = "a photo of a red fox sitting in the snow soft morning light on film".split()
    prompt, i = "", 0
    while len(tok.encode(enc.template.prefix + prompt)) - 34 < PROMPT_TOKENS:
        prompt = (prompt + " " + words[i % len(words)]).strip()
        i += 1
    return enc, prompt


def run_variant(enc, prompt, variant, cache_dir):
    if variant == "padded":
        return enc.encode_padded_reference([prompt])
    if variant == "trimmed":
        return enc.encode([prompt])
    return enc.encode([prompt], cache=PromptEmbeddingCache(cache_dir))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, cache_dir: str) -> None:
    """Peak RSS growth of one encode: reset the high-water mark (Linux clear_refs), encode, read it."""
    with tempfile.TemporaryDirectory() as tmp:
        enc, prompt = build(tmp)
        enc.encode(["warm up"])  # one-off library set-up is not the variant's cost
        if variant == "cache":
            enc.encode([prompt], cache=PromptEmbeddingCache(cache_dir))  # fill, then measure a hit
            enc.release()  # a hit must not need the tower
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kib("VmRSS")
        run_variant(enc, prompt, variant, cache_dir)
        after = _status_kib("VmHWM")
    print(json.dumps({"peak_kib": after - before}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.child:
        child(args.child, args.cache_dir)
        return
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache_dir:
        enc, prompt = build(tmp)
        tokens = enc.tokenize([prompt])
        print(f"config: hidden {CONFIG.hidden_size}, {len(enc.tower.layers)} of {CONFIG.num_hidden_layers} layers, "
              f"taps {TAPS}; prompt {tokens.prompt_lens[0]} tokens; torch threads {args.threads}")
        print(f"tokens run: padded {tokens.prefix_len + enc.template.max_length}, "
              f"trimmed {len(tokens.ids[0])}; output L: padded 512, trimmed {tokens.trimmed_length}")
        times = {}
        for variant in ("padded", "trimmed", "cache"):
            run_variant(enc, prompt, variant, cache_dir)  # warm-up (and cache fill)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                run_variant(enc, prompt, variant, cache_dir)
            times[variant] = (time.perf_counter() - t0) / args.reps
        a, _ = enc.encode_padded_reference([prompt])
        b, m = enc.encode([prompt])
        real512 = tokens.output_mask(512)[0]
        err = (a[0][real512] - b[0][m[0]]).abs().max().item()
        peaks = {}
        for variant in ("padded", "trimmed", "cache"):
            with tempfile.TemporaryDirectory() as cd:
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--cache-dir", cd,
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                                     # big blocks via mmap, returned on free: the peak is not hidden by
                                     # memory freed earlier and reused by the allocator
                                     env={**os.environ, "PYTHONWARNINGS": "ignore",
                                          "MALLOC_MMAP_THRESHOLD_": "65536"})
                peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    base = times["padded"]
    print(f"{'variant':<10}{'time/encode':>14}{'vs padded':>12}{'peak RSS growth':>18}")
    for v in ("padded", "trimmed", "cache"):
        print(f"{v:<10}{times[v] * 1e3:>11.2f} ms{base / times[v]:>11.1f}x{peaks[v]:>14.1f} MiB")
    print(f"max abs diff trimmed vs padded on real tokens: {err:.2e}")


if __name__ == "__main__":
    main()
