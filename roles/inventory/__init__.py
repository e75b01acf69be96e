"""Layer 2: inventory.yaml validated into hosts (pydantic schema), the host selection, and
the compiled cache the scheduled backup reads.
"""
