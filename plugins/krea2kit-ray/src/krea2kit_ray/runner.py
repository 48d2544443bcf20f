"""The ``ray`` runner: a job's pending items as a Ray Data stream through three stages.

::

    items ─map_batches(RenderStage, one actor per GPU)─▶ decoded images
          ─map_batches(FilterStage, CPU actors)────────▶ + image filter decisions
          ─iter_rows() in the driver──────────────────▶ ItemWriter: metadata, atomic write,
                                                        sha256 ─▶ manifest line, stdout

* **Render actors** build a krea2kit ``Session`` once and keep its parts loaded for their
  whole life; each item runs the ordinary pipeline up to the decoded image
  (:class:`krea2kit.jobs.work.ItemRenderer`), so the pixels are those of a local run.
* **Image filters are their own stage** (:class:`krea2kit.jobs.work.ItemFilter`), on CPU
  actors: the GPU actors never wait on a classifier, and the filter policy (every filter,
  any block wins, fail closed, audit log) is krea2kit's own.
* **The driver writes** every file and the manifest. Why not the actors, on shared storage:
  the manifest must be appended by one process anyway (its lock and fsync order), the
  output layout and ``-N`` name claims then follow exactly the local code path, and a
  cluster needs no shared file system for outputs at all, only the driver's disk. An image
  travels once (PNG-sized pixels, a few MB at 1024²), far below a GPU's render time.

Fault tolerance: Ray Data restarts a dead render or filter actor (its default
``max_restarts=-1``) and retries the batch it held (``max_task_retries=-1``); an item is
written, and its manifest line appended, only when it reaches the driver, so killing a
worker loses no finished image, and a retried item gives the same pixels (its seed is the
job's, not the worker's).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

from krea2kit_ray import RayOptions


class RenderStage:
    """A Ray Data actor: one krea2kit Session (parts loaded once) rendering items."""

    def __init__(self, spec: dict, settings: Any, threads: int) -> None:
        import torch

        from krea2kit.api import Session
        from krea2kit.jobs.work import ItemRenderer

        from krea2kit.errors import Krea2kitError

        torch.set_num_threads(max(1, threads))  # as many as the CPUs Ray gave this actor
        self.problem: Krea2kitError | None = None
        try:
            self.renderer = ItemRenderer(spec, session=Session(settings=settings))
        except Krea2kitError as exc:  # e.g. a file the recipe names is missing on this node
            self.problem = exc

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from krea2kit.errors import Krea2kitError

        payloads = []
        for index in batch["item"]:
            try:
                if self.problem is not None:
                    raise self.problem
                (item,) = self.renderer.render([int(index)])
            except Krea2kitError as exc:  # the user's to fix: the driver raises it as it is
                item = {"index": int(index), "status": "error", "error": exc}
            item["pid"] = os.getpid()
            payloads.append(pickle.dumps(item))
        return {"item": batch["item"], "payload": np.array(payloads, dtype=object)}


class FilterStage:
    """A Ray Data actor: the image content filters of the job's plans, loaded once."""

    def __init__(self, spec: dict, settings: Any) -> None:
        from krea2kit.api import Session
        from krea2kit.jobs.work import ItemFilter

        from krea2kit.errors import Krea2kitError

        self.problem: Krea2kitError | None = None
        try:
            self.filters = ItemFilter(spec, session=Session(settings=settings))
        except Krea2kitError as exc:
            self.problem = exc

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from krea2kit.errors import Krea2kitError

        payloads = []
        for raw in batch["payload"]:
            item = pickle.loads(raw)
            if item["status"] == "rendered":
                try:
                    if self.problem is not None:
                        raise self.problem
                    item = self.filters.check(item)
                except Krea2kitError as exc:
                    item = {"index": item["index"], "status": "error", "error": exc, "pid": item.get("pid")}
            payloads.append(pickle.dumps(item))
        return {"item": batch["item"], "payload": np.array(payloads, dtype=object)}


class RayRunner:
    name = "ray"

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()

    def _connect(self) -> bool:
        """Connect to (or start) a cluster; True when this call started it."""
        import ray

        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.options.address, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=True)
        except Exception as exc:  # no cluster there, a version mismatch, ...: say so, no traceback
            from krea2kit.errors import Krea2kitError

            where = f"at {self.options.address}" if self.options.address else "(a new local one)"
            raise Krea2kitError(f"cannot start or reach the Ray cluster {where}: {type(exc).__name__}: {exc}",
                                key="--address", hint="start one with `ray start --head` and give --address auto, "
                                                      "or leave --address out for a local one") from None
        return True

    def plan_resources(self) -> dict[str, Any]:
        """How many render actors and what each takes, from the cluster and the options."""
        import ray

        o = self.options
        cluster = ray.cluster_resources()
        gpus = float(cluster.get("GPU", 0))
        per_gpu = o.gpus_per_worker if o.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
        workers = o.workers or (max(1, int(gpus // per_gpu)) if per_gpu else 1)
        return {"workers": workers, "gpus": per_gpu, "cpus": o.cpus_per_worker, "cluster": cluster}

    def run(self, job: Any, items: Sequence[int], *, session: Any, events: Any) -> Iterator[Any]:
        import ray
        import ray.data

        from krea2kit.jobs.work import ItemWriter

        started = self._connect()
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # krea2kit's own progress is on stderr
            context.print_on_execution_start = False
            res = self.plan_resources()
            spec = job.spec.to_json()
            # Ray Data's actor pools restart a dead actor and retry the batch it held by default
            # (max_restarts=-1, max_task_retries=-1: ray/data/_internal/execution/operators/
            # actor_pool_map_operator.py); tests/test_ray_runner.py kills a worker to hold it to that.
            ds = ray.data.from_items([{"item": int(i)} for i in items], override_num_blocks=max(1, len(items)))
            render_args: dict[str, Any] = {"num_cpus": res["cpus"]}
            if res["gpus"]:
                render_args["num_gpus"] = res["gpus"]
            ds = ds.map_batches(RenderStage, fn_constructor_kwargs={
                "spec": spec, "settings": session.settings, "threads": int(res["cpus"]) or 1},
                batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=res["workers"]),
                **render_args)
            ds = ds.map_batches(FilterStage, fn_constructor_kwargs={"spec": spec, "settings": session.settings},
                                batch_size=1, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=self.options.filter_workers),
                                num_cpus=self.options.filter_cpus)
            writer = ItemWriter(job.plans, session=session)
            seen: set[int] = set()
            for row in ds.iter_rows():
                item = pickle.loads(row["payload"])
                if item["status"] == "error":
                    raise item["error"]
                if item["index"] in seen:  # a retried batch that had in fact finished: written once
                    continue
                seen.add(item["index"])
                record = writer.write(item)
                events("job_end", record=record, worker=item.get("pid"))
                yield record
        finally:
            if started:
                ray.shutdown()


def load(options: RayOptions | None, context: Any) -> RayRunner:
    return RayRunner(options)
