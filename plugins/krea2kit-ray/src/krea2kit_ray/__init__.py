"""krea2kit-ray: run krea2kit batch jobs on a Ray cluster (``krea2kit run JOB --on ray``).

Registers the runner ``ray`` through the ``register_runners`` hook. Nothing heavy is imported
here (no ray, no torch): ``krea2kit plugins`` and ``--help`` stay fast; the runner imports
Ray when a job runs (:mod:`krea2kit_ray.runner`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from krea2kit.hookspecs import hookimpl
from krea2kit.registry import RunnerDescriptor

KREA2KIT_CONTRACT = 2  # the krea2kit plugin contract this plugin is written for


class RayOptions(BaseModel):
    """``--runner-opt KEY=VALUE`` settings of ``--on ray`` (``--address`` is ``address``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    address: str | None = Field(None, description="Ray cluster address ('auto', 'ray://head:10001'); default: "
                                                  "the cluster this process is connected to, else a new local one")
    workers: int | None = Field(None, ge=1, le=4096, description="Render actors (default: one per GPU in the "
                                                                 "cluster; 1 without GPUs)")
    gpus_per_worker: float | None = Field(None, ge=0, le=64, description="GPUs per render actor (default: 1 when "
                                                                          "the cluster has GPUs, else 0)")
    cpus_per_worker: float = Field(1.0, ge=0, le=1024, description="CPUs per render actor (also its torch threads)")
    filter_workers: int = Field(1, ge=1, le=1024, description="Image filter actors")
    filter_cpus: float = Field(0.5, ge=0, le=1024, description="CPUs per image filter actor")


@hookimpl
def register_runners(register):
    register(RunnerDescriptor(
        name="ray", summary="Ray Data: one pipeline actor per GPU, image filters as their own stage, the driver "
                            "writes files and the manifest",
        load="krea2kit_ray.runner:load", options=RayOptions))
