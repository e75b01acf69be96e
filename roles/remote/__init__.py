"""Layer 2: talking to a host: the SSH connection and sudo, host keys, and the
one-round-trip fact gathering.
"""
