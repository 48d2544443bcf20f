"""Where output goes: data on stdout, people on stderr (Rich), honouring NO_COLOR and -q.

Rich's ``Progress`` redirects ``sys.stdout`` into its console by default whenever that
console is a terminal; with a stderr console that would send JSON results to stderr,
so progress is always created with ``redirect_stdout=False`` and results are written to
the stdout stream captured here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from rich.console import Console


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
            no_color = self.color == "never" or ("NO_COLOR" in os.environ and self.color != "always")
            force = True if self.color == "always" else None
            self._err = Console(stderr=True, no_color=no_color, force_terminal=force, highlight=False,
                                soft_wrap=True)
        return self._err

    @property
    def interactive(self) -> bool:
        """Animated progress only for a person at a terminal."""
        return self.err.is_terminal and not self.quiet and os.environ.get("TERM") != "dumb"

    def data(self, line: str) -> None:
        """One line of data on stdout, flushed so pipes see it as soon as it exists."""
        self.stdout.write(line + "\n")
        self.stdout.flush()

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
