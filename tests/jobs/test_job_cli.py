"""Batch jobs through the real CLI on the embedded nano model: prompt files and stdin, the
manifest, resuming (finished images skipped, a tampered or deleted one rendered again at its
own name, same pixels), refusals before anything loads, and what an image may not carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from krea2kit.jobs.manifest import file_sha256, read_lines

RECIPE = """
seed = 3
width = 64
height = 64
[sampler]
steps = 2
[output]
dir = "out"
"""
PROMPTS = """# three images
a red circle on a white background
{"prompt": "a blue square", "seed": 7, "count": 2}
"""


def pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


@pytest.fixture
def job(tmp_path):
    (tmp_path / "job.toml").write_text(RECIPE)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    return tmp_path


def manifest(folder: Path) -> list[dict]:
    return read_lines(folder / "out" / "job.manifest.jsonl")


@pytest.mark.slow
def test_a_job_resumes_skipping_finished_images_and_renders_damaged_ones_again(cli_inproc, job, one_thread):
    first = cli_inproc("run", "job.toml", "--prompts", "prompts.txt")
    assert first.code == 0, first.stderr
    paths = first.stdout.splitlines()
    assert paths == ["out/job-0000-3.png", "out/job-0001-7.png", "out/job-0002-8.png"]
    lines = manifest(job)
    assert [(x["index"], x["seed"], x["status"], x["path"]) for x in lines] == \
           [(0, 3, "ok", paths[0]), (1, 7, "ok", paths[1]), (2, 8, "ok", paths[2])]
    assert all(file_sha256(job / x["path"]) == x["sha256"] for x in lines)
    assert lines[1]["prompt"] == "a blue square" and lines[1]["source"] == "prompts.txt:3"
    before = {p: pixels(job / p) for p in paths}

    again = cli_inproc("run", "job.toml", "--prompts", "prompts.txt")
    assert again.code == 0 and again.stdout == ""
    assert "skipping 3 finished image(s)" in again.stderr and "loading" not in again.stderr

    (job / paths[1]).write_bytes(b"\x89PNG tampered")
    (job / paths[2]).unlink()
    third = cli_inproc("run", "job.toml", "--prompts", "prompts.txt")
    assert third.code == 0, third.stderr
    assert third.stdout.splitlines() == paths[1:]  # the same names, nothing else rendered
    assert "skipping 1 finished image(s)" in third.stderr and "rendering them again: items 1, 2" in third.stderr
    for p in paths:  # an item rendered again alone gives the pixels it had in the full run
        assert pixels(job / p) == before[p]
    assert sorted(p.name for p in (job / "out").iterdir()) == ["job-0000-3.png", "job-0001-7.png",
                                                                "job-0002-8.png", "job.manifest.jsonl"]


def test_manifest_lines_are_written_as_images_finish(job, monkeypatch, one_thread):
    from krea2kit.api import Session, load_recipe
    from krea2kit.jobs import build_job
    from krea2kit.jobs.runner import LocalRunner, resume_state, run_job

    monkeypatch.chdir(job)
    session = Session()
    batch = build_job(session, load_recipe("job.toml"), "prompts.txt")
    seen = []

    def events(event, **data):
        if event == "job_start":  # the images before this one are already in the manifest
            seen.append((data["job"].index, [x["index"] for x in manifest(job)]))

    records = list(run_job(session, batch, LocalRunner(), resume_state(batch).pending[:2], events=events))
    assert [r.index for r in records] == [0, 1]
    assert seen == [(0, []), (1, [0])]
    assert resume_state(batch).pending == [2]


def test_stdin_kohya_lines_and_seeds_fixed_by_item_index(cli_inproc, job):
    text = "a red circle --d 5 --s 3\n# skipped\na small green triangle\n{\"prompt\": \"a ring\", \"count\": 2}\n"
    res = cli_inproc("run", "job.toml", "--prompts", "-", "--dry-run", "--json", input=text)
    assert res.code == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    # the line's own seed, else the recipe's seed + the item's index (3 + 1, 3 + 2, 3 + 3)
    assert [(r["index"], r["seed"], r["steps"]) for r in rows] == [(0, 5, 3), (1, 4, 2), (2, 5, 2), (3, 6, 2)]
    assert [r["source"] for r in rows] == ["<stdin>:1", "<stdin>:3", "<stdin>:4", "<stdin>:4"]
    assert [r["name"] for r in rows] == ["job-0000-5", "job-0001-4", "job-0002-5", "job-0003-6"]


@pytest.mark.slow
def test_stdin_job_renders_through_the_cli(cli_inproc, job, one_thread):
    res = cli_inproc("run", "job.toml", "--prompts", "-", "--json", input="a red circle --d 5 --s 3 --w 48\n")
    assert res.code == 0, res.stderr
    (record,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert (record["seed"], record["steps"], record["width"], record["status"]) == (5, 3, 48, "ok")
    from krea2kit.output.metadata import read_image_metadata

    recipe = read_image_metadata(job / record["path"])["krea2kit"]["recipe"]
    assert "job" not in recipe and recipe["seed"] == 5 and recipe["sampler"]["steps"] == 3


def test_a_bad_line_stops_the_job_before_anything_loads(cli_inproc, job):
    res = cli_inproc("run", "job.toml", "--prompts", "-", input="a red circle\na fox --w 64 --q 2\n")
    assert res.code == 2
    assert res.stdout == ""
    assert "<stdin>:2: unknown option --q" in res.stderr and "loading" not in res.stderr
    assert not (job / "out").exists()
    (job / "bad.txt").write_text('a\n{"prompt": "b", "seed": "7"}\n')
    res = cli_inproc("run", "job.toml", "--prompts", "bad.txt")
    assert res.code == 2 and "bad.txt:2: seed: input should be a valid integer" in res.stderr


def test_job_table_in_the_recipe_is_relative_to_the_recipe(cli_inproc, job):
    sub = job / "sub"
    sub.mkdir()
    (sub / "job.toml").write_text(RECIPE + '[job]\nprompts = "list.txt"\n')
    (sub / "list.txt").write_text("one\ntwo\n")
    res = cli_inproc("run", "sub/job.toml", "--dry-run")
    assert res.code == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2 and "a job of 2 image(s)" in res.stderr
    res = cli_inproc("run", "sub/job.toml", "--dry-run", "--prompts", "prompts.txt")  # --prompts wins
    assert res.code == 0 and len(res.stdout.splitlines()) == 3
    (sub / "other.toml").write_text(RECIPE + '[job]\nprompts = "list.txt"\nrunner = "ray"\n')
    res = cli_inproc("run", "sub/other.toml", "--dry-run")
    assert res.code == 2 and "job.runner" in res.stderr
    res = cli_inproc("recipe", "check", "sub/job.toml")
    assert res.code == 0, res.stderr


@pytest.mark.parametrize("args, words", [
    (["--prompts", "prompts.txt", "--set", "output.name=same"], ["output.name", "would both be written as 'same'"]),
    (["--prompts", "prompts.txt", "--on", "nowhere"], ["--on: unknown runner 'nowhere'", "registered runners: local"]),
    (["--prompts", "prompts.txt", "--runner-opt", "workers=2"], ["runner 'local' takes no options"]),
    (["--prompts", "prompts.txt", "--runner-opt", "a.b=2"], ["plain option name"]),
    (["--on", "local"], ["give --prompts FILE"]),
    (["--prompts", "prompts.txt", "--prompt", "x"], ["exclude each other"]),
    (["--prompts", "missing.txt"], ["missing.txt: prompt file not found"]),
    (["--prompts", "prompts.txt", "--keep-diverse", "1"], ["diversity.keep", "cannot run as a batch job"]),
])
def test_refusals_are_exit_2_before_loading(cli_inproc, job, args, words):
    res = cli_inproc("run", "job.toml", *args)
    assert res.code == 2, res.stderr
    for word in words:
        assert word in res.stderr
    assert res.stdout == "" and "loading" not in res.stderr


def test_stdin_holds_one_thing(cli_inproc, job):
    res = cli_inproc("run", "-", "--prompts", "-", input=RECIPE)
    assert res.code == 2 and "stdin can hold only one" in res.stderr


def test_an_images_recipe_cannot_set_a_prompt_file_or_runner():
    from krea2kit.recipe.trust import portable_recipe, untrusted_recipe

    kept, dropped = untrusted_recipe({"prompt": "x", "job": {"prompts": "/etc/passwd"},
                                      "runner": "ray", "on": "ray"})
    assert kept == {"prompt": "x"}
    assert {"job.prompts", "runner", "on"} <= set(dropped)
    assert "job" not in portable_recipe({"prompt": "x", "job": {"prompts": "/home/me/list.txt"}})
    assert "job" not in portable_recipe({"prompt": "x", "job": {"prompts": "l.txt"}}, local_paths=True)


def test_a_blocked_item_is_recorded_as_blocked_and_tried_again_next_run(cli_inproc, job):
    text = "explicit sex scene with a 12 year old\n"
    res = cli_inproc("run", "job.toml", "--prompts", "-", "--json", input=text)
    assert res.code == 3, res.stderr
    (line,) = manifest(job)
    assert line["status"] == "blocked" and line["path"] is None and "krea2kit.prompt" in line["blocked_by"]
    again = cli_inproc("run", "job.toml", "--prompts", "-", input=text)
    assert again.code == 3 and "skipping" not in again.stderr  # a blocked item is not a finished image


def test_job_names_must_not_depend_on_the_day(cli_inproc, job):
    res = cli_inproc("run", "job.toml", "--prompts", "prompts.txt", "--dry-run",
                     "--set", "output.name={date}/{recipe}-{index}")
    assert res.code == 2 and "output.name" in res.stderr and "{date}" in res.stderr


def test_matrix_recipes_and_images_are_not_jobs(cli_inproc, job):
    (job / "m.toml").write_text(RECIPE + "[matrix]\nseed = [1, 2]\n")
    res = cli_inproc("run", "m.toml", "--prompts", "prompts.txt")
    assert res.code == 2 and "matrix" in res.stderr
    Image.new("RGB", (8, 8)).save(job / "plain.png")
    res = cli_inproc("run", "plain.png", "--prompts", "prompts.txt")
    assert res.code == 2 and res.stdout == ""
