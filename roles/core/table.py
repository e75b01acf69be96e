"""Plain-text tables for terminal output: left-aligned columns, two spaces apart."""

from __future__ import annotations

from collections.abc import Sequence


def format_rows(rows: Sequence[Sequence[str]]) -> str:
    """``rows[0]`` is the header; every row has as many cells as it. No trailing blanks."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows) + "\n"
