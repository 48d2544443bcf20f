"""The ``krea2kit`` command line. Thin: it parses, calls :mod:`krea2kit.api`, and
presents. Importing it must not import torch (tested)."""

from __future__ import annotations

import sys
import traceback

import click

from krea2kit.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, Krea2kitError


def build_cli() -> click.Group:
    from krea2kit.cli.app import cli
    from krea2kit.plugins import get_host

    host = get_host()
    host.add_commands(cli)
    return cli


def _interrupted() -> None:
    """Ctrl-C: the stack has unwound (temporary files removed, finished images intact);
    leave at once. A normal interpreter exit could abort while a native worker thread (a
    content filter's ONNX session, say) is still running."""
    import os

    from krea2kit.cli import console

    console.current().error("interrupted")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every outcome to a documented exit code."""
    from krea2kit.cli import console

    verbose = bool(argv and ("-v" in argv or "--verbose" in argv)) or ("-v" in sys.argv[1:] or "--verbose" in sys.argv[1:])
    try:
        cli = build_cli()
        code = cli.main(args=argv, prog_name="krea2kit", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Krea2kitError as exc:
        out = console.current()
        out.error(str(exc))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C into Abort
        if isinstance(exc.__context__, KeyboardInterrupt):
            _interrupted()
        sys.exit(EXIT_RUNTIME)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly without a traceback.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_RUNTIME)
    except Exception as exc:  # a bug: say so plainly, full traceback only with -v
        out = console.current()
        out.error(f"internal error: {type(exc).__name__}: {exc}")
        if verbose:
            traceback.print_exc()
        else:
            out.err.print("  (run again with -v for the traceback; please report it)", markup=False)
        sys.exit(EXIT_RUNTIME)
