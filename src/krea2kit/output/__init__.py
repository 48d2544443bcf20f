"""Image files with provenance metadata: A1111 ``parameters``, XMP AI marker, ``krea2kit`` JSON."""
