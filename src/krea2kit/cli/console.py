"""Where output goes: data on stdout, people on stderr (Rich), honouring NO_COLOR and -q.

Rich's ``Progress`` redirects ``sys.stdout`` into its console by default whenever that
console is a terminal; with a stderr console that would send JSON results to stderr,
so progress is always created with ``redirect_stdout=False`` and results are written to
the stdout stream captured here.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from dataclasses import dataclass, field

from rich.console import Console

from krea2kit.errors import StdoutClosed

# Characters that must never reach stdout raw: C0/C1 controls (newlines, ESC, ...), the
# Unicode line and paragraph separators (str.splitlines and many readers break lines
# there) and the bidirectional overrides (they make a terminal show a different text).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    ch = match.group()
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_line(text: str) -> str:
    """``text`` with control characters and line breaks written as backslash escapes
    (``\\n``, ``\\x1b``, ``\\u2028``), so a path or prompt from a file is always one
    inert stdout line. Other characters, backslashes included, are left as they are."""
    return _UNSAFE.sub(_escape_char, text)


def stdout_closed(stream) -> bool:
    """True when ``stream`` is a pipe whose reader has gone (``| head -1`` has exited).

    poll() reports POLLERR on the write end of a pipe without readers (Linux) or POLLHUP
    (BSD, macOS); files and terminals never do. Where poll is missing, say no."""
    import select

    if not hasattr(select, "poll"):
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
        return False
    poller = select.poll()
    poller.register(fd, 0)  # errors and hang-ups are always reported
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


@dataclass
class Output:
    quiet: int = 0  # -q: no progress or summary; -qq: errors only
    verbose: int = 0
    color: str = "auto"  # auto | always | never
    stdout: object = field(default_factory=lambda: sys.stdout)
    _err: Console | None = None

    @property
    def err(self) -> Console:
        if self._err is None:
            # no-color.org: only a non-empty NO_COLOR turns colour off (an empty one is "unset").
            no_color = self.color == "never" or (bool(os.environ.get("NO_COLOR")) and self.color != "always")
            force = True if self.color == "always" else None
            self._err = Console(stderr=True, no_color=no_color, force_terminal=force, highlight=False,
                                soft_wrap=True)
        return self._err

    @property
    def interactive(self) -> bool:
        """Animated progress only for a person at a terminal."""
        return self.err.is_terminal and not self.quiet and os.environ.get("TERM") != "dumb"

    def data(self, line: str) -> None:
        """One line of data on stdout, flushed so pipes see it as soon as it exists.

        A reader that went away raises :class:`StdoutClosed` (the CLI exits quietly)."""
        try:
            self.stdout.write(line + "\n")
            self.stdout.flush()
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
                raise StdoutClosed() from None
            raise

    def ensure_stdout_open(self) -> None:
        """Stop before more work when nobody reads the results any more."""
        if stdout_closed(self.stdout):
            raise StdoutClosed()

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False)

    def debug(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self.err.print(message, style="dim", markup=False)

    def warn(self, message: str) -> None:
        if self.quiet < 2:
            self.err.print("[yellow]warning:[/yellow] ", end="", markup=True)
            self.err.print(message, markup=False)

    def error(self, message: str) -> None:
        self.err.print("[bold red]error:[/bold red] ", end="", markup=True)
        self.err.print(message, markup=False)


_current: Output | None = None


def current() -> Output:
    """The Output the running command set up (colour, quiet), or a default one."""
    return _current or Output()


def set_current(out: Output) -> None:
    global _current
    _current = out
