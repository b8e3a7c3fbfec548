"""chatgate's benchmark: `python -m bench` (see docs/performance.md for the method)."""
