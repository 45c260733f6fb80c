"""Quantities with units: sizes in bytes, rates in bytes/s, durations in seconds.

Sizes follow QEMU: a bare K, M, G or T is binary (1024-based) like KiB, MiB, GiB, TiB, while
KB, MB, GB and TB are SI. Rates take any size per second, or network units in bits (bit, Kbit,
Mbit, Gbit, Tbit: SI, 8 bits to the byte). Durations take ps, ns, us (or µs), ms and s (ps
for the CPU costs per byte, cpu.*-byte).
Plain numbers are bytes, bytes/s and seconds. Every format_* result parses back to exactly
the value it was given.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from decimal import Decimal, localcontext

ECHO_LIMIT = 60  # characters of a value an error message quotes
_ECHO = reprlib.Repr()  # bounded in depth and items: a deeply nested TOML array is no trouble
_ECHO.maxlevel, _ECHO.maxother = 3, ECHO_LIMIT


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """Text cut to `limit` characters, saying how long it was: an error stays one short line
    when the value it quotes is 5 MB."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def quote(value: object) -> str:
    """A value the user gave, as an error message quotes it: repr(), cut to a readable
    length (see clip)."""
    if isinstance(value, str):
        if len(value) <= ECHO_LIMIT:
            return repr(value)
        return f"{value[:ECHO_LIMIT]!r}... ({len(value)} characters)"
    return clip(_ECHO.repr(value))


# A number, then an optional unit; whitespace between them is allowed ("4 KiB").
_QUANTITY = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(\S*)\s*")

_PREFIXES = "KMGT"
_BINARY = {p: Decimal(1024) ** (i + 1) for i, p in enumerate(_PREFIXES)}
_SI = {p: Decimal(1000) ** (i + 1) for i, p in enumerate(_PREFIXES)}


def _size_units() -> dict[str, Decimal]:
    units = {"": Decimal(1), "B": Decimal(1), "k": _BINARY["K"], "kB": _SI["K"]}
    for p in _PREFIXES:
        units[p] = units[p + "iB"] = units[p + "i"] = _BINARY[p]
        units[p + "B"] = _SI[p]
    return units


def _rate_units() -> dict[str, Decimal]:
    units: dict[str, Decimal] = {}
    for name, mult in _SIZE_UNITS.items():
        units[name] = units[name + "/s"] = mult
        if name.endswith("B"):
            units[name + "ps"] = mult
    bits = {"": Decimal(1), "k": _SI["K"], **_SI}
    for p, mult in bits.items():
        units[p + "bit"] = units[p + "bit/s"] = units[p + "bps"] = mult / 8
    return units


_SIZE_UNITS = _size_units()
_RATE_UNITS = _rate_units()
_DURATION_UNITS = {
    "": Decimal(1),
    "s": Decimal(1),
    "ms": Decimal("1e-3"),
    "us": Decimal("1e-6"),
    "\u00b5s": Decimal("1e-6"),  # MICRO SIGN
    "\u03bcs": Decimal("1e-6"),  # GREEK SMALL LETTER MU, what many keyboards type
    "ns": Decimal("1e-9"),
    "ps": Decimal("1e-12"),
}

_SIZE_EXPECTED = "a size like 4KiB, 2MiB, 64MiB or 1.25GB"
_RATE_EXPECTED = "a rate like 10Gbit/s, 1.25GB/s or 128MiB/s"
_DURATION_EXPECTED = "a duration like 200us, 10ms or 1.5s"


class TooLarge(ValueError):
    """A number beyond what a float holds (1e400, 1e999999): refused before the arithmetic,
    which would overflow or spend seconds on a million digits. The configuration turns it
    into the key's allowed range."""


_LARGEST = Decimal("1e400")  # past float's range; far past any bound the configuration sets


def _parse(value: object, units: dict[str, Decimal], expected: str) -> Decimal:
    # bool is an int subclass: reject it, or True would quietly mean 1 byte.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {expected}, got {quote(value)}")
    match = _QUANTITY.fullmatch(str(value))
    if match is None or match.group(2) not in units:
        raise ValueError(f"expected {expected}, got {quote(value)}")
    number = Decimal(match.group(1))
    if number.copy_abs() >= _LARGEST:
        raise TooLarge(f"expected {expected}, got {quote(value)}")
    # Exact decimal arithmetic, so 1.25GB is 1250000000 bytes, not 1249999999.9999998.
    with localcontext() as ctx:
        ctx.prec = 100
        return number * units[match.group(2)]


def _to_float(amount: Decimal, value: object, expected: str) -> float:
    result = float(amount)
    if not math.isfinite(result):
        raise TooLarge(f"expected {expected}, got {quote(value)}")
    return result


def parse_size(value: int | float | str) -> int:
    """Bytes from 4096, "4K", "4KiB", "2MiB", "1.25GB", ...; must be a whole number."""
    amount = _parse(value, _SIZE_UNITS, _SIZE_EXPECTED)
    if amount != amount.to_integral_value():
        raise ValueError(f"expected a whole number of bytes, got {quote(value)}")
    return int(amount)


def parse_rate(value: int | float | str) -> float:
    """Bytes/s from "10Gbit/s", "10Gbps", "1.25GB/s", "128MiB/s", "1.25GB", 0, ..."""
    return _to_float(_parse(value, _RATE_UNITS, _RATE_EXPECTED), value, _RATE_EXPECTED)


def parse_duration(value: int | float | str) -> float:
    """Seconds from "500ns", "200us", "200µs", "10ms", "1.5s" or a plain number of seconds."""
    amount = _parse(value, _DURATION_UNITS, _DURATION_EXPECTED)
    return _to_float(amount, value, _DURATION_EXPECTED)


# Output units, in order of preference when two spellings are equally short.
_SIZE_FORMATS = [
    *((p + "iB", _BINARY[p]) for p in reversed(_PREFIXES)),
    *((p + "B", _SI[p]) for p in reversed(_PREFIXES)),
    ("B", Decimal(1)),
]
_BIT_FORMATS = [(p + "bit/s", _SI[p] / 8) for p in reversed(_PREFIXES)]
_BYTE_RATE_FORMATS = [(name + "/s", mult) for name, mult in _SIZE_FORMATS]
_DURATION_FORMATS = [(name, _DURATION_UNITS[name]) for name in ("s", "ms", "us", "ns", "ps")]


def _reads_back(parse: Callable[[str], float], text: str, value: float) -> bool:
    try:
        return parse(text) == value
    except ValueError:  # e.g. "1.164GiB" is not a whole number of bytes
        return False


def _exact_spellings(
    value: float,
    formats: list[tuple[str, Decimal]],
    parse: Callable[[str], float],
    below: float = 1e6,
) -> list[str]:
    """Spellings with at most 3 decimals and 1 <= |number| < below that parse back to *value*."""
    spellings = []
    with localcontext() as ctx:
        ctx.prec = 100
        for name, mult in formats:
            scaled = Decimal(value) / mult
            if 1 <= abs(scaled) < below:
                spellings.append(f"{scaled:.3f}".rstrip("0").rstrip(".") + name)
    return [text for text in spellings if _reads_back(parse, text, value)]


def _format(
    value: float, formats: list[tuple[str, Decimal]], parse: Callable[[str], float], base: str
) -> str:
    if value == 0:
        return "0"
    exact = _exact_spellings(value, formats, parse)
    # min keeps the first of equals, the preferred unit. Python's repr is the shortest text
    # that reads back as the same number: the fallback for odd or huge values.
    return min(exact, key=len) if exact else f"{value!r}{base}"


def format_size(n: int) -> str:
    """Shortest exact spelling of *n* bytes, e.g. "64MiB", "1.25GB", "4097B"."""
    return _format(n, _SIZE_FORMATS, parse_size, "B")


def format_rate(bps: float) -> str:
    """Exact spelling of a rate in bytes/s, e.g. "10Gbit/s", "128MiB/s", "100B/s".

    Links are quoted in bits, so a rate with a plain spelling in Kbit..Tbit uses it.
    """
    bits = _exact_spellings(bps, _BIT_FORMATS, parse_rate, below=1000)
    return min(bits, key=len) if bits else _format(bps, _BYTE_RATE_FORMATS, parse_rate, "B/s")


def format_duration(s: float) -> str:
    """Shortest exact spelling of a duration in seconds, e.g. "200us", "1.5s"."""
    return _format(s, _DURATION_FORMATS, parse_duration, "s")
