"""krea2kit: an independent toolkit for the Krea 2 image model family.

Not affiliated with or endorsed by Krea. Importing this package is cheap: torch and
other heavy libraries are imported only when a component is used.
"""

__version__ = "0.1.0"
