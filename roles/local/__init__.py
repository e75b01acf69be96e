"""Layer 2: the backup host's own files: keys, state folders, atomic writes.
"""
