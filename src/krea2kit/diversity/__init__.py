"""Diversity of a batch of images: scores and "render n, keep the k most diverse".

A recipe's ``[diversity]`` table (or ``krea2kit run --keep-diverse K``) turns it on:

* an **embedder** part (``diversity.embedder``, the ``register_embedders`` hook; built in:
  ``lab-hog``, weight-free) maps every rendered image to a unit vector;
* :mod:`krea2kit.diversity.scores` gives the batch's mean pairwise cosine distance and Vendi
  score;
* with ``keep = K``, :mod:`krea2kit.diversity.select` picks the K most diverse images of each
  prompt (greedy, deterministic); only those are written.

A *batch* is one prompt entry's images (its ``count``; the images of ``--prompt`` lines and
``[[prompts]]`` entries are batches of their own), so "keep 2 of 8" keeps two per prompt.
Images stay in memory until their batch is complete, then the kept ones are written, each
atomically, with the scores in their metadata; the others are never written. Images a content
filter blocked are not part of the batch.

This module is the glue the pipeline calls (:class:`DiversityRun`); it loads nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from krea2kit.diversity.scores import batch_scores, mean_pairwise_distance, nearest_distances, vendi_score
from krea2kit.diversity.select import METHODS, select_diverse

DEFAULT_EMBEDDER = "lab-hog"

__all__ = ["DEFAULT_EMBEDDER", "METHODS", "DiversityRun", "batch_scores", "mean_pairwise_distance",
           "nearest_distances", "resolve_embedder", "select_diverse", "vendi_score"]


def resolve_embedder(plan: Any, registry: Any) -> tuple[Any, Any] | None:
    """The embedder descriptor of ``plan``'s ``[diversity]`` table and its validated options,
    or ``None`` without the table. An unknown name or option is a ``RecipeError`` (exit 2)
    naming the file and key, before anything loads."""
    from krea2kit.recipe.plan import part_options

    section = getattr(plan.recipe, "diversity", None)
    if section is None:
        return None
    loaded = plan.loaded
    descriptor = registry.get("embedder", section.embedder, key="diversity.embedder",
                              file=loaded.file_of("diversity.embedder"))
    options = part_options(loaded, section, descriptor, table="diversity", what=f"embedder {section.embedder!r}")
    return descriptor, options


@dataclass
class _Rendered:
    job: Any
    record: Any
    image: Any
    info: Any


@dataclass
class DiversityRun:
    """One run's batches: collects rendered images per prompt entry, and when a batch is
    complete embeds, scores and selects them (:meth:`finish`)."""

    plan: Any
    descriptor: Any
    options: Any = None
    _last_of_batch: dict[int, int] = field(default_factory=dict)
    _pending: list[_Rendered] = field(default_factory=list)

    def __post_init__(self) -> None:
        for job in self.plan.jobs:  # the last job index of every prompt entry
            self._last_of_batch[job.prompt_index] = job.index

    @property
    def keep(self) -> int | None:
        return self.plan.recipe.diversity.keep

    @property
    def method(self) -> str:
        return self.plan.recipe.diversity.method

    def add(self, job: Any, record: Any, image: Any, info: Any) -> None:
        """A rendered image that passed the filters, held until its batch is complete."""
        self._pending.append(_Rendered(job, record, image, info))

    def ends_batch(self, job: Any) -> bool:
        return self._last_of_batch.get(job.prompt_index) == job.index

    def finish(self, embedder: Any) -> list[tuple[Any, Any, Any, Any, dict[str, Any]]]:
        """Embed and score the pending batch: ``[(job, record, image, info, report)]`` in job
        order, ``report["selected"]`` saying whether to write the image. Empties the batch."""
        batch, self._pending = self._pending, []
        if not batch:
            return []
        images = [r.image for r in batch]
        embeddings = embed_checked(embedder, images, self.descriptor)
        n = len(batch)
        keep = n if self.keep is None else min(self.keep, n)
        order = select_diverse(embeddings, keep, self.method)
        kept = sorted(order)
        rank = {index: position for position, index in enumerate(order)}
        common: dict[str, Any] = {
            "embedder": self.descriptor.name if not self.descriptor.plugin or self.descriptor.plugin == "krea2kit"
            else f"{self.descriptor.plugin}:{self.descriptor.name}",
            "embedder_id": str(embedder.name),
            "batch": batch_scores(embeddings),
        }
        if self.keep is not None:
            common.update(method=self.method, keep=self.keep, kept=batch_scores(embeddings[kept]))
        # each image's distance to the nearest other image it is written with (the kept set)
        nearest = dict(zip(kept, nearest_distances(embeddings[kept])))
        out = []
        for i, item in enumerate(batch):
            report = dict(common, selected=i in rank)
            if self.keep is not None:
                report["rank"] = rank.get(i)
            distance = nearest.get(i)
            report["nearest_distance"] = None if distance is None else round(distance, 6)
            out.append((item.job, item.record, item.image, item.info, report))
        return out


def embed_checked(embedder: Any, images: list, descriptor: Any) -> Any:
    """``embedder.embed(images)`` as a float64 numpy array, refused with a ``PluginError`` naming
    the plugin when it is not ``(n, dim)`` and finite (a traceback would blame krea2kit)."""
    import numpy as np
    import torch

    from krea2kit.errors import PluginError

    with torch.inference_mode():
        out = embedder.embed(images)
    array = out.detach().to("cpu").double().numpy() if hasattr(out, "detach") else np.asarray(out, dtype=np.float64)
    expected = (len(images), int(embedder.dim))
    where = f"embedder {descriptor.name!r} from plugin {descriptor.plugin or '?'!r}"
    if tuple(array.shape) != expected:
        raise PluginError(f"{where}: embed() of {len(images)} images returned shape {tuple(array.shape)}, "
                          f"expected {expected}", hint="run `krea2kit plugins --check` for the full report")
    if not np.isfinite(array).all():
        raise PluginError(f"{where}: embed() returned NaN or infinite values",
                          hint="run `krea2kit plugins --check` for the full report")
    return array


def summary_line(reports: list[dict[str, Any]], jobs: list[Any]) -> str:
    """One stderr line for a finished batch: scores, and with ``keep`` what was kept and dropped."""
    first = reports[0]
    batch = first["batch"]
    mean = batch["mean_distance"]
    scores = f"Vendi {batch['vendi']:.2f}" + (f", mean distance {mean:.3f}" if mean is not None else "")
    prompt = jobs[0].prompt_index + 1
    if "keep" not in first:
        return f"diversity of prompt {prompt}'s {batch['images']} image(s) ({first['embedder']}): {scores}"
    kept = [j.index + 1 for j, r in zip(jobs, reports) if r["selected"]]  # 1-based, as the progress lines
    dropped = [j.index + 1 for j, r in zip(jobs, reports) if not r["selected"]]
    if not dropped:
        return (f"kept all {len(kept)} image(s) of prompt {prompt} (keep = {first['keep']}) "
                f"({first['embedder']}): {scores}")
    line = (f"kept the {len(kept)} most diverse of prompt {prompt}'s {batch['images']} image(s) "
            f"({first['embedder']}, {first['method']}): {scores}; kept set Vendi {first['kept']['vendi']:.2f}")
    return line + f"; not written: image(s) {', '.join(str(i) for i in dropped)}"
