"""What this CPU offers that the transport's choices depend on."""
from __future__ import annotations

import functools


@functools.cache
def cpu_has_aes() -> bool:
    """Whether this CPU has AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False
