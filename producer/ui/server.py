"""Running the viewer: `start_ui` serves it from a background thread (the fleet daemon's `--http-port`), and
`python -m producer ui [--http-port P] [--host H]` serves it alone, for a deployment without cameras, until
SIGTERM or SIGINT (exit 0).

The access rule (producer/ui/auth.py `Auth`: no token on an address other than loopback is refused) is checked
first, then the socket is bound here, before the thread starts, so that either is a one-line ConfigError at
once. uvicorn then serves on that socket from its own thread and event loop, installing no signal handler: the
process's owner has them (the daemon, or `run_ui`). `close()` ends the event streams (each within a second),
then stops the server and waits for its thread.

Starlette and uvicorn are imported when a viewer starts, not with this module: `python -m producer --help`
stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.settings import Settings
from schemas.errors import ConfigError

if TYPE_CHECKING:
    from producer.ui.actions import CameraConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
START_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 10.0


@dataclass
class UiServer:
    """A viewer served from a background thread; `close()` stops it."""

    url: str
    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _stopping: threading.Event = field(repr=False)

    def close(self) -> None:
        self._stopping.set()  # the event streams end within a second: nothing then holds the server open
        self._server.should_exit = True
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the web viewer on %s did not stop within %g s", self.url, CLOSE_TIMEOUT_S)

    def __enter__(self) -> UiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or ConfigError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _name, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"the viewer cannot listen on {host!r}: {e.strerror or e} (check --host / VSEG_UI_HOST)") \
            from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"the viewer cannot listen on {host}:{port}: {e.strerror or e} (choose another "
                          f"--http-port, or stop what holds it)") from None
    sock.setblocking(False)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_ui(settings: Settings, host: str, port: int, cameras: CameraConfig | None = None) -> UiServer:
    """Serve the viewer on host:port (0: a free port; `.url` says which) from a background thread. `cameras`:
    where a camera job's zones are saved (the fleet daemon); None: on the job only. ConfigError (one line) for
    a public address without VSEG_UI_TOKEN, or an address or port that cannot be had."""
    import uvicorn

    from producer.ui.app import build_app
    from producer.ui.auth import Auth

    auth = Auth(host, settings.ui_token)
    sock = _listen(host, port)
    stopping = threading.Event()
    app = build_app(settings, auth=auth, cameras=cameras, stopping=stopping)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", loop="asyncio", http="h11",
                            ws="none", timeout_graceful_shutdown=3)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the process's owner handles signals, never the viewer
            yield

    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vseg-ui", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ConfigError(f"the viewer did not start on {host}:{port} (see the log above)")
        time.sleep(0.02)
    bound = sock.getsockname()[1]
    ui = UiServer(_url(host, bound), host, bound, server, thread, stopping)
    log.info("web viewer on %s (%s)", ui.url, "open: loopback only" if auth.open else "token required")
    return ui


def add_ui_parser(subparsers: Any) -> None:
    """`ui [--http-port P] [--host H]`: the viewer alone (no cameras)."""
    p = subparsers.add_parser("ui", help="serve the web viewer (cameras, jobs, masks over the video, prompts, zones) "
                                         "until stopped; `serve --http-port` serves it with the cameras")
    p.add_argument("--http-port", type=int, default=DEFAULT_PORT, metavar="PORT",
                   help=f"the port to serve on (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--host", help="the address to listen on (default ui_host, VSEG_UI_HOST: 127.0.0.1); any other "
                                  "than a loopback address needs VSEG_UI_TOKEN")


def run_ui(args: argparse.Namespace, settings: Settings) -> int:
    """`python -m producer ui`: serve until SIGTERM or SIGINT, then exit 0."""
    if not 0 <= args.http_port <= 65535:
        raise ConfigError(f"--http-port must be 0..65535, but got {args.http_port}")
    ui = start_ui(settings, args.host or settings.ui_host, args.http_port)
    print(f"web viewer on {ui.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ui.close()
    return 0
