"""The HTTP endpoint operators scrape: /metrics (Prometheus text format, from a prometheus-client registry),
/healthz and /readyz, served on a daemon thread.

`prometheus_client.start_http_server` serves only the metrics; this adds the two probes. Each probe is a
callable returning `(ok, reason)`: 200 with `ok: <reason>` or 503 with `<reason>`, one line either way
(a probe that raises is a 503 naming the error). Both default to "ok"; a process that has one state for
both gives the same callable twice.

    server = MetricsServer(registry, host=settings.metrics_host, port=settings.metrics_port,
                           health=lambda: (True, "alive"), ready=lambda: (model_loaded, "model loaded"))
    server.start()          # binds (port 0: a free one, see server.port); MetricsError if it cannot
    ...
    server.close()

Binding to 127.0.0.1 by default; a container sets metrics_host 0.0.0.0 so that Prometheus reaches it.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from schemas.errors import VsegError

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, str]]


class MetricsError(VsegError):
    """The metrics endpoint cannot be served (its port is taken, or the address is not this host's)."""


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "-"


def run_probe(probe: Probe) -> tuple[bool, str]:
    """`probe()`, with an exception turned into (False, its one-line description)."""
    try:
        ok, reason = probe()
    except Exception as e:  # a probe that fails says so: the endpoint itself stays up
        return False, _one_line(f"{type(e).__name__}: {e}")
    return bool(ok), _one_line(str(reason))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/metrics":
            try:
                payload = generate_latest(self.server.registry)
            except Exception as e:  # a collector that fails: a 500 that says why, not a dropped connection
                log.warning("collecting metrics failed: %s", e)
                self._send(500, f"collecting metrics failed: {_one_line(str(e))}\n".encode(), body=body)
                return
            self._send(200, payload, CONTENT_TYPE_LATEST, body=body)
        elif path in ("/healthz", "/readyz"):
            ok, reason = run_probe(self.server.health if path == "/healthz" else self.server.ready)
            self._send(200 if ok else 503, f"{'ok: ' if ok else ''}{reason}\n".encode(), body=body)
        elif path == "/":
            self._send(200, b"/metrics /healthz /readyz\n", body=body)
        else:
            self._send(404, b"not found: /metrics, /healthz or /readyz\n", body=body)

    def _send(self, status: int, payload: bytes, content_type: str = "text/plain; charset=utf-8", *,
              body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, health: Probe, ready: Probe) -> None:
        self.registry = registry
        self.health = health
        self.ready = ready
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """/metrics, /healthz and /readyz on `host`:`port` (0: a free port, reported by `.port` once started)."""

    def __init__(self, registry: CollectorRegistry, *, host: str = "127.0.0.1", port: int = 0,
                 health: Probe | None = None, ready: Probe | None = None) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.health = health or _always_ok
        self.ready = ready or _always_ok
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Bind and serve on a daemon thread; MetricsError (one line, what to do) if it cannot bind."""
        if self._server is not None:
            return self
        cls = _Server6 if ":" in self.host else _Server
        try:
            self._server = cls((self.host, self.requested_port), self.registry, self.health, self.ready)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {self.host}:{self.requested_port} ({e.strerror or e}): "
                               f"choose a free port (VSEG_METRICS_PORT, --metrics-port) and an address of "
                               f"this host (VSEG_METRICS_HOST)") from e
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s", self.url)
        return self

    @property
    def port(self) -> int:
        """The port it listens on (the free one picked for port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
