"""The combination policy and the fail-closed runner (krea2kit.safety.verdict)."""

import threading
import time

import pytest

from krea2kit.contracts import ImageFilter, PromptFilter
from krea2kit.errors import Krea2kitError
from krea2kit.safety.verdict import (CATEGORY_FILTER_ERROR, CATEGORY_FILTER_TIMEOUT,
                                     CATEGORY_FILTER_UNAVAILABLE, CATEGORY_NO_FILTERS, Decision,
                                     UnavailableFilter, Verdict, load_filter, run_filters)


class Fixed:
    def __init__(self, name, action, category=None):
        self.name, self.version, self.action, self.category = name, "1", action, category
        self.calls = 0

    def check_prompt(self, text):
        self.calls += 1
        return Verdict(self.name, self.version, self.action, self.category)

    check_image = check_prompt


class Raises:
    name, version = "boom", "2"

    def check_prompt(self, text):
        raise RuntimeError("model exploded")


class Slow:
    name, version = "slow", "0"

    def __init__(self):
        self.release = threading.Event()

    def check_prompt(self, text):
        self.release.wait(5)
        return Verdict(self.name, self.version, "allow")


def test_verdict_validates_action_and_score():
    with pytest.raises(ValueError):
        Verdict("f", "1", "maybe")
    with pytest.raises(ValueError):
        Verdict("f", "1", "allow", score=float("nan"))
    v = Verdict("f", "1", "flag", "x", 0.25, "d")
    assert Verdict.from_dict(v.to_dict()) == v


def test_protocols_are_structural():
    assert isinstance(Fixed("a", "allow"), PromptFilter)
    assert isinstance(Fixed("a", "allow"), ImageFilter)
    assert not isinstance(Raises(), ImageFilter)


def test_any_block_wins_and_every_filter_runs():
    fs = [Fixed("a", "block", "sexual/minors"), Fixed("b", "allow"), Fixed("c", "flag", "x")]
    d = run_filters(fs, "p", kind="prompt")
    assert d.blocked and d.action == "block"
    assert [v.filter for v in d.verdicts] == ["a", "b", "c"]
    assert all(f.calls == 1 for f in fs)
    assert [v.filter for v in d.blocking] == ["a"]
    assert [v.filter for v in d.flagged] == ["c"]
    assert "a (sexual/minors" in d.summary()


def test_flag_without_block_is_flag_and_can_be_escalated():
    fs = [Fixed("a", "allow"), Fixed("b", "flag", "sexual/suggestive")]
    d = run_filters(fs, "p", kind="prompt")
    assert not d.blocked and d.action == "flag"
    strict = run_filters(fs, "p", kind="prompt", flag_blocks=True)
    assert strict.blocked and strict.blocking[0].filter == "b"
    assert "escalated" in strict.blocking[0].detail


def test_all_allow():
    d = run_filters([Fixed("a", "allow")], "p", kind="image")
    assert d.action == "allow" and not d.blocked and d.blocking == ()


def test_raising_filter_blocks_and_is_named():
    d = run_filters([Fixed("ok", "allow"), Raises()], "p", kind="prompt")
    assert d.blocked
    (v,) = d.blocking
    assert v.filter == "boom" and v.version == "2" and v.category == CATEGORY_FILTER_ERROR
    assert "model exploded" in v.detail


def test_timeout_blocks_without_waiting_for_the_filter():
    slow = Slow()
    t0 = time.perf_counter()
    d = run_filters([slow], "p", kind="prompt", timeout_s=0.1)
    elapsed = time.perf_counter() - t0
    slow.release.set()
    assert elapsed < 2.0
    assert d.blocked and d.blocking[0].category == CATEGORY_FILTER_TIMEOUT
    assert "slow" in d.blocking[0].detail


def test_timeout_path_still_reports_errors_and_results():
    d = run_filters([Raises(), Fixed("a", "flag")], "p", kind="prompt", timeout_s=5)
    assert [v.action for v in d.verdicts] == ["block", "flag"]


def test_wrong_return_type_and_missing_method_block():
    class Bad:
        name, version = "bad", ""

        def check_prompt(self, text):
            return {"action": "allow"}

    class PromptOnly:
        name, version = "ponly", ""

        def check_prompt(self, text):
            return Verdict("ponly", "", "allow")

    d = run_filters([Bad()], "p", kind="prompt")
    assert d.blocked and "not a Verdict" in d.blocking[0].detail
    d = run_filters([PromptOnly()], object(), kind="image")
    assert d.blocked and "check_image" in d.blocking[0].detail


def test_no_filters_is_refused_unless_acknowledged():
    d = run_filters([], "p", kind="prompt")
    assert d.blocked and d.blocking[0].category == CATEGORY_NO_FILTERS
    d = run_filters([], "p", kind="prompt", allow_empty=True)
    assert not d.blocked and d.verdicts == ()


def test_bad_kind():
    with pytest.raises(ValueError):
        run_filters([], "p", kind="video")


def test_load_filter_fails_closed_with_hint():
    def loader(cfg):
        raise Krea2kitError("model file /x/y.onnx does not exist", hint="pip install thing")

    f = load_filter("nsfw", loader, {}, version="3")
    assert isinstance(f, UnavailableFilter)
    for kind, item in (("prompt", "p"), ("image", object())):
        d = run_filters([f], item, kind=kind)
        (v,) = d.blocking
        assert v.filter == "nsfw" and v.category == CATEGORY_FILTER_UNAVAILABLE
        assert "/x/y.onnx" in v.detail and "pip install thing" in v.detail


def test_load_filter_passes_config():
    seen = {}

    def loader(cfg):
        seen.update(cfg)
        return Fixed("x", "allow")

    f = load_filter("x", loader, {"threshold": 0.3})
    assert seen == {"threshold": 0.3} and isinstance(f, Fixed)


def test_decision_to_dict():
    d = Decision("prompt", (Verdict("a", "1", "flag", "c", 0.5, "why"),))
    assert d.to_dict() == {"kind": "prompt", "action": "flag", "verdicts": [
        {"filter": "a", "version": "1", "action": "flag", "category": "c", "score": 0.5,
         "detail": "why"}]}
