"""Rates as people write them: the one parser behind every ``--bandwidth``.

A bare number is bytes per second. Units follow rsync's rule (and ``ls -h``, ``dd``, qemu):
a letter alone or with ``iB`` is a power of 1024, the letter with ``B`` a power of 1000, and
bit rates are decimal, as links are sold. ``/s`` may follow; case does not matter except that
``B`` (bytes) must be a capital: ``Mb`` could mean either, so it is refused with both spellings
to choose from.

=============================  ==========================  ===================
written                        means (per second)          bytes per second
=============================  ==========================  ===================
``500``, ``500B``              bytes                       500
``64K``, ``64KiB``             kibibytes (2**10)           65,536
``100M``, ``100MiB``           mebibytes (2**20)           104,857,600
``2G``, ``2GiB``               gibibytes (2**30)           2,147,483,648
``1T``, ``1TiB``               tebibytes (2**40)           1,099,511,627,776
``500kB``, ``500MB``, ``1GB``  decimal bytes (10**3n)      500,000 ...
``100kbit``, ``1Gbit``         decimal bits, / 8           12,500 ... 125,000,000
=============================  ==========================  ===================

It lives in the lowest layer so that any layer can take a rate from a person; it raises
``ValueError`` with a message for that person (the CLI turns it into a usage error).
"""
from __future__ import annotations

import math
import re

PREFIXES = "kmgt"
EXAMPLES = "e.g. 100MiB, 100M, 500MB, 1gbit, 12500000"
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*(/s)?\s*$")


def _unit_scale(unit: str) -> float | None:
    """Bytes per unit, or None if ``unit`` is not one we accept."""
    if unit in ("", "B"):
        return 1.0
    if unit.lower() == "bit":
        return 1 / 8
    prefix, rest = unit[0].lower(), unit[1:]
    if prefix not in PREFIXES:
        return None
    power = PREFIXES.index(prefix) + 1
    if rest in ("", "iB"):
        return float(1024 ** power)
    if rest == "B":
        return float(1000 ** power)
    if rest.lower() == "bit":
        return 1000 ** power / 8
    return None


def parse_rate(text: str) -> float:
    """``text`` as bytes per second (see the module's table); ``ValueError`` if it is not a
    positive rate."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a rate ({EXAMPLES})")
    number, unit = m.group(1), m.group(2)
    if len(unit) == 2 and unit[0].lower() in PREFIXES and unit[1] == "b":
        raise ValueError(f"{text!r} is ambiguous: write {number}{unit[0].upper()}B for bytes "
                         f"or {number}{unit[0]}bit for bits per second")
    scale = _unit_scale(unit)
    if scale is None:
        raise ValueError(f"{text!r}: unknown unit {unit!r} ({EXAMPLES})")
    value = float(number) * scale
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{text!r}: a rate must be above zero")
    return value


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
SIZE_EXAMPLES = "e.g. 64G, 64GiB, 500MB, 1073741824"


def parse_size(text: str) -> int:
    """An amount of memory as people write it, by the rate's units without ``/s`` or bits
    (``64G`` = 64 GiB, ``500MB`` = 500,000,000 bytes); ``ValueError`` if it is not above zero."""
    m = _SIZE.match(text)
    scale = _unit_scale(m.group(2)) if m else None
    if not m or scale is None or m.group(2).lower().endswith("bit"):
        raise ValueError(f"{text!r} is not a size ({SIZE_EXAMPLES})")
    value = float(m.group(1)) * scale
    if not value >= 1 or not math.isfinite(value):
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return int(value)
