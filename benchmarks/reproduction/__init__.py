"""The two papers' findings as tables and figures (``make reproduce``; not part of the library)."""
