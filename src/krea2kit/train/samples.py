"""Sample images at a checkpoint: the in-training adapter rendered on Turbo (and Raw if asked).

Train on Raw, check on Turbo: :func:`render_samples` renders the sample prompts on the Turbo
preset (its defaults: 8 steps, guidance 0) with the adapter as it is at this step, through
the ordinary run path (:class:`krea2kit.api.Session`: the recipe's ``[[loras]]`` attached as
runtime adapters by :mod:`krea2kit.runtime.loras`, content filters, atomic writes, metadata),
so a sample is exactly the image ``krea2kit run`` would make with the exported file; with
``raw_preset`` the same prompts on Raw too (its defaults: guidance on). One labelled contact
sheet per checkpoint (rows: prompts; columns: model and strength) goes beside the images.

Files, under ``out_dir``::

    step-000500/turbo-s1-00.png, raw-s1-00.png ...   one per prompt, model and strength
    step-000500-samples.png                          the contact sheet

A session is reused across checkpoints when the caller passes one (its parts stay loaded);
the adapter travels as a short-lived hidden safetensors file in the step folder (the run path
reads adapters from files), removed once rendered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from krea2kit.output.sheets import contact_sheet

if TYPE_CHECKING:  # pragma: no cover
    from krea2kit.lora.formats import LoraDelta, LoraFile

ROW_LABEL_CHARS = 28
ADAPTER_NAME = "training"


def step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"step-{int(step):06d}"


def sheet_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"step-{int(step):06d}-samples.png"


def _recipe(preset: str, prompts: Sequence[str], *, seed: int, lora: str | None, strength: float, tag: str,
            out: Path, model: Mapping[str, Any] | None, sampler: Mapping[str, Any] | None,
            size: tuple[int, int] | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "seed": int(seed),
        "prompts": [{"text": p, "name": f"{tag}-{i:02d}"} for i, p in enumerate(prompts)],
        "model": {"preset": preset, **dict(model or {})},
        "output": {"dir": str(out), "name": "{name}", "format": "png", "overwrite": True},
    }
    if sampler:
        data["sampler"] = dict(sampler)
    if size:
        data["width"], data["height"] = int(size[0]), int(size[1])
    if lora is not None:
        data["loras"] = [{"path": lora, "strength": float(strength), "name": ADAPTER_NAME}]
    return data


def _render(session: Any, data: dict[str, Any], events: Callable[..., None] | None) -> list[Any]:
    from krea2kit.recipe.loader import LoadedRecipe

    loaded = LoadedRecipe(data=data, provenance={}, path="<training samples>", name="samples")
    plan = session.plan(loaded)
    return list(session.run(plan, events=events))


def _short(text: str) -> str:
    return text if len(text) <= ROW_LABEL_CHARS else text[: ROW_LABEL_CHARS - 3] + "..."


def render_samples(adapter_state: "LoraFile | Mapping[str, LoraDelta] | str | os.PathLike | None",
                   prompts: Sequence[str], *, out_dir: str | os.PathLike, step: int,
                   turbo_preset: str | None = "krea2-turbo", raw_preset: str | None = None, seed: int = 0,
                   strength: float | Sequence[float] = 1.0, session: Any = None, settings: Any = None,
                   model: Mapping[str, Any] | None = None, raw_model: Mapping[str, Any] | None = None,
                   turbo_sampler: Mapping[str, Any] | None = None, raw_sampler: Mapping[str, Any] | None = None,
                   size: tuple[int, int] | None = None, baseline: bool = False, sheet: bool = True,
                   events: Callable[..., None] | None = None) -> list[Path]:
    """Render ``prompts`` with the adapter at ``step``; return the image paths, then the sheet's.

    ``adapter_state``: the adapter in krea2kit's internal form (or the path of a written
    adapter file; ``None`` renders without one). ``strength``: one value or several (a slider:
    e.g. ``[-1, 0, 1]``), one sheet column each. ``model`` / ``raw_model``: extra ``[model]``
    keys for the Turbo / Raw render (``weights``, ``device``, ``dtype``, ``weights_dtype``,
    ``offload``); ``turbo_sampler`` / ``raw_sampler``: ``[sampler]`` keys (the presets'
    defaults otherwise: Turbo 8 steps, guidance 0). ``baseline``: also a column without the
    adapter. ``size``: (width, height), else the preset's. Images are named
    ``<model>-s<strength>-<prompt index>.png`` in ``step-NNNNNN/``.
    """
    if isinstance(prompts, int) and hasattr(adapter_state, "adapters") and hasattr(adapter_state, "recipe"):
        return render_trainer_samples(adapter_state, prompts)  # render_samples(trainer, step)
    if not prompts:
        return []
    if session is None:
        from krea2kit.api import Session

        session = Session(settings=settings)
    strengths = [float(strength)] if isinstance(strength, (int, float)) else [float(s) for s in strength]
    folder = step_dir(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    temp: Path | None = None
    lora: str | None = None
    if isinstance(adapter_state, (str, os.PathLike)):
        lora = str(adapter_state)
    elif adapter_state is not None:
        from krea2kit.files import temp_name_for
        from krea2kit.train.export import save_adapter

        temp = temp_name_for(folder / "adapter.safetensors")
        lora = str(save_adapter(adapter_state, temp, format="native", overwrite=True))
    columns: list[tuple[str, str, dict[str, Any]]] = []  # (label, tag, recipe)
    models = [("turbo", turbo_preset, model, turbo_sampler)] if turbo_preset else []
    if raw_preset:
        models.append(("raw", raw_preset, raw_model, raw_sampler))
    for kind, preset, extra, sampler in models:
        if baseline or lora is None:
            columns.append((f"{kind} base", f"{kind}-base",
                            _recipe(preset, prompts, seed=seed, lora=None, strength=0.0, tag=f"{kind}-base",
                                    out=folder, model=extra, sampler=sampler, size=size)))
        if lora is None:
            continue
        for s in strengths:
            tag = f"{kind}-s{s:g}"
            columns.append((f"{kind} {s:g}", tag, _recipe(preset, prompts, seed=seed, lora=lora, strength=s, tag=tag,
                                                         out=folder, model=extra, sampler=sampler, size=size)))
    if not columns:
        if temp is not None:
            temp.unlink(missing_ok=True)
        return []
    paths: list[Path] = []
    grid: list[list[Any]] = [[None] * len(columns) for _ in prompts]
    try:
        for c, (_label, _tag, data) in enumerate(columns):
            for record in _render(session, data, events):
                if record.status == "ok" and record.path:
                    paths.append(Path(record.path))
                    if sheet:
                        from PIL import Image

                        with Image.open(record.path) as im:
                            grid[record.index][c] = im.convert("RGB")
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    if sheet:
        paths.append(_write_sheet(grid, [label for label, _, _ in columns], [_short(p) for p in prompts],
                                  sheet_path(out_dir, step), step=step, prompts=prompts, strengths=strengths,
                                  presets=[m[1] for m in models], seed=seed))
    return paths


def _weights(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    return {k: (v if isinstance(v, str) else dict(v)) for k, v in section.model_dump(exclude_none=True).items()}


def _warnings_only(events: Callable[..., None] | None) -> Callable[..., None] | None:
    """The run's progress events would read as the trainer's own (its "stage", "step"):
    pass on only warnings."""
    if events is None:
        return None

    def forward(event: str, /, **data: Any) -> None:  # pipeline events carry a ``name=`` of their own
        if event == "warning":
            events(event, **data)

    return forward


def render_trainer_samples(trainer: Any, step: int) -> list[Path]:
    """The ``[samples]`` of a :class:`krea2kit.train.loop.Trainer` at ``step``, into
    ``<work_dir>/samples``: Turbo (``samples.turbo``, else the base preset's Turbo sibling, with
    ``samples.turbo_weights``) and, with ``samples.on`` naming it, the base Raw preset.

    The Raw render asks the trainer's own session for the base model with the trainer's model
    keys, so it gets the transformer being trained (no second copy): its training hooks are
    switched off (``multiplier = 0``) while the adapter, as exported, is applied by the run path,
    then switched back on.
    """
    r = trainer.recipe
    s = r.samples
    base = r.base
    common = {"device": base.device, "dtype": base.dtype, "offload": "none"}
    turbo = s.turbo or (base.preset.replace("raw", "turbo") if "raw" in base.preset else base.preset)
    turbo_model = {**common, "weights_dtype": base.weights_dtype}
    if str(getattr(trainer, "device", "")).startswith("cuda"):
        # a second 12.8B transformer beside the one training would not fit a consumer card:
        # stream Turbo's blocks from host memory (bit-identical images, two blocks resident)
        turbo_model["offload"] = "blocks"
    if _weights(s.turbo_weights):
        turbo_model["weights"] = _weights(s.turbo_weights)
    raw_model = {**common, "weights_dtype": base.weights_dtype}
    if _weights(base.weights):
        raw_model["weights"] = _weights(base.weights)
    size = (s.width or s.height, s.height or s.width) if (s.width or s.height) else None
    adapters = trainer.adapters
    was = adapters.multiplier
    adapters.multiplier = 0.0
    session = getattr(trainer, "_session", None)
    if session is None:
        from krea2kit.api import Session

        session = trainer._session = Session(settings=trainer.settings, host=getattr(trainer, "host", None))
    try:
        return render_samples(adapters.lora_file(name=trainer.name), list(s.prompts),
                              out_dir=Path(trainer.work_dir) / "samples", step=step,
                              turbo_preset=turbo if "turbo" in s.on else None,
                              raw_preset=base.preset if "raw" in s.on else None, seed=s.seed, strength=s.strength,
                              session=session, model=turbo_model, raw_model=raw_model, size=size,
                              events=_warnings_only(getattr(trainer, "events", None)))
    finally:
        adapters.multiplier = was


def _write_sheet(grid, labels, row_labels, target: Path, **info: Any) -> Path:
    from krea2kit.output.metadata import ImageMetadata, build_record
    from krea2kit.output.writers import write_image

    image = contact_sheet(grid, labels, row_labels)
    record = build_record(recipe={}, extra={"training_samples": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                                 for k, v in info.items()}})
    return write_image(image, target, format="png", metadata=ImageMetadata(parameters=None, krea2kit=record),
                       overwrite=True)


__all__ = ["contact_sheet", "render_samples", "render_trainer_samples", "sheet_path", "step_dir"]
