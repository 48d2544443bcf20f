"""Errors that reach a person, and the exit codes the CLI maps them to.

Every error a user can cause carries what went wrong, where (a file and, when it
applies, a dotted key) and how to fix it. The CLI prints ``str(error)`` and exits
with ``error.exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations

# Documented exit codes (README, "Exit codes").
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_BLOCKED = 3
EXIT_WEIGHTS = 4
EXIT_EXPANDER = 5  # [expander]: the language model did not answer (down, timeout, HTTP error, empty/refused)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: `kill`, a job scheduler, `docker stop`; handled like Ctrl-C
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, what shells report for `yes | head -1`


class StdoutClosed(BaseException):
    """The reader of stdout went away (``krea2kit run ... | head -1``): stop at once, quietly.

    A ``BaseException`` like ``KeyboardInterrupt``: it is a request to stop, not an error,
    and no ``except Exception`` on the way up (a fail-closed filter wrapper, say) may
    swallow it. Not an ``OSError`` either, so click does not turn it into exit 1.
    """



class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler. A ``KeyboardInterrupt`` so it
    unwinds exactly like Ctrl-C (temporary files removed, finished images kept); the CLI
    exits with :data:`EXIT_TERMINATED` instead of :data:`EXIT_INTERRUPTED`."""


class Krea2kitError(Exception):
    """Base class: a message for a person, a location and a hint."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.key = key
        self.hint = hint

    def __str__(self) -> str:
        where = ""
        if self.file and self.key:
            where = f"{self.file}: {self.key}: "
        elif self.file:
            where = f"{self.file}: "
        elif self.key:
            where = f"{self.key}: "
        text = f"{where}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        from krea2kit.env_values import hide  # a path from $VAR is shown as $VAR, never its value

        return hide(text)


class UsageError(Krea2kitError):
    """Bad command-line input."""

    exit_code = EXIT_USAGE


class RecipeError(Krea2kitError):
    """A recipe that does not parse or validate. Raised before any weights load."""

    exit_code = EXIT_USAGE


class WeightsError(Krea2kitError):
    """A weights file that is missing, corrupt, or not the model it should be."""

    exit_code = EXIT_WEIGHTS


class PluginError(Krea2kitError):
    """A plugin that failed to load, clashed with another, or misbehaved."""

    exit_code = EXIT_RUNTIME


class ExpanderError(Krea2kitError):
    """The prompt expander's model gave no usable answer (endpoint down, timeout, HTTP error,
    malformed, empty or refused answer). ``[expander] on_failure = "original"`` turns it into a
    warning and keeps the prompt as written."""

    exit_code = EXIT_EXPANDER


class BlockedError(Krea2kitError):
    """Content was blocked by a content filter."""

    exit_code = EXIT_BLOCKED
