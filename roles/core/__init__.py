"""Layer 1, pure: rsync's errors, rendering, diffs, the per-OS table, the fleet's thread pool.

Standard library (and jinja2 for rendering) only; no I/O beyond reading templates.
"""
