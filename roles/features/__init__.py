"""Layer 5: one module per task family. Features never import each other: what two
features share lives in a lower layer.
"""
