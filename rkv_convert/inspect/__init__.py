"""``rkv inspect``: per-layer statistics and figures of an exported checkpoint."""
