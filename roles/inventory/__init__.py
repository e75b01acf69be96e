"""Layer 2: inventory.yaml validated into hosts (pydantic schema) and its compiled cache.
"""
