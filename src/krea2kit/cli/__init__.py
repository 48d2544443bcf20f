"""The ``krea2kit`` command line. Thin: it parses, calls :mod:`krea2kit.api`, and
presents. Importing it must not import torch (tested)."""

from __future__ import annotations

import sys
import traceback

import click

from krea2kit.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_STDOUT_CLOSED, EXIT_USAGE, Krea2kitError, StdoutClosed


def build_cli() -> click.Group:
    from krea2kit.cli.app import cli
    from krea2kit.plugins import get_host

    host = get_host()
    host.add_commands(cli)
    return cli


def _interrupted(exc: BaseException | None = None) -> None:
    """Ctrl-C or SIGTERM: the stack has unwound (temporary files removed, finished images
    intact); leave at once with 130 (SIGINT) or 143 (SIGTERM). A normal interpreter exit
    could abort while a native worker thread (a content filter's ONNX session, say) is
    still running."""
    import os
    import signal

    from krea2kit.cli import console
    from krea2kit.errors import EXIT_TERMINATED, Terminated
    from krea2kit.files import remove_temp_files

    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup short
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    remove_temp_files()  # in case the signal landed inside a writer's own cleanup
    terminated = isinstance(exc, Terminated)
    console.current().error("terminated (SIGTERM)" if terminated else "interrupted")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def _on_sigterm(signum, frame) -> None:
    from krea2kit.errors import Terminated

    raise Terminated()


def _handle_sigterm() -> object | None:
    """Make SIGTERM unwind like Ctrl-C; returns the previous handler (None: left alone)."""
    import signal

    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN:  # `nohup`-style callers asked for it to be ignored
            return None
        signal.signal(signal.SIGTERM, _on_sigterm)
        return previous
    except (ValueError, AttributeError):  # not the main thread, or no SIGTERM on this platform
        return None


def _stdout_closed() -> None:
    """The reader of stdout went away (`| head -1`): no further work, no message, exit 141
    (128 + SIGPIPE, as shells report it). Output still buffered for stdout goes to the
    null device, so the interpreter's final flush cannot print "Exception ignored"."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests call main() in-process)
        pass
    sys.exit(EXIT_STDOUT_CLOSED)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every outcome to a documented exit code."""
    from krea2kit.cli import console

    verbose = bool(argv and ("-v" in argv or "--verbose" in argv)) or ("-v" in sys.argv[1:] or "--verbose" in sys.argv[1:])
    previous_sigterm = _handle_sigterm()
    try:
        cli = build_cli()
        code = cli.main(args=argv, prog_name="krea2kit", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Krea2kitError as exc:
        out = console.current()
        out.error(str(exc))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and our SIGTERM) into Abort
        if isinstance(exc.__context__, KeyboardInterrupt):
            _interrupted(exc.__context__)
        sys.exit(EXIT_RUNTIME)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (errors.Terminated)
        _interrupted(exc)
    except (StdoutClosed, BrokenPipeError):
        _stdout_closed()
    except Exception as exc:  # a bug: say so plainly, full traceback only with -v
        out = console.current()
        from krea2kit.env_values import hide

        out.error(hide(f"internal error: {type(exc).__name__}: {exc}"))
        if verbose:
            traceback.print_exc()
        else:
            out.err.print("  (run again with -v for the traceback; please report it)", markup=False)
        sys.exit(EXIT_RUNTIME)
    finally:
        if previous_sigterm is not None:  # main() called in-process (tests): leave no handler behind
            import signal

            signal.signal(signal.SIGTERM, previous_sigterm)
