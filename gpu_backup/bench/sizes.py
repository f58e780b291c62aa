"""Byte sizes as people type them (``64K``, ``1M``, ``1G``) and as tables print them."""

from __future__ import annotations

__all__ = ["SizeError", "parse_size", "parse_sizes", "fmt_size", "fmt_bytes"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeError(ValueError):
    """A size given on the command line is malformed or unusable (the message says why)."""


def parse_size(text: str, *, multiple_of: int = 1) -> int:
    """``"64K"`` -> 65536.  Suffixes K, M, G, T are powers of 1024 (``KiB``, ``MB`` accepted).

    Raises
    ------
    SizeError
        Malformed, not positive, or not a multiple of ``multiple_of`` (the page size).
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] and t[-1] in "KMGT" else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise SizeError(f"bad size {text!r}: use a number with an optional K/M/G suffix, "
                        f"e.g. 64K, 1M, 256M, 1G") from None
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise SizeError(f"size {text!r} must be > 0 bytes")
    if n % multiple_of:
        near = [m for m in (n // multiple_of * multiple_of, -(-n // multiple_of) * multiple_of) if m]
        raise SizeError(f"size {text!r} = {n:,} B is not a multiple of the page size "
                        f"{multiple_of:,} B (nearest: {' or '.join(f'{m:,} B' for m in near)})")
    return n


def parse_sizes(text: str, *, multiple_of: int = 1) -> list[int]:
    """``"64K,1M,256M"`` -> sorted, de-duplicated byte counts."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise SizeError(f"no sizes in {text!r}: give e.g. 64K,1M,256M")
    return sorted({parse_size(p, multiple_of=multiple_of) for p in parts})


def fmt_size(n: int) -> str:
    """Short binary label: 65536 -> ``64K``, 1 << 30 -> ``1G``; plain bytes otherwise."""
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def fmt_bytes(n: int | float | None) -> str:
    """Human label with the exact count: ``1.00 GiB (1,073,741,824 B)``; ``n/a`` for None."""
    if n is None:
        return "n/a"
    n = int(n)
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= mult:
            return f"{n / mult:.2f} {unit} ({n:,} B)"
    return f"{n:,} B"
