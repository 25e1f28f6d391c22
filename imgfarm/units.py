"""Byte counts for people: one formatter for the CLI's tables and the progress line Flower shows."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """`512 B`, `1.2 GiB`: binary units, one decimal above bytes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
