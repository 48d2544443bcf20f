"""CONTRIBUTING.md's runner example, read out of the page: it passes the contract check and,
rendering a job's items last first, gives the pixels the built-in ``local`` runner gives
(an item's image never depends on the order it is rendered in)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from PIL import Image

from krea2kit.testing import check_plugin

ROOT = Path(__file__).resolve().parents[2]


def example_module(tmp_path):
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n# plugin module: (krea2kit_reverse)\.py\n(.*?)```", text, re.S)
    assert found, "CONTRIBUTING.md lost its runner example"
    path = tmp_path / f"{found.group(1)}.py"
    path.write_text(found.group(2))
    spec = importlib.util.spec_from_file_location(found.group(1), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_contributing_runner_renders_the_local_runners_pixels(tmp_path, monkeypatch, one_thread):
    from krea2kit.api import Session, load_recipe
    from krea2kit.jobs import build_job
    from krea2kit.jobs.runner import LocalRunner, resume_state, run_job

    module = example_module(tmp_path)
    results = check_plugin(module, "krea2kit-reverse")
    assert [(r.kind, r.name, r.status) for r in results] == [("runner", "reverse", "ok")]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle\na blue square --s 3\na green ring\n")
    done = {}
    for name, runner in (("local", LocalRunner()), ("reverse", module.ReverseRunner())):
        (tmp_path / f"{name}.toml").write_text(
            f'seed = 5\nwidth = 64\nheight = 64\n[sampler]\nsteps = 2\n[output]\ndir = "{name}"\nname = "{{index}}"\n')
        session = Session()
        job = build_job(session, load_recipe(f"{name}.toml"), "p.txt")
        records = list(run_job(session, job, runner, resume_state(job).pending, events=lambda *a, **k: None))
        done[name] = records
    assert [r.index for r in done["reverse"]] == [1, 2, 0]  # the steps-3 group first, then items 2, 0
    for rec in done["local"]:
        other = next(r for r in done["reverse"] if r.index == rec.index)
        with Image.open(rec.path) as a, Image.open(other.path) as b:
            assert a.tobytes() == b.tobytes() and other.seed == rec.seed
