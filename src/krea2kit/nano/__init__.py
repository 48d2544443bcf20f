"""The embedded nano family: tiny members of the Krea 2 architecture shipped in the package."""
