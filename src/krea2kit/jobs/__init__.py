"""Batch jobs: a recipe plus a prompt source, resumable through a manifest, on any runner.

* :mod:`krea2kit.jobs.sources`: prompt files, JSON lines, stdin and kohya-style lines;
* :mod:`krea2kit.jobs.spec`: planning a job into numbered items (seeds and names fixed);
* :mod:`krea2kit.jobs.manifest`: the append-only manifest and the resume check;
* :mod:`krea2kit.jobs.runner`: running the pending items on a runner (``local`` built in);
* :mod:`krea2kit.jobs.work`: the render / filter / write stages a distributed runner uses.
"""

from __future__ import annotations

from krea2kit.jobs.spec import BatchJob, JobSpec, build_job, job_source, plan_groups

__all__ = ["BatchJob", "JobSpec", "build_job", "job_source", "plan_groups"]
