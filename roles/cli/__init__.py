"""Layer 5: presentation and the lean entry points (``pullback-backup``).
"""
