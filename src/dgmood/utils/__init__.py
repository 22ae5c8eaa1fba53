"""Bottom layer: atomic files and checksums, errors, torchrun helpers (no dgmood imports)."""
