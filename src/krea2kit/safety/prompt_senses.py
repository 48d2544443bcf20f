"""Allow phrases: benign senses of listed words, bound to the word's own phrase.

A listed word such as "topless" or "sex" has ordinary senses ("a topless convertible", "a sex on
the beach cocktail"). An allow phrase describes one such sense; where it matches, only the words
it marks in ``[ ]`` stop counting, and only as the terms those words spell. Everything else in the
prompt is still read, including the other words of the phrase and a longer term that overlaps it
("having sex on the beach cocktail" still contains "having sex"); that part is the filter's job
(:meth:`KeywordPromptFilter.analyse`), this module only finds the spans.

Phrase syntax (one a line, in the ``[allow]`` list; see data/README.md):

* plain words; a space also matches a hyphen, an apostrophe or nothing ("breast stroke" matches
  "breast-stroke" and "breaststroke"); every word may take a plural ``s``/``es``; a trailing ``*``
  matches any continuation (``crow*`` matches "crowing"); no other punctuation is crossed, so
  "sex on the beach, cocktail in hand" is not the cocktail;
* ``[...]`` marks the excused words (default: the whole phrase); they must be plain words;
* ``@name`` is one of the alternatives of a class, ``@name?`` an optional one; a class is defined
  by a line ``@name = word | two words | @other | ^`` (a later definition adds to a class);
* ``^`` (first token, or an alternative of a class used first) is the start of the prompt.

Guards. The class ``@guard`` lists words (people, bodies, "only", "ride") that cancel a match
when one is the word right before the phrase or before its marked words (articles skipped), or
one of the first three words after the phrase that are not function words ("of", "a", "with"...),
punctuation ignored: "topless convertible girl", "teen food porn", "food porn of a teen" and
"a topless convertible, beautiful woman" keep their term.

Leads. Where a sense is easy to fake, a phrase pins the word before it with a class whose name
is ``start`` or ends in ``_lead`` (``@topless_lead [topless] @vehicle``: "a", "the", "vintage"...,
so "driving topless convertible" is not the car). Lead words are vetted separators, so for such
a phrase only the word before the marked words is checked against the guard ("a toddler in
nude-coloured shoes" passes, "toddler, nude-coloured shoes" does not match at all).

Phrases are matched on the folded prompt (case, accents and homoglyphs undone, no leetspeak):
an obfuscated spelling never gets a benign sense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

GUARD_CLASS = "guard"
_SEP = r"[ \t'\u2019\-]*"
_CLASS_DEF = re.compile(r"@([a-z_][a-z0-9_]*)\s*=\s*(.*)", re.S)
_TOKEN = re.compile(r"\[|\]|\^|@[a-z_][a-z0-9_]*\??|[^\s\[\]^@]+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Function words skipped when looking for the word that follows a phrase.
_SKIP_AFTER = frozenset("""a an the of with and or in on at for by to from into onto near beside
next featuring starring showing depicting my our your their his her its this that these those
some two three""".split())
_SKIP_BEFORE = frozenset({"a", "an", "the"})
# How many words after a phrase (function words not counted) are checked against the guard:
# "a topless convertible, beautiful woman" is not about the car.
_AFTER_WORDS = 3


@dataclass(frozen=True)
class SenseSpan:
    """Excused characters ``folded[start:end]``, found by allow phrase ``phrase``."""

    start: int
    end: int
    phrase: str


@dataclass(frozen=True)
class _Tok:
    rx: str
    optional: bool = False
    excused: bool = False


def _word_rx(word: str) -> str:
    if word.endswith("*"):
        return re.escape(word[:-1]) + "[a-z0-9]*"
    return re.escape(word) + "(?:e?s)?"


class SenseSet:
    """Compiled allow phrases; ``spans(folded, keys)`` finds the excused parts of a prompt.

    ``normalise(chunk)`` turns a raw word chunk into normalised words (the filter passes its own
    term normaliser, so phrases fold exactly like prompts); it may return ``""``.
    ``spells(text)`` returns the terms (any hashable keys) that ``text`` contains; each phrase is
    indexed by the terms its marked words spell (plural forms included), so a prompt is only
    scanned with the phrases that could excuse one of its hits. A phrase whose marked words
    spell no term is never tried.
    """

    def __init__(self, lines: Iterable[str], normalise: Callable[[str], str],
                 spells: Callable[[str], Iterable[Hashable]]):
        self._normalise = normalise
        raw_classes: dict[str, list[str]] = {}
        phrases: list[str] = []
        for raw in lines:
            line = raw.strip()
            m = _CLASS_DEF.fullmatch(line)
            if m:
                bucket = raw_classes.setdefault(m.group(1), [])
                for alt in m.group(2).split("|"):
                    alt = self._canon(alt, f"class @{m.group(1)}")
                    if not alt:
                        raise ValueError(f"class @{m.group(1)}: empty alternative in {line!r}")
                    if alt not in bucket:
                        bucket.append(alt)
            elif line:
                phrases.append(line)
        #: Class name -> canonical alternatives, e.g. for a version digest.
        self.classes = {k: tuple(v) for k, v in sorted(raw_classes.items())}
        self._class_cache: dict[str, str] = {}
        guard = self.classes.get(GUARD_CLASS, ())
        if any(not re.fullmatch(r"[a-z0-9]+", g) for g in guard):
            raise ValueError("@guard alternatives must be single plain words")
        self._guard = (re.compile("(?:" + "|".join(_word_rx(g) for g in guard) + ")")
                       if guard else None)
        # Regex sources; each is compiled the first time a prompt needs it (compiling all of
        # them would add a large share of the filter's build time for phrases rarely used).
        self._src: dict[str, str] = {}
        self._led: set[str] = set()
        self._rx: dict[str, re.Pattern[str]] = {}
        self._index: dict[Hashable, list[str]] = {}
        spelled: dict[str, set[Hashable]] = {}
        for p in phrases:
            canon, rx, marked = self._compile(p)
            if canon in self._src:
                continue
            first = canon.split()[0].rstrip("?")
            if first == "@start" or first.endswith("_lead"):
                self._led.add(canon)
            # The lookahead finds overlapping matches: every word start is tried.
            self._src[canon] = rf"(?<![a-z0-9])(?=(?P<p>{rx})(?![a-z0-9]))"
            if marked not in spelled:
                variants = (marked, marked + "s", marked + "es", marked.replace(" ", ""))
                spelled[marked] = {k for v in variants for k in spells(v)}
            for k in spelled[marked]:
                self._index.setdefault(k, []).append(canon)
        #: Canonical phrase texts (sorted), e.g. for a version digest.
        self.phrases = tuple(sorted(self._src))
        indexed = {c for cs in self._index.values() for c in cs}
        #: Phrases whose marked words spell no term: they can never excuse anything.
        self.inert = tuple(c for c in self.phrases if c not in indexed)

    # -- parsing -------------------------------------------------------------------------------
    def _tokens(self, text: str, where: str) -> list[str]:
        raw = _TOKEN.findall(text)
        if "".join(raw) != "".join(text.split()):
            raise ValueError(f"{where}: class names are @lower_case, and '@', '[', ']', '^' "
                             "are reserved")
        out: list[str] = []
        for t in raw:
            if t in ("[", "]", "^") or t.startswith("@"):
                out.append(t)
                continue
            words = self._normalise(t).split()
            for w in words:
                if "*" in w[:-1]:
                    raise ValueError(f"{where}: '*' may only end a word")
            out.extend(words)
        return out

    def _canon(self, alt: str, where: str) -> str:
        toks = self._tokens(alt, where)
        if any(t in ("[", "]") or t.endswith("?") for t in toks):
            raise ValueError(f"{where}: a class alternative takes words, @classes and ^ only")
        return " ".join(toks)

    def _class_rx(self, name: str, where: str, stack: tuple[str, ...] = ()) -> str:
        if name in self._class_cache:
            return self._class_cache[name]
        if name not in self.classes or name == GUARD_CLASS:
            raise ValueError(f"{where}: unknown class @{name}")
        if name in stack:
            raise ValueError(f"{where}: class @{name} refers to itself")
        alts = []
        for alt in sorted(self.classes[name], key=len, reverse=True):
            parts = []
            for t in alt.split():
                if t == "^":
                    parts.append(r"\A")
                elif t.startswith("@"):
                    parts.append(self._class_rx(t[1:], where, stack + (name,)))
                else:
                    parts.append(_word_rx(t))
            alts.append(_SEP.join(parts))
        rx = "(?:" + "|".join(alts) + ")"
        self._class_cache[name] = rx
        return rx

    def _compile(self, phrase: str) -> tuple[str, str, str]:
        """``(canonical text, regex source, marked words)`` of one phrase."""
        where = f"allow phrase {phrase!r}"
        toks: list[_Tok] = []
        canon: list[str] = []
        in_bracket = seen_bracket = False
        for t in self._tokens(phrase, where):
            if t == "[":
                if in_bracket or seen_bracket:
                    raise ValueError(f"{where}: only one [ ] group is allowed")
                in_bracket = seen_bracket = True
                canon.append("[")
            elif t == "]":
                if not in_bracket:
                    raise ValueError(f"{where}: ']' without '['")
                in_bracket = False
                canon.append("]")
            elif t == "^":
                if toks or in_bracket:
                    raise ValueError(f"{where}: '^' (start of prompt) must come first")
                toks.append(_Tok(r"\A"))
                canon.append("^")
            elif t.startswith("@"):
                if in_bracket:
                    raise ValueError(f"{where}: the words in [ ] must be plain words, not {t}")
                toks.append(_Tok(self._class_rx(t[1:].rstrip("?"), where),
                                 optional=t.endswith("?")))
                canon.append(t)
            else:
                if in_bracket and t.endswith("*"):
                    raise ValueError(f"{where}: the words in [ ] may not end in '*'")
                toks.append(_Tok(_word_rx(t), excused=in_bracket))
                canon.append(t)
        if in_bracket:
            raise ValueError(f"{where}: '[' without ']'")
        if not seen_bracket:
            if any(c.startswith("@") or c == "^" for c in canon):
                raise ValueError(f"{where}: a phrase with @classes or ^ must mark the excused "
                                 "words with [ ]")
            toks = [_Tok(t.rx, excused=True) for t in toks]
        if not any(t.excused for t in toks):
            raise ValueError(f"{where}: no words to excuse")
        # Emit: optional tokens before the first required one carry their separator after them,
        # the others before them; the excused run is wrapped in the group ``x``.
        out, started = [], False
        first_ex = next(i for i, t in enumerate(toks) if t.excused)
        last_ex = max(i for i, t in enumerate(toks) if t.excused)
        for i, t in enumerate(toks):
            open_g = "(?P<x>" if i == first_ex else ""
            close_g = ")" if i == last_ex else ""
            if not started:
                if t.optional:
                    out.append(f"(?:{t.rx}{_SEP})?")
                    continue
                out.append(f"{open_g}{t.rx}{close_g}")
                started = True
            elif t.optional:
                out.append(f"(?:{_SEP}{t.rx})?")
            else:
                out.append(f"{_SEP}{open_g}{t.rx}{close_g}")
        canon_text = " ".join(canon).replace("[ ", "[").replace(" ]", "]")
        plain = (c for c in canon if c not in ("[", "]"))  # one per token
        marked = " ".join(w for w, t in zip(plain, toks) if t.excused)
        return canon_text, "".join(out), marked.replace("*", "")

    # -- matching ------------------------------------------------------------------------------
    def spans(self, folded: str, keys: Iterable[Hashable]) -> list[SenseSpan]:
        """Excused spans in ``folded`` (a prompt after the filter's ``_fold``) for phrases that
        could excuse one of ``keys`` (the terms found in it)."""
        todo = sorted({c for k in keys for c in self._index.get(k, ())})
        words = None
        out = []
        for canon in todo:
            rx = self._rx.get(canon)
            if rx is None:
                rx = self._rx[canon] = re.compile(self._src[canon])
            for m in rx.finditer(folded):
                xs, xe = m.span("x")
                if self._guard is not None:
                    if words is None:
                        words = [(w.start(), w.end(), w.group()) for w in _WORD.finditer(folded)]
                    start = xs if canon in self._led else m.start("p")
                    if self._guarded(words, start, xs, m.end("p")):
                        continue
                out.append(SenseSpan(xs, xe, canon))
        return out

    def _guarded(self, words: list[tuple[int, int, str]], start: int, marked_start: int,
                 end: int) -> bool:
        # Before: the word right before the phrase (``start``; for a phrase with a lead word the
        # lead is that boundary) and the one right before the marked words, past articles
        # ("teen food porn", "teen a sex on the beach cocktail"). After: the first few words
        # after the phrase that are not function words ("food porn of a teen", "topless
        # convertible with a woman", "topless convertible, beautiful woman").
        near = []
        for limit in {start, marked_start}:
            before = [w for s, e, w in words if e <= limit and w not in _SKIP_BEFORE]
            near += before[-1:]
        near += [w for s, e, w in words if s >= end and w not in _SKIP_AFTER][:_AFTER_WORDS]
        return any(self._guard.fullmatch(w) for w in near)

    @staticmethod
    def mask(folded: str, spans: Iterable[SenseSpan]) -> str:
        """``folded`` with the excused characters replaced by spaces."""
        chars = list(folded)
        for s in spans:
            chars[s.start:s.end] = " " * (s.end - s.start)
        return "".join(chars)
