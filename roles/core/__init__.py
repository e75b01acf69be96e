"""Layer 1, pure: the wanted state of a hardened host (hardened.py), rsync's versions,
commands and errors, the pull's argv, rendering, diffs, the per-OS table, shards, tables.

Standard library (and jinja2 for rendering) only.
"""
