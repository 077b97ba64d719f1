"""The Prometheus `/metrics` endpoint: one small HTTP server per process, over that component's registry.

Each component keeps its own `CollectorRegistry` (not prometheus_client's global one), so a router
and workers started in one process never mix their series.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """Serves `registry` in the Prometheus text format on host:port (port 0: any free port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from e
        self.host, self.port = host, self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
