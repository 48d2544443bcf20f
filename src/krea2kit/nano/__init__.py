"""The embedded nano family: tiny members of the Krea 2 architecture whose weights ship in
this package (``weights/``, with ``weights/MODEL_CARD.md``). Every shape is read from those
files; the code that trained and evaluates them lives outside the package, in the
repository's ``nano-train/nanodev/``."""
