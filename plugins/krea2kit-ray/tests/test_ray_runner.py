"""The ``ray`` runner on a local Ray cluster with the embedded nano model: the same pixels as a
local run, a killed worker loses no finished image, and the real CLI (``--on ray``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import krea2kit_ray

RECIPE = """
seed = 3
width = 64
height = 64
[sampler]
steps = 2
[variation]
seed = 100
strength = 0.3
[output]
dir = "{out}"
"""
PROMPTS = """# a job of six images: plain, kohya-style and JSON lines
a red circle on a white background
a blue square at the top --d 9 --s 3
{"prompt": "a green ring on the left", "count": 2}
two yellow crosses --n red --w 64 --h 48
a purple triangle in the center, black background
"""


def test_the_plugin_follows_the_krea2kit_contract():
    from krea2kit.testing import check_plugin

    results = check_plugin(krea2kit_ray, "krea2kit-ray")
    assert [(r.kind, r.name, r.status) for r in results] == [("runner", "ray", "ok")]


def test_listing_imports_neither_ray_nor_torch():
    code = ("import sys, krea2kit_ray; from krea2kit.plugins import Host; "
            "Host(load_entry_points=False, extra_plugins=((krea2kit_ray, 'krea2kit-ray'),)); "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_options_are_checked():
    from pydantic import ValidationError

    from krea2kit_ray import RayOptions

    assert RayOptions(workers=2, cpus_per_worker=1).cpus_per_worker == 1.0
    with pytest.raises(ValidationError):
        RayOptions(workers=0)
    with pytest.raises(ValidationError):
        RayOptions(nodes=3)


# --- on a local Ray cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster (2 CPUs, no dashboard) for the module; krea2kit isolated from the
    user's config. Render and filter actors inherit this environment."""
    ray = pytest.importorskip("ray")
    home = tmp_path_factory.mktemp("krea2kit-home")
    saved = {k: os.environ.get(k) for k in ("KREA2KIT_CONFIG", "KREA2KIT_CACHE_DIR")}
    os.environ["KREA2KIT_CONFIG"] = str(home / "config.toml")
    os.environ["KREA2KIT_CACHE_DIR"] = str(home / "cache")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_job(tmp_path: Path, name: str):
    from krea2kit.api import Session, load_recipe
    from krea2kit.jobs import build_job

    recipe = tmp_path / "job.toml"
    recipe.write_text(RECIPE.format(out=(tmp_path / name).as_posix()))
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    session = Session()
    return session, build_job(session, load_recipe(recipe), str(tmp_path / "prompts.txt"))


def pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def manifest(job) -> dict[int, dict]:
    from krea2kit.jobs.manifest import read_lines

    return {line["index"]: line for line in read_lines(job.manifest_path)}


def ray_runner(**options):
    from krea2kit_ray import RayOptions
    from krea2kit_ray.runner import RayRunner

    # 2 render actors of half a CPU each and a filter actor of half a CPU fit the 2-CPU cluster
    return RayRunner(RayOptions(**{"workers": 2, "cpus_per_worker": 0.5, "filter_cpus": 0.5, **options}))


def run_all(session, job, runner, events=None):
    from krea2kit.jobs.runner import resume_state, run_job

    pending = resume_state(job).pending
    return list(run_job(session, job, runner, pending, events=events or (lambda *a, **k: None)))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 3])
def test_ray_workers_give_the_pixels_of_a_local_run(cluster, tmp_path, workers):
    """Variation seeds included: the image of an item never depends on worker count or order
    (one local process vs 2 and 3 Ray render actors)."""
    import torch

    from krea2kit.jobs.runner import LocalRunner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each render actor (half a CPU -> one torch thread)
    try:
        session, local_job = make_job(tmp_path, "local")
        local = run_all(session, local_job, LocalRunner())
    finally:
        torch.set_num_threads(threads)
    session, ray_job = make_job(tmp_path, "ray")
    # 3 actors of half a CPU and the filter actor's half fill the 2-CPU cluster
    on_ray = run_all(session, ray_job, ray_runner(workers=workers))

    assert sorted(r.index for r in on_ray) == list(range(6)) == sorted(r.index for r in local)
    by_index = {r.index: r for r in on_ray}
    for rec in local:
        other = by_index[rec.index]
        assert other.status == rec.status == "ok"
        assert (other.seed, other.variation_seed, other.width, other.height) == \
               (rec.seed, rec.variation_seed, rec.width, rec.height)
        assert Path(other.path).name == Path(rec.path).name  # the same output layout
        assert pixels(other.path) == pixels(rec.path), f"item {rec.index} differs"
    lines = manifest(ray_job)
    assert sorted(lines) == list(range(6)) and all(line["status"] == "ok" for line in lines.values())
    assert lines[1]["source"].endswith("prompts.txt:3") and lines[1]["seed"] == 9


@pytest.mark.slow
def test_killing_a_worker_mid_job_loses_no_finished_image(cluster, tmp_path):
    session, job = make_job(tmp_path, "killed")
    killed: list[int] = []
    finished_before: dict[int, str] = {}

    def events(event, record=None, worker=None, **data):
        if event != "job_end":
            return
        if not killed and worker:
            finished_before[record.index] = record.sha256
            os.kill(worker, signal.SIGKILL)  # the render actor that made this image dies mid-job
            killed.append(worker)

    records = run_all(session, job, ray_runner(), events)
    assert killed, "no worker was killed"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert sorted(r.index for r in records) == list(range(6))  # the job completed
    lines = manifest(job)
    assert sorted(lines) == list(range(6))
    for index, sha in finished_before.items():  # finished before the kill: still there, unchanged
        assert lines[index]["sha256"] == sha
    from krea2kit.jobs.manifest import file_sha256

    for line in lines.values():
        assert line["status"] == "ok" and file_sha256(line["path"]) == line["sha256"]


def _ray_entry_point() -> bool:
    return any(ep.name == "krea2kit-ray" for ep in importlib.metadata.entry_points(group="krea2kit"))


@pytest.mark.slow
@pytest.mark.skipif(not _ray_entry_point(), reason="krea2kit-ray is not installed (pip install -e plugins/krea2kit-ray)")
def test_cli_on_ray_then_resume_locally(cluster, tmp_path):
    """`krea2kit run --on ray` through the real CLI (connected to the cluster with --address);
    a tampered image is then found and rendered again by a local run, at the same name."""
    recipe = tmp_path / "job.toml"
    recipe.write_text(RECIPE.format(out="out") + '[job]\nprompts = "prompts.txt"\n')
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    env = dict(os.environ, NO_COLOR="1")
    address = cluster.get_runtime_context().gcs_address

    def run(*args):
        return subprocess.run([sys.executable, "-m", "krea2kit", "run", str(recipe), *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=600)

    first = run("--on", "ray", "--address", address, "--runner-opt", "workers=1", "--json")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert sorted(r["index"] for r in records) == list(range(6))
    victim = next(r for r in records if r["index"] == 4)
    before = pixels(tmp_path / victim["path"])
    (tmp_path / victim["path"]).write_bytes(b"not the image")

    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [victim["path"]]
    assert "skipping 5 finished image(s)" in second.stderr
    assert pixels(tmp_path / victim["path"]) == before
