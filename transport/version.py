"""The versions a peer or a user is told: the protocol's and the installed package's.

Apart from ``transport.protocol`` (which re-exports both) so that `kcr-migrate --version`
and `kcr-agent --version` load neither the record schema nor the handshake to print them."""
from __future__ import annotations

import functools

PROTOCOL_VERSION = 1


@functools.cache
def tool_version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("kcr-migrate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
