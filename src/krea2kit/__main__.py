"""``python -m krea2kit``: the same CLI as the ``krea2kit`` command.

Under ``python -m`` Python puts the working directory first on ``sys.path``, so a
``click.py``, ``rich.py`` or plugin-named module lying in whatever folder the command is
started from would be imported instead of the installed one and run. A tool that opens
other people's images and recipes must not execute files from the folder it is run in,
so that entry is removed before anything else is imported (``-P``/``PYTHONSAFEPATH``
already leaves it out; entries the user put on ``PYTHONPATH`` are kept).
"""

import os
import sys


def _drop_working_directory() -> None:
    if sys.flags.safe_path or not sys.path:
        return
    first = sys.path[0]
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was deleted
        here = None
    if first in ("", ".") or (here is not None and os.path.realpath(first) == here):
        del sys.path[0]


if __name__ == "__main__":
    _drop_working_directory()
    from krea2kit.cli import main  # after the sys.path fix, on purpose

    main()
