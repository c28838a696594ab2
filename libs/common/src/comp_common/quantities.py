"""Resource quantities as users write them: ``64Mi``, ``1.5Gi``, ``500m`` CPU."""

from __future__ import annotations

import math
import re

_MEMORY_UNITS = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_CPU_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(m?)\s*$")
MEMORY_UNITS_HELP = "bytes or one of " + ", ".join(u for u in _MEMORY_UNITS if u)


def parse_memory(value: int | float | str) -> int:
    """Bytes from ``64Mi``, ``1G``, ``1048576``; raises ValueError naming the bad part."""
    if isinstance(value, bool):
        raise ValueError(f"memory must be a quantity like '64Mi', not {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _MEMORY_RE.match(value)
        if not match:
            raise ValueError(f"memory {value!r} is not a quantity like '64Mi' ({MEMORY_UNITS_HELP})")
        number, unit = float(match.group(1)), match.group(2)
        if unit not in _MEMORY_UNITS:
            raise ValueError(f"memory {value!r} has unknown unit {unit!r}; use {MEMORY_UNITS_HELP}")
    if number < 0:
        raise ValueError(f"memory must not be negative, got {value!r}")
    return int(number * _MEMORY_UNITS[unit])


def parse_cpu(value: int | float | str) -> float:
    """Cores from ``0.5``, ``2`` or millicores ``500m``."""
    if isinstance(value, bool):
        raise ValueError(f"cpu must be a number of cores like 0.5 or '500m', not {value!r}")
    if isinstance(value, (int, float)):
        cores = float(value)
    else:
        match = _CPU_RE.match(value)
        if not match:
            raise ValueError(f"cpu {value!r} is not a number of cores like 0.5 or millicores like '500m'")
        cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cores < 0:
        raise ValueError(f"cpu must not be negative, got {value!r}")
    return cores


def format_memory(n_bytes: int) -> str:
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        size = _MEMORY_UNITS[unit]
        if n_bytes >= size:
            return f"{n_bytes // size}{unit}" if n_bytes % size == 0 else f"{n_bytes / size:.1f}{unit}"
    return str(n_bytes)


def parse_optional_cpu(value: int | float | str | None) -> float | None:
    """For settings and quotas where leaving a bound out means no bound."""
    return None if value is None else parse_cpu(value)


def parse_optional_memory(value: int | float | str | None) -> int | None:
    return None if value is None else parse_memory(value)


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: int | float | str) -> float:
    """Seconds from ``500ms``, ``10s``, ``1.5m``, ``1h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"a duration must be like '10s' or '500ms', not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif not isinstance(value, str):
        raise ValueError(f"a duration must be like '10s' or '500ms', not {type(value).__name__}")
    else:
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"duration {value!r} is not like '500ms', '10s', '2m' or '1h'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, not {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration must not be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
