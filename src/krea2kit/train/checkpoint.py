"""Training checkpoints: safetensors + JSON, never pickles, written atomically.

A checkpoint is a folder ``ckpt-NNNNNNN`` (the number of optimizer steps done) in the run's
work folder:

* ``adapter.safetensors``: the adapter factors under native names (``blocks.0.attn.wq.down``);
* ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``<param index>.<name>``
  (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``); the param groups and any non-tensor state go
  into ``state.json`` (``torch.save`` of an optimizer pickles; a pickle from a shared folder
  can run code, so it is never written nor read);
* ``rng.safetensors``: the CPU (and CUDA) generator states as uint8 tensors;
* ``state.json``: format, step, data position (epoch, batch), the recipe fingerprint, losses.

The folder is filled under a hidden temporary name and renamed into place in one step, so a
crash or Ctrl-C leaves either the previous checkpoints or the complete new one, never half
of one; only the newest :data:`KEEP` are kept. Every random draw of step ``n`` comes from a
generator seeded with ``(seed, n)`` (:func:`step_generator`), so a resumed run continues
bit for bit on the CPU; the global generator states are restored as well for anything
(a plugin, dropout) that draws from them.
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from krea2kit.errors import UsageError

FORMAT = "krea2kit.train-checkpoint/1"
PREFIX = "ckpt-"
KEEP = 2
_TMP = ".ckpt-tmp-"


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for step ``step`` of a run (``stream`` separates independent uses)."""
    s = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(step), int(stream), 0x6B32_7472])
    return int(s.generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file of a checkpoint folder: CPU copies, the user's file mode, fsynced
    (the folder is renamed into place afterwards). Also the nano trainer's checkpoint writer."""
    from safetensors.torch import save_file

    from krea2kit.files import user_file_mode

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata=metadata)
    os.chmod(path, user_file_mode())  # safetensors writes 0600; the umask decides, as for any file
    with open(path, "rb") as f:  # durable before the folder is renamed into place
        os.fsync(f.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file (safetensors: nothing executes)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able rest) of ``opt.state_dict()``."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints in ``work_dir``, oldest first (temporary folders are ignored)."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def remove_stale_temps(work_dir: Path) -> None:
    """Folders left by a process killed while writing a checkpoint (never complete ones)."""
    if Path(work_dir).is_dir():
        for p in Path(work_dir).iterdir():
            if p.name.startswith(_TMP):
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    adapter: dict[str, torch.Tensor]


def save_checkpoint(work_dir: Path, step: int, *, adapter: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict) -> Path:
    """Write ``ckpt-<step>`` atomically (see the module docstring); returns its path."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    final = work_dir / f"{PREFIX}{step:07d}"
    tmp = work_dir / f"{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_tensors(adapter, tmp / "adapter.safetensors")
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        save_tensors(rng_tensors(), tmp / "rng.safetensors")
        doc = {"format": FORMAT, "step": int(step), "optimizer": opt_meta, **state}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if final.exists():  # the same step written again (a resumed run re-reaching it): replace
            old = work_dir / f"{_TMP}old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(work_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer | None = None, *,
                    restore_rng_state: bool = True) -> Checkpoint:
    """Read a checkpoint folder; load the optimizer state into ``optimizer`` and restore the
    global generators. A file that is not a checkpoint of this format is a clear error."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"not a readable training checkpoint ({exc})", file=str(path),
                         hint="remove the folder to start that part over") from None
    if state.get("format") != FORMAT:
        raise UsageError(f"unknown checkpoint format {state.get('format')!r}", file=str(path),
                         hint=f"this krea2kit reads {FORMAT!r}")
    adapter = load_tensors(path / "adapter.safetensors")
    if optimizer is not None:
        optimizer_from_files(optimizer, load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    if restore_rng_state:
        restore_rng(load_tensors(path / "rng.safetensors"))
    return Checkpoint(path=path, step=int(state["step"]), state=state, adapter=adapter)
