"""The built-in prompt filter: evasion-resistant normalisation + lexicon co-occurrence rules.

Why lexicons and not a text classifier: profanity/toxicity models measure offensive language, not
what the Krea 2 licence and use policy care about (sexual content involving minors, non-consensual
intimate imagery of real people). alt-profanity-check scores "explicit nude photo of a teenager"
at 0.043 (measured with alt-profanity-check 1.9.1), while a co-occurrence rule
"minor term AND sexual term" blocks it. ML classifiers can be added as plugins.

Normalisation (see :func:`normalise_views`) undoes the usual evasions: Unicode compatibility forms
(fullwidth, mathematical letters, circled letters), invisible format characters, Cyrillic/Greek
homoglyphs, accents, case, leetspeak (``s3x``, ``l0l1``, ``$ex``), spacing and punctuation inside a
word (``s e x``, ``s.e.x``, ``nu-de``), masked vowels (``p*rn``) and repeated letters (``seeexx``).
It produces several "views" of the prompt and a rule fires if any view matches, because each
evasion fix also has a false-positive cost in some other view (``3d`` read as leetspeak, ages read
as letters...).

Listed words with ordinary senses ("a topless convertible", "a sex on the beach cocktail",
"chicken breasts") are excused by allow phrases (data/allow.txt, :mod:`.prompt_senses`): a phrase
names the word's own context, and where it matches only that word stops counting, only as the
term it spells. Every other term in the prompt, including a longer one that overlaps the phrase,
still counts, so a benign phrase cannot carry an explicit prompt through.

Known limits (measured in tests/safety/test_prompt_filter.py): words split into multi-letter parts
(``nu de``), euphemisms, other languages, and reversed text are not caught; English lists only.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from .prompt_senses import SenseSet
from .verdict import Verdict

#: Bump when the normalisation or the rule semantics change (the lexicon digest is appended).
PROMPT_FILTER_VERSION = "1.1"
FILTER_NAME = "krea2kit.prompt"

#: Lists shipped in ``krea2kit/safety/data`` (file stem = list name).
BUILTIN_LISTS = ("csam", "minors", "sexual_explicit", "sexual_suggestive", "ncii", "real_person",
                 "violence", "self_harm", "hate", "public_figure", "deception")
#: Pseudo-list filled by the age rule ("13 yo", "aged 12", "under 18", "5th grade").
AGE_LIST = "age"
ALLOW_LIST = "allow"

#: Categories whose action a deployer may not lower below "block": the use policy prohibits
#: them outright (CSAM, NCII incl. deepfakes of real people; krea.ai/krea-2-use-policy).
MANDATORY_BLOCK = frozenset({"sexual/minors", "sexual/non-consensual", "sexual/real-person"})

DEFAULT_ACTIONS: dict[str, str] = {
    "sexual/minors": "block",
    "sexual/non-consensual": "block",
    "sexual/real-person": "block",
    "sexual/explicit": "block",
    "sexual/suggestive": "flag",
    "violence/graphic": "flag",
    "self-harm": "flag",
    "hate/extremism": "flag",
    "deception/impersonation": "flag",
}


@dataclass(frozen=True)
class Rule:
    """Fires when, for every group in ``all_of``, at least one list of the group has a hit.

    ``all_of=(("minors", "age"), ("sexual_explicit", "sexual_suggestive"))`` means
    "(a minor term or an age under 18) and (an explicit or a suggestive term)".
    """

    id: str
    category: str
    all_of: tuple[tuple[str, ...], ...]


_SEXUAL = ("sexual_explicit", "sexual_suggestive")

#: Ordered by severity: the first rule that fires with the strongest action names the category.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("csam-term", "sexual/minors", (("csam",),)),
    Rule("minor+sexual", "sexual/minors", (("minors", AGE_LIST), _SEXUAL)),
    Rule("ncii-term", "sexual/non-consensual", (("ncii",),)),
    Rule("real-person+sexual", "sexual/real-person", (("real_person",), _SEXUAL)),
    Rule("explicit", "sexual/explicit", (("sexual_explicit",),)),
    Rule("suggestive", "sexual/suggestive", (("sexual_suggestive",),)),
    Rule("violence", "violence/graphic", (("violence",),)),
    Rule("self-harm", "self-harm", (("self_harm",),)),
    Rule("hate", "hate/extremism", (("hate",),)),
    Rule("public-figure+deception", "deception/impersonation", (("public_figure",), ("deception",))),
)

# --------------------------------------------------------------------------------------------
# Normalisation

# Homoglyphs that survive NFKC (Unicode's confusables.txt lists these as look-alikes of Latin
# letters). Upper-case forms map before case folding, because e.g. Greek capital Eta looks like
# "H" but its lower case looks like "n".
_CONFUSABLES = {
    # Cyrillic lower case
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ɡ": "g", "ո": "n", "ս": "u", "ց": "g",
    # Cyrillic upper case
    "А": "a", "В": "b", "Е": "e", "Ё": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p",
    "С": "c", "Т": "t", "У": "y", "Х": "x", "Ѕ": "s", "І": "i", "Ї": "i", "Ј": "j", "Ԁ": "d",
    "Ԛ": "q", "Ԝ": "w", "Һ": "h", "Ӏ": "l",
    # Greek lower case
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ς": "s", "ϳ": "j",
    # Greek upper case
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n",
    "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x", "Ϲ": "c",
    # Latin look-alikes outside a-z
    "ı": "i", "ɩ": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "ƅ": "b", "ɑ": "a",
    "ʏ": "y", "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i",
    "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ᴛ": "t",
    "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z",
}
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)

# Leetspeak, applied only inside tokens that contain a letter, so "16 year old" keeps its digits
# (a separate view keeps every digit). "1" is read both as "i" and as "l" (two views).
_LEET_BASE = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
              "@": "a", "$": "s", "!": "i", "|": "l", "€": "e", "£": "l"}
_LEET_I = str.maketrans({**_LEET_BASE, "1": "i"})
_LEET_L = str.maketrans({**_LEET_BASE, "1": "l"})
_EDGE_PUNCT = "\"'()[]{}<>.,;:?!`~"

_NON_WORD = re.compile(r"[^a-z0-9*]+")
_LONE_STAR = re.compile(r"(?<![a-z0-9])\*+|\*+(?![a-z0-9])")
# Runs of >= 3 single characters ("s e x", "n s f w" after punctuation became spaces).
_REPEATS = re.compile(r"([a-z*])\1{2,}")
_SINGLE_RUN = re.compile(r"(?<!\S)(?:[a-z0-9*] ){2,}[a-z0-9*](?!\S)")


def _fold(text: str) -> str:
    """NFKC, drop invisible format characters, homoglyphs, case, accents."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = text.translate(_CONFUSABLE_TABLE).casefold()
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Mn", "Me"))
    return unicodedata.normalize("NFC", text).translate(_CONFUSABLE_TABLE)


def _leet_token(tok: str, table: dict[int, str]) -> str:
    # Edge punctuation is dropped first, so "nude!" does not become "nudei"; "$" and "@" are not
    # edge punctuation because a leading "$ex" / "@nal" is leetspeak.
    core = tok.strip(_EDGE_PUNCT)
    if not any(c.isalpha() for c in core):
        return tok
    return core.translate(table)


def _split_view(text: str) -> str:
    text = _NON_WORD.sub(" ", text)
    text = _LONE_STAR.sub(" ", text)
    return " ".join(text.split())


def _joined_view(tokens: list[str]) -> str:
    # Punctuation inside a whitespace-delimited token is removed: "nu-de" -> "nude".
    out = []
    for tok in tokens:
        tok = _LONE_STAR.sub("", _NON_WORD.sub("", tok))
        if tok:
            out.append(tok)
    return " ".join(out)


def normalise_views(text: str) -> dict[str, str]:
    """The normalised views of ``text`` that rules are matched against.

    Keys: ``plain`` (no leetspeak; ages are read here), ``plain-joined``, ``leet-i``,
    ``leet-i-joined``, ``leet-l``, ``leet-l-joined``, and ``runs`` (single letters joined:
    "s e x" -> "sex"; matched without word boundaries).
    """
    return _views(_fold(text))


def _views(folded: str) -> dict[str, str]:
    tokens = folded.split()
    views: dict[str, str] = {}
    for name, table in (("plain", None), ("leet-i", _LEET_I), ("leet-l", _LEET_L)):
        toks = tokens if table is None else [_leet_token(t, table) for t in tokens]
        views[name] = _split_view(" ".join(toks))
        views[name + "-joined"] = _joined_view(toks)
    runs = []
    for name in ("plain", "leet-i", "leet-l"):
        runs += [m.group(0).replace(" ", "") for m in _SINGLE_RUN.finditer(views[name])]
    views["runs"] = " ".join(dict.fromkeys(runs))
    # Letters repeated 3+ times are cut to 2: terms match any repetition anyway, and it keeps
    # regex backtracking linear on inputs like "aaaa...".
    return {k: _REPEATS.sub(r"\1\1", v) for k, v in views.items()}


# --------------------------------------------------------------------------------------------
# Term lists


def _norm_term(term: str) -> str:
    term = term.split("#", 1)[0].strip()
    if not term:
        return ""
    star = term.endswith("*")
    body = _split_view(_fold(term.rstrip("*")))
    return body + ("*" if star and body else "")


def _term_pattern(term: str) -> str:
    """Regex for one normalised term: whole words, repeated letters, masked vowels, plural."""
    prefix = term.endswith("*")
    words = term.rstrip("*").split()
    parts = []
    for word in words:
        piece = []
        for ch, grp in itertools.groupby(word):
            n = len(list(grp))
            cls = f"[{ch}*]" if ch in "aeiouy" else re.escape(ch)
            piece.append(cls + ("+" if n == 1 else "{%d,}" % n))
        parts.append("".join(piece))
    body = r"\s*".join(parts)
    return body + (r"[a-z]*" if prefix else r"(?:e?s)?")


def parse_list_text(text: str, *, default_section: str | None = None) -> dict[str, list[str]]:
    """Parse a list file: ``[section]`` headers, one term a line, ``#`` comments."""
    out: dict[str, list[str]] = {}
    section = default_section
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[([A-Za-z0-9_\-]+)\]", line)
        if m:
            section = m.group(1).replace("-", "_")
            continue
        if section is None:
            raise ValueError(f"line {lineno}: term {line!r} before any [list] header")
        out.setdefault(section, []).append(line)
    return out


def _builtin_lists() -> dict[str, list[str]]:
    data = resources.files("krea2kit.safety").joinpath("data")
    lists: dict[str, list[str]] = {}
    for name in (*BUILTIN_LISTS, ALLOW_LIST):
        text = data.joinpath(f"{name}.txt").read_text(encoding="utf-8")
        parsed = parse_list_text(text, default_section=name)
        if set(parsed) - {name}:  # e.g. an allow phrase "[word]" alone reads as a header
            extra = sorted(set(parsed) - {name})
            raise ValueError(f"data/{name}.txt: unexpected [section] {extra}")
        lists[name] = parsed.get(name, [])
    return lists


class _Lexicon:
    """One list compiled to two regexes: whole-word and (for the ``runs`` view) substring."""

    def __init__(self, name: str, terms: Iterable[str]):
        self.name = name
        self.terms = sorted({t for t in (_norm_term(x) for x in terms) if t})
        # Longer terms first so "child porn" wins over "child" in the reported match.
        ordered = sorted(self.terms, key=len, reverse=True)
        alts = "|".join(f"(?P<t{i}>{_term_pattern(t)})" for i, t in enumerate(ordered))
        self._ordered = ordered
        if alts:
            self.bounded = re.compile(rf"(?<![a-z0-9*])(?:{alts})(?![a-z0-9*])")
            self.free = re.compile(alts)
        else:
            self.bounded = self.free = None

    def find(self, view: str, *, bounded: bool = True) -> set[str]:
        rx = self.bounded if bounded else self.free
        if rx is None or not view:
            return set()
        return {self._ordered[int(m.lastgroup[1:])] for m in rx.finditer(view)}


_NUM = r"(?:1[0-7]|[1-9])"
_NUMW = (r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen"
         r"|fifteen|sixteen|seventeen)")
_AGE_RX = re.compile(
    rf"(?<![0-9a-z])(?:{_NUM}|{_NUMW})\s*(?:years?|yrs?|y)\s*(?:old|o|of\s*age)(?![a-z])"
    rf"|(?<![a-z])(?:aged?|age\s*of)\s*(?:{_NUM}|{_NUMW})(?![0-9a-z])"
    r"|(?<![a-z])(?:under|below)\s*(?:18|eighteen)(?![0-9a-z])"
    rf"|(?<![0-9])(?:1[0-2]|[1-9])\s*(?:st|nd|rd|th)\s*grade(?:rs?)?(?![a-z])"
)


def _ages(view: str) -> set[str]:
    return {m.group(0) for m in _AGE_RX.finditer(view)}


def _first_failing(sources: list[tuple[str, list[str]]], spells) -> str:
    """The source whose allow lines make the combined set invalid (classes may be shared)."""
    lines: list[str] = []
    for label, more in sources:
        lines += more
        try:
            SenseSet(lines, _norm_term, spells)
        except ValueError:
            return label
    return "allow phrases"


# --------------------------------------------------------------------------------------------
# The filter


class KeywordPromptFilter:
    """Built-in prompt filter; ``check_prompt(text) -> Verdict``.

    Args:
        extra_terms: ``{list name: [terms]}`` added to the built-in lists. This can only make
            the filter stricter, so it is safe to take from a recipe; the ``"allow"`` list is
            refused here. A new list name needs a rule in ``extra_rules`` that uses it.
        allow_phrases: benign senses of listed words, in the allow-phrase syntax of
            data/README.md (``"sexy sports car"``, ``"[nude] @nude_head"``); where one matches,
            the words it marks stop counting as the terms they spell. This loosens the filter:
            a deployer setting, never a recipe one.
        extra_files: deployer files in the list format with ``[list-name]`` headers, ``[allow]``
            included (see data/README.md).
        actions: ``{category: "allow"|"flag"|"block"}`` overrides of :data:`DEFAULT_ACTIONS`;
            categories in :data:`MANDATORY_BLOCK` cannot be set below ``block``.
        extra_rules: more :class:`Rule` objects, evaluated after the default ones.
        builtin_lists: ``False`` starts from empty lists (tests, fully custom deployments).
    """

    name = FILTER_NAME

    def __init__(self, *, extra_terms: Mapping[str, Iterable[str]] | None = None,
                 allow_phrases: Iterable[str] = (),
                 extra_files: Iterable[str | Path] = (),
                 actions: Mapping[str, str] | None = None,
                 extra_rules: Iterable[Rule] = (),
                 builtin_lists: bool = True):
        lists: dict[str, list[str]] = {n: [] for n in (*BUILTIN_LISTS, ALLOW_LIST)}
        # Where each group of allow lines came from, to name it in a syntax error.
        allow_sources: list[tuple[str, list[str]]] = []
        if builtin_lists:
            for n, terms in _builtin_lists().items():
                lists[n].extend(terms)
            allow_sources.append(("data/allow.txt", list(lists[ALLOW_LIST])))
        for path in extra_files:
            p = Path(path)
            try:
                parsed = parse_list_text(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{p}: cannot read prompt-filter list: {exc}") from exc
            for n, terms in parsed.items():
                lists.setdefault(n, []).extend(terms)
            allow_sources.append((str(p), parsed.get(ALLOW_LIST, [])))
        for n, terms in (extra_terms or {}).items():
            if isinstance(terms, str):
                raise TypeError(f"extra_terms[{n!r}] must be a list of terms, not a string")
            n = n.replace("-", "_")
            if n == ALLOW_LIST:
                raise ValueError("extra_terms only makes the filter stricter; allow phrases loosen "
                                 "it and are a deployer setting (allow_phrases= or an extra file)")
            lists.setdefault(n, []).extend(terms)
        if isinstance(allow_phrases, str):
            raise TypeError("allow_phrases must be a list of phrases, not a string")
        allow_phrases = list(allow_phrases)
        lists[ALLOW_LIST].extend(allow_phrases)
        allow_sources.append(("allow_phrases", allow_phrases))

        self.rules: tuple[Rule, ...] = DEFAULT_RULES + tuple(extra_rules)
        used = {AGE_LIST} | {n for r in self.rules for grp in r.all_of for n in grp}
        unknown = sorted(set(lists) - used - {ALLOW_LIST})
        if unknown:
            raise ValueError(f"unknown prompt-filter list(s) {unknown}; known lists: "
                             f"{sorted(used - {AGE_LIST})} and {ALLOW_LIST!r}")

        self.actions = dict(DEFAULT_ACTIONS)
        for r in self.rules:
            self.actions.setdefault(r.category, "block")
        for cat, act in (actions or {}).items():
            if act not in ("allow", "flag", "block"):
                raise ValueError(f"action for {cat!r} must be allow, flag or block, got {act!r}")
            if cat in MANDATORY_BLOCK and act != "block":
                raise ValueError(f"category {cat!r} is always blocked (Krea 2 use policy); "
                                 "it cannot be set to " + repr(act))
            self.actions[cat] = act

        allow = lists.pop(ALLOW_LIST, [])
        self._lexicons = {n: _Lexicon(n, t) for n, t in lists.items()}
        try:
            self._senses = SenseSet(allow, _norm_term, self._keys)
        except ValueError as exc:
            raise ValueError(f"{_first_failing(allow_sources, self._keys)}: {exc}") from exc
        digest = hashlib.sha256()
        for n in sorted(self._lexicons):
            digest.update(f"[{n}]\n".encode() + "\n".join(self._lexicons[n].terms).encode())
        digest.update(b"[allow]\n" + "\n".join(self._senses.phrases).encode())
        for cls, alts in self._senses.classes.items():
            digest.update(f"@{cls} = {' | '.join(alts)}\n".encode())
        digest.update(repr((self.rules, sorted(self.actions.items()))).encode())
        self.version = f"{PROMPT_FILTER_VERSION}+{digest.hexdigest()[:8]}"

    # -- matching ----------------------------------------------------------------------------
    def hits(self, text: str) -> dict[str, set[str]]:
        """List name -> terms (normalised) found in ``text``; ``"age"`` holds age phrases.

        Terms excused by an allow phrase are not included (see :meth:`analyse`).
        """
        return self.analyse(text)[0]

    def analyse(self, text: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        """``(hits, excused)``: the terms that count, and those an allow phrase excused.

        A term is excused only when every place it was found lies inside the marked words of
        an allow phrase: the prompt is scanned as written and again with those words blanked,
        and only a term that the marked words themselves spell may disappear. A term lost
        because blanking cut into it ("having sex" in "having sex on the beach cocktail")
        still counts.
        """
        folded = _fold(text)
        found = self._scan(_views(folded))
        if not found:
            return found, {}
        spans = self._senses.spans(folded, ((n, t) for n, ts in found.items() for t in ts))
        spelled: dict[str, set[str]] = {}
        for sp in spans:
            for n, t in self._keys(_split_view(folded[sp.start:sp.end])):
                if t in found.get(n, ()):
                    spelled.setdefault(n, set()).add(t)
        if not spelled:
            return found, {}
        # Only the lists with a candidate need the second scan; the others keep their hits.
        blanked = self._scan(_views(SenseSet.mask(folded, spans)), names=spelled)
        kept = {n: set(ts) for n, ts in found.items()}
        excused: dict[str, set[str]] = {}
        for n, terms in spelled.items():
            gone = terms - blanked.get(n, set())
            kept[n] -= gone
            if not kept[n]:
                del kept[n]
            if gone:
                excused[n] = gone
        return kept, excused

    def _keys(self, words: str) -> set[tuple[str, str]]:
        """(list, term) pairs in ``words``, already normalised text (whole-word matching)."""
        return {(n, t) for n, lex in self._lexicons.items() for t in lex.find(words)}

    def _scan(self, views: Mapping[str, str],
              names: Iterable[str] | None = None) -> dict[str, set[str]]:
        lexicons = (self._lexicons.values() if names is None
                    else [self._lexicons[n] for n in names if n in self._lexicons])
        found: dict[str, set[str]] = {}
        seen: set[tuple[str, bool]] = set()
        for vname, view in views.items():
            bounded = vname != "runs"
            if names is None and vname in ("plain", "plain-joined"):
                ages = _ages(view)
                if ages:
                    found.setdefault(AGE_LIST, set()).update(ages)
            # Most prompts have no leetspeak or inner punctuation, so most views are the same
            # string: each distinct one is scanned once (the filter's main cost).
            if (view, bounded) in seen:
                continue
            seen.add((view, bounded))
            for lex in lexicons:
                got = lex.find(view, bounded=bounded)
                if got:
                    found.setdefault(lex.name, set()).update(got)
        return found

    def check_prompt(self, text: str) -> Verdict:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be str, got {type(text).__name__}")
        found, excused = self.analyse(text)
        senses = ("benign senses: " + "; ".join(f"{n}: {'/'.join(sorted(t))}"
                                                for n, t in sorted(excused.items()))
                  if excused else "")
        best: tuple[int, Rule, list[str]] | None = None
        rank = {"allow": 0, "flag": 1, "block": 2}
        fired = []
        for rule in self.rules:
            evidence = []
            for group in rule.all_of:
                names = [n for n in group if found.get(n)]
                if not names:
                    break
                evidence.append(", ".join(f"{n}: {'/'.join(sorted(found[n]))}" for n in names))
            else:
                act = self.actions.get(rule.category, "block")
                fired.append(rule.id)
                if best is None or rank[act] > best[0]:
                    best = (rank[act], rule, evidence)
        if best is None or best[0] == 0:
            detail = f"rules fired with action allow: {fired}" if fired else ""
            return Verdict(self.name, self.version, "allow", None, None,
                           "; ".join(d for d in (detail, senses) if d))
        act_rank, rule, evidence = best
        action = "block" if act_rank == 2 else "flag"
        detail = f"rule {rule.id} ({'; '.join(evidence)})"
        if len(fired) > 1:
            detail += f"; also fired: {', '.join(r for r in fired if r != rule.id)}"
        if senses:
            detail += f"; {senses}"
        return Verdict(self.name, self.version, action, rule.category, None, detail)

    def __repr__(self) -> str:
        return f"KeywordPromptFilter(version={self.version!r})"


def from_config(config: Mapping[str, Any] | None = None) -> KeywordPromptFilter:
    """Loader for a filter registry entry: config keys are the constructor's keyword arguments.

    ``extra_rules`` may be given as dicts ``{"id", "category", "all_of": [[list, ...], ...]}``.
    """
    cfg = dict(config or {})
    rules = []
    for r in cfg.pop("extra_rules", ()) or ():
        if isinstance(r, Rule):
            rules.append(r)
        else:
            rules.append(Rule(r["id"], r["category"], tuple(tuple(g) for g in r["all_of"])))
    known = {"extra_terms", "allow_phrases", "extra_files", "actions", "builtin_lists"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown prompt-filter option(s) {unknown}; known: {sorted(known | {'extra_rules'})}")
    return KeywordPromptFilter(extra_rules=rules, **cfg)
