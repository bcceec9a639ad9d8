"""The gRPC layer: TLS, health, reflection, interceptors and thin servicers, wired in `app`."""

from dataops.server.app import DataopsServer, build_server

__all__ = ["DataopsServer", "build_server"]
