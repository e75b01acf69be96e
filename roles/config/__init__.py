"""Layer 3, pure: planners for the files pullback manages on a host (sshd_config, root's
authorized_keys, pullback's rsyncd.conf, the capture gate): facts in, wanted text out.
"""
