"""The gRPC layer: TLS, health, reflection, interceptors and thin servicers, wired in `app`."""

from __future__ import annotations

from typing import Any

__all__ = ["DataopsServer", "build_server"]


def __getattr__(name: str) -> Any:
    # Lazy, so `dataops.server.status` (the kind → code table, which the protobuf
    # translators use) can be imported without loading the whole server.
    if name in __all__:
        from dataops.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
