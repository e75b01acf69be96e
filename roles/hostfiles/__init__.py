"""Layer 3: root-file transactions on a host: check unchanged, write a candidate, validate,
keep a backup, rename into place, roll back on failure. Planned in Python, applied by
one root script.
"""
