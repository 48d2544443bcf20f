"""Adapters from the built-in model/safety/output code to the part protocols the
pipeline uses (see :mod:`krea2kit.pipeline`). Imported lazily by ``builtins``."""
