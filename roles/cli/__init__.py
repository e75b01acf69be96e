"""Layer 6: presentation and entry points that run several features (``pullback-backup``,
the restore drill).
"""
