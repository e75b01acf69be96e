"""Layer 2: the backup host's own files: keys, the backup store, safe folders, the capture
record, the local rsync, atomic writes.
"""
