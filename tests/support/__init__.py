"""Helpers for krea2kit's own tests (not installed): ``from support.presets import ...``.

``tests/`` is on the import path when pytest runs (``pythonpath`` in ``pyproject.toml``)."""
