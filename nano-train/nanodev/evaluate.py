"""Prompt adherence of nano models, measured through the real pipeline.

    PYTHONPATH=nano-train python -m nanodev.evaluate --preset krea2-nano-turbo [-n 64] [--steps 4] [--json]
    PYTHONPATH=nano-train python -m nanodev.evaluate --preset krea2-nano-raw --weights DIR   # a training run's weights/
    PYTHONPATH=nano-train python -m nanodev.evaluate curve RUN_DIR/raw --weights DIR --until 5000  # learning curve

Held-out captions (``world`` split ``"heldout"``: every scene holds at least one colour-shape
pair never seen in training) are rendered by :class:`krea2kit.api.Session` exactly as
``krea2kit run`` renders them (text encoder, sampler, VAE, filters, PNG writer), read back from
the written files and scored against their captions by :func:`nanodev.scorer.score`.
Image ``i`` uses noise seed ``seed + i``; the captions come from world seed
:data:`EVAL_WORLD_SEED`, which is not the training seed (the held-out split is disjoint anyway).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

EVAL_WORLD_SEED = 4242
DEFAULT_COUNT = 64


def heldout_captions(n: int, world_seed: int = EVAL_WORLD_SEED) -> list[str]:
    """The first ``n`` held-out captions (deterministic; no rendering)."""
    from nanodev import world

    out = []
    for i in range(n):
        rng = world.item_rng(world_seed, "heldout", i)
        out.append(world.caption(world.sample_scene(rng, "heldout"), rng))
    return out


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for this alphabet


def recipe_text(captions: Sequence[str], *, preset: str, out_dir: Path, seed: int = 0,
                weights: Path | None = None, dit: Path | None = None, text_encoder: Path | None = None, steps: int | None = None,
                guidance: float | None = None, mu: float | None = None) -> str:
    """A recipe rendering ``captions`` (image ``i`` with seed ``seed + i``)."""
    lines = ['schema = "krea2kit.recipe/1"', ""]
    for i, text in enumerate(captions):
        lines += ["[[prompts]]", f"text = {_toml_str(text)}", f"seed = {seed + i}", ""]
    lines += ["[model]", f"preset = {_toml_str(preset)}"]
    parts = {}
    if weights is not None:
        what = "turbo" if "turbo" in preset else "raw"
        parts = {"dit": Path(weights) / what, "text_encoder": Path(weights) / "text_encoder",
                 "vae": Path(weights) / "vae"}
    if dit is not None:
        parts["dit"] = Path(dit)
    if text_encoder is not None:
        parts["text_encoder"] = Path(text_encoder)
    if parts:
        lines += ["[model.weights]"] + [f"{k} = {_toml_str(str(v))}" for k, v in parts.items()]
    sampler = {"steps": steps, "guidance": guidance, "mu": mu}
    if any(v is not None for v in sampler.values()):
        lines += ["[sampler]"] + [f"{k} = {v}" for k, v in sampler.items() if v is not None]
    lines += ["[output]", f"dir = {_toml_str(str(out_dir))}", 'name = "eval-{index:04d}"', "metadata = false"]
    return "\n".join(lines) + "\n"


def evaluate(*, preset: str, n: int = DEFAULT_COUNT, seed: int = 0, weights: Path | None = None,
             dit: Path | None = None, text_encoder: Path | None = None, steps: int | None = None, guidance: float | None = None,
             mu: float | None = None, session=None, keep: Path | None = None) -> dict:
    """Render ``n`` held-out captions and score them; returns the summary (and per-image scores)."""
    from PIL import Image

    from krea2kit.api import Session
    from nanodev import scorer

    captions = heldout_captions(n)
    session = session or Session()
    with tempfile.TemporaryDirectory(prefix="krea2kit-eval-") as tmp:
        out_dir = Path(keep) if keep else Path(tmp)
        text = recipe_text(captions, preset=preset, out_dir=out_dir, seed=seed, weights=weights, dit=dit,
                           text_encoder=text_encoder, steps=steps, guidance=guidance, mu=mu)
        plan = session.plan(text=text)
        t0 = time.perf_counter()
        records = list(session.run(plan))
        elapsed = time.perf_counter() - t0
        reports = []
        for rec, caption in zip(records, captions):
            if rec.status != "ok":
                raise RuntimeError(f"image {rec.index} was {rec.status} by {rec.blocked_by}")
            with Image.open(rec.path) as im:
                reports.append(scorer.score(im.convert("RGB"), caption))
    summary = scorer.summarise(reports)
    return {
        "preset": preset, "seed": seed,
        "steps": records[0].steps, "guidance": records[0].guidance, "mu": records[0].mu,
        **{k: round(float(v), 4) for k, v in summary.items()},
        "n": len(reports),
        "seconds": round(elapsed, 2),
        "per_image": [{"caption": c, "adherence": round(r.adherence, 4), "failed": r.failed}
                      for c, r in zip(captions, reports)],
    }


# --------------------------------------------------------------------------------------------
# Learning curve over a training run's checkpoints

def export_checkpoint(ckpt: Path, weights: Path, folder: Path) -> dict[str, Path]:
    """The EMA weights of a raw/turbo checkpoint as loadable files: ``{"dit": file}`` and, when
    the text tower was trained with it, ``{"text_encoder": folder}`` (tokenizer from ``weights``)."""
    from safetensors.torch import load_file, save_file

    from nanodev.train import split_dit_with_text

    folder.mkdir(parents=True, exist_ok=True)
    dit, tower = split_dit_with_text(load_file(str(ckpt / "ema.safetensors")))
    save_file(dit, str(folder / "dit.safetensors"))
    parts = {"dit": folder / "dit.safetensors"}
    if tower is not None:
        te = folder / "text_encoder"
        shutil.copytree(Path(weights) / "text_encoder", te)
        save_file(tower, str(te / "model.safetensors"))
        parts["text_encoder"] = te
    return parts


def curve(run_dir: Path, *, weights: Path, preset: str, until: int | None = None, n: int = DEFAULT_COUNT,
          out: Path | None = None, poll: float = 30.0, log=print) -> list[dict]:
    """Score the EMA weights of every checkpoint in ``run_dir`` (waiting for new ones while
    training runs, up to step ``until``); one JSON line per checkpoint in ``out``."""
    from nanodev.train import checkpoint_step, list_checkpoints

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "curve.jsonl"
    done = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["step"]] = rec
    with tempfile.TemporaryDirectory(prefix="krea2kit-curve-") as tmp:
        while True:
            fresh = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) not in done]
            for ckpt in fresh:
                step = checkpoint_step(ckpt)
                try:
                    parts = export_checkpoint(ckpt, weights, Path(tmp) / f"step-{step}")
                except FileNotFoundError:
                    continue  # rotated away while we looked
                # a fresh Session per checkpoint (evaluate's default): parts of earlier steps are freed
                rec = evaluate(preset=preset, n=n, weights=weights, **parts)
                rec = {"step": step, **{k: v for k, v in rec.items() if k != "per_image"}}
                done[step] = rec
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                log(json.dumps(rec))
                shutil.rmtree(Path(tmp) / f"step-{step}", ignore_errors=True)
            if until is None or (done and max(done) >= until):
                return [done[k] for k in sorted(done)]
            time.sleep(poll)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "curve":
        ap = argparse.ArgumentParser(prog="python -m nanodev.evaluate curve")
        ap.add_argument("run_dir", type=Path)
        ap.add_argument("--weights", type=Path, required=True, help="the run's weights/ (text encoder, VAE)")
        ap.add_argument("--preset", default="krea2-nano-raw")
        ap.add_argument("--until", type=int)
        ap.add_argument("-n", type=int, default=DEFAULT_COUNT)
        ap.add_argument("--out", type=Path)
        args = ap.parse_args(argv[1:])
        _one_thread()
        curve(args.run_dir, weights=args.weights, preset=args.preset, until=args.until, n=args.n, out=args.out,
              log=lambda m: print(m, flush=True))
        return 0
    ap = argparse.ArgumentParser(prog="python -m nanodev.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="krea2-nano-turbo")
    ap.add_argument("--weights", type=Path, help="a training run's weights/ folder (default: the shipped ones)")
    ap.add_argument("--dit", type=Path, help="transformer weights file (overrides --weights for the DiT)")
    ap.add_argument("-n", type=int, default=DEFAULT_COUNT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--mu", type=float)
    ap.add_argument("--keep", type=Path, help="keep the rendered images in this folder")
    ap.add_argument("--json", action="store_true", help="print the summary and per-image scores as JSON")
    args = ap.parse_args(argv)
    _one_thread()
    rec = evaluate(preset=args.preset, n=args.n, seed=args.seed, weights=args.weights, dit=args.dit,
                   steps=args.steps, guidance=args.guidance, mu=args.mu, keep=args.keep)
    if args.json:
        print(json.dumps(rec))
    else:
        print(json.dumps({k: v for k, v in rec.items() if k != "per_image"}))
    return 0


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is fastest on shared cores (measured in train.py)


if __name__ == "__main__":
    sys.exit(main())
