"""Verdicts and the fail-closed runner that combines filters (the filter protocols are
:class:`krea2kit.contracts.PromptFilter` and :class:`~krea2kit.contracts.ImageFilter`).

Policy (the licence asks deployers for "reasonable and appropriate Content Filter measures",
Krea 2 Community License §4.2; see docs/safety.md in krea-ai/krea-2):

* every filter runs, even after one has blocked, so the audit log records all of them;
* any ``block`` wins; otherwise any ``flag`` makes the decision ``flag``; otherwise ``allow``;
* a filter that failed to load, raises, times out, lacks the method for the item kind, or returns
  something that is not a valid :class:`Verdict` yields a ``block`` verdict that names it
  (fail closed: a broken filter never lets content through silently);
* running with no filters at all is refused (a ``block`` from the policy itself) unless the caller
  says ``allow_empty=True``, which is how an explicitly acknowledged unfiltered run is expressed.

This module imports neither torch nor PIL.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

ACTIONS = ("allow", "flag", "block")
KINDS = ("prompt", "image")

Action = Literal["allow", "flag", "block"]
Kind = Literal["prompt", "image"]

#: Name used on verdicts the policy itself produces (no filters, wrong kind...).
POLICY_NAME = "krea2kit.policy"

#: Categories of the fail-closed verdicts, so deployers can grep the audit log for them.
CATEGORY_FILTER_ERROR = "filter-error"
CATEGORY_FILTER_TIMEOUT = "filter-timeout"
CATEGORY_FILTER_UNAVAILABLE = "filter-unavailable"
CATEGORY_NO_FILTERS = "no-filters"

_METHOD = {"prompt": "check_prompt", "image": "check_image"}


@dataclass(frozen=True)
class Verdict:
    """One filter's judgement of one item.

    ``score`` is the filter's raw score when it has one (e.g. an NSFW probability), else ``None``.
    ``category`` names what was found (``"sexual/minors"``, ``"sexual/explicit"``...), ``None``
    when nothing was found. ``detail`` is for people: which rule or threshold fired.
    """

    filter: str
    version: str
    action: Action
    category: str | None = None
    score: float | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Verdict.action must be one of {ACTIONS}, got {self.action!r}")
        if self.score is not None and not math.isfinite(float(self.score)):
            raise ValueError(f"Verdict.score must be finite, got {self.score!r}")

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def to_dict(self) -> dict[str, Any]:
        return {
            "filter": self.filter,
            "version": self.version,
            "action": self.action,
            "category": self.category,
            "score": None if self.score is None else float(self.score),
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        return cls(filter=data["filter"], version=data.get("version", ""), action=data["action"],
                   category=data.get("category"), score=data.get("score"),
                   detail=data.get("detail", ""))


@dataclass(frozen=True)
class Decision:
    """The combined result of all filters for one item."""

    kind: Kind
    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)

    @property
    def blocking(self) -> tuple[Verdict, ...]:
        """The verdicts that block (empty when the item may pass)."""
        return tuple(v for v in self.verdicts if v.action == "block")

    @property
    def flagged(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.action == "flag")

    @property
    def blocked(self) -> bool:
        return any(v.action == "block" for v in self.verdicts)

    @property
    def action(self) -> Action:
        if self.blocked:
            return "block"
        if self.flagged:
            return "flag"
        return "allow"

    def summary(self) -> str:
        """One line for a person, e.g. for a BlockedError message."""
        if not self.blocked:
            return f"{self.kind}: {self.action}"
        parts = [f"{v.filter} ({v.category or 'unspecified'}"
                 + (f": {v.detail}" if v.detail else "") + ")" for v in self.blocking]
        return f"{self.kind} blocked by " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "action": self.action,
                "verdicts": [v.to_dict() for v in self.verdicts]}


class UnavailableFilter:
    """Stands in for a filter that could not be built; blocks every item, naming why.

    It has both ``check_prompt`` and ``check_image`` so it can sit in either list.
    """

    def __init__(self, name: str, reason: str, *, version: str = "", hint: str | None = None):
        self.name = name
        self.version = version
        self.reason = reason
        self.hint = hint

    def _verdict(self) -> Verdict:
        detail = f"filter {self.name!r} is unavailable: {self.reason}"
        if self.hint:
            detail += f" (hint: {self.hint})"
        return Verdict(self.name, self.version, "block", CATEGORY_FILTER_UNAVAILABLE, None, detail)

    def check_prompt(self, text: str) -> Verdict:
        return self._verdict()

    def check_image(self, image: Any) -> Verdict:
        return self._verdict()

    def __repr__(self) -> str:
        return f"UnavailableFilter({self.name!r}, {self.reason!r})"


def load_filter(name: str, load: Callable[[dict], object], config: Mapping[str, Any] | None = None,
                *, version: str = "") -> object:
    """Build a filter with ``load(config)``; never raises.

    A loader that raises (missing package, missing or corrupt model file...) gives an
    :class:`UnavailableFilter` that blocks every item with the error text, so a broken
    deployment fails closed instead of running unfiltered. ``hint`` is taken from the error
    when it has one (``krea2kit.errors.Krea2kitError`` does).
    """
    try:
        return load(dict(config or {}))
    except Exception as exc:  # noqa: BLE001 - any failure must fail closed
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return UnavailableFilter(name, str(reason), version=version, hint=getattr(exc, "hint", None))


def _name_of(f: object) -> str:
    return str(getattr(f, "name", None) or type(f).__name__)


def _version_of(f: object) -> str:
    return str(getattr(f, "version", "") or "")


def _call_with_timeout(fn: Callable[[Any], Any], item: Any, timeout_s: float | None) -> tuple[str, Any]:
    """Run ``fn(item)``; return ("ok", result), ("error", exc) or ("timeout", None).

    The timeout uses a daemon thread: Python cannot kill a running thread, so a filter that hangs
    keeps its thread until it returns, but the caller gets a block verdict on time and the
    process can still exit.
    """
    if timeout_s is None:
        try:
            return "ok", fn(item)
        except Exception as exc:  # noqa: BLE001
            return "error", exc
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(item)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=target, name="krea2kit-filter", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return "timeout", None
    if "error" in box:
        return "error", box["error"]
    return "ok", box.get("result")


def run_filters(filters: Iterable[object], item: Any, *, kind: Kind,
                timeout_s: float | None = None, allow_empty: bool = False,
                flag_blocks: bool = False) -> Decision:
    """Run every filter on ``item`` and combine the verdicts (see the module docstring).

    ``kind`` is ``"prompt"`` (item: ``str``, method ``check_prompt``) or ``"image"``
    (item: ``PIL.Image.Image``, method ``check_image``). ``timeout_s`` bounds each filter
    separately. ``flag_blocks=True`` turns every ``flag`` into a ``block`` (strict deployments).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    method = _METHOD[kind]
    filters = list(filters)
    verdicts: list[Verdict] = []
    if not filters and not allow_empty:
        verdicts.append(Verdict(POLICY_NAME, "", "block", CATEGORY_NO_FILTERS, None,
                                f"no {kind} filter is configured; an unfiltered run must be "
                                "acknowledged explicitly"))
    for f in filters:
        name, version = _name_of(f), _version_of(f)
        fn = getattr(f, method, None)
        if not callable(fn):
            verdicts.append(Verdict(name, version, "block", CATEGORY_FILTER_ERROR, None,
                                    f"filter {name!r} has no {method}() for {kind} items"))
            continue
        status, result = _call_with_timeout(fn, item, timeout_s)
        if status == "timeout":
            v = Verdict(name, version, "block", CATEGORY_FILTER_TIMEOUT, None,
                        f"filter {name!r} did not answer within {timeout_s:g} s")
        elif status == "error":
            v = Verdict(name, version, "block", CATEGORY_FILTER_ERROR, None,
                        f"filter {name!r} raised {type(result).__name__}: {result}")
        elif not isinstance(result, Verdict):
            v = Verdict(name, version, "block", CATEGORY_FILTER_ERROR, None,
                        f"filter {name!r} returned {type(result).__name__}, not a Verdict")
        else:
            v = result
        if flag_blocks and v.action == "flag":
            v = Verdict(v.filter, v.version, "block", v.category, v.score,
                        (v.detail + "; " if v.detail else "") + "flag escalated to block by policy")
        verdicts.append(v)
    return Decision(kind=kind, verdicts=tuple(verdicts))

