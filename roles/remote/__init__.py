"""Layer 2: talking to a host: the SSH connection, sudo, and the one-round-trip fact gathering.
"""
