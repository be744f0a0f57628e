"""Real live sources for tests, each on a free port of 127.0.0.1, stopped when the `with` block ends.

- `ts_over_tcp(video)`: ffmpeg sending MPEG-TS at the clip's own rate (`-re`, looped) to one TCP client
  (`tcp://...?listen=1`: it serves the first client that connects, and exits when that client goes);
- `ts_over_http(video)`: the same over HTTP (`-listen 1`: one client too);
- `rtsp_source(video)`: GStreamer's RTSP server (tests/rtsp_server_gst.py, run by /usr/bin/python3) fed
  an H.264 RTP stream by ffmpeg: RTP over TCP or UDP, as the client asks, any number of clients;
- `hls_playlist(video, folder)`: a finished HLS playlist (#EXT-X-ENDLIST) served over HTTP;
- `silent_tcp_server(prefix)`: accepts connections, sends `prefix` (on the first one, or on each), then
  sends nothing while keeping them open: a camera that hangs.

The ffmpeg-based ones yield a `LiveServer`: its URL (it is a str) with `kill()` (SIGKILL, as a crash
would) and `restart()` (the same port again). Every sender re-encodes the clip with a key frame each
half second, as cameras do, so a client that joins mid-stream has a picture within half a second.
`missing_tools(...)` says what to install when a tool is not there (tests skip with it).
"""

from __future__ import annotations

import functools
import http.server
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SCRIPT = ROOT / "tests" / "rtsp_server_gst.py"
_ENCODE = ["-an", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
           "-force_key_frames", "expr:gte(t,n_forced*0.5)"]
_GST_CHECK = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
    "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
    "missing = [e for e in ('udpsrc', 'rtph264depay', 'h264parse', 'rtph264pay') if not Gst.ElementFactory.find(e)]; "
    "raise SystemExit(' '.join(missing) or None)"
)


@functools.cache
def missing_tools(*tools: str) -> str | None:
    """Why the tests needing `tools` ("ffmpeg", "rtsp") cannot run here, with what to install; None if they can."""
    for tool in tools:
        if tool == "ffmpeg" and shutil.which("ffmpeg") is None:
            return "needs ffmpeg on PATH: apt-get install ffmpeg"
        if tool == "rtsp":
            install = "apt-get install --no-install-recommends python3-gi gir1.2-gst-rtsp-server-1.0"
            if not Path(SYSTEM_PYTHON).exists():
                return f"needs {SYSTEM_PYTHON} with GStreamer's RTSP server: {install}"
            check = subprocess.run([SYSTEM_PYTHON, "-c", _GST_CHECK], capture_output=True, text=True, timeout=60)
            if check.returncode != 0:
                why = (check.stderr.strip().splitlines() or ["missing"])[-1]
                return f"needs GStreamer's RTSP server for {SYSTEM_PYTHON} ({why}): {install}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mpegts_bytes(video: Path) -> bytes:
    """`video` as an MPEG-TS byte stream (key frames each half second), what ts_over_tcp would send."""
    return subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(video), *_ENCODE,
                           "-f", "mpegts", "pipe:1"], check=True, capture_output=True, timeout=60).stdout


class LiveServer(str):
    """The URL of a running source (a str: pass it where a URL goes) and the controls of its processes."""

    _start: Callable[[], list[subprocess.Popen[bytes]]]
    _procs: list[subprocess.Popen[bytes]]

    def __new__(cls, url: str, start: Callable[[], list[subprocess.Popen[bytes]]]) -> LiveServer:
        server = super().__new__(cls, url)
        server._start, server._procs = start, []
        return server

    @property
    def url(self) -> str:
        return str(self)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def start(self) -> LiveServer:
        self._procs = self._start()
        return self

    def kill(self) -> None:
        """SIGKILL every process of the source (a crash, not a goodbye), and reap them."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            proc.wait(timeout=10)
        self._procs = []

    def restart(self) -> None:
        self.kill()
        self.start()


def _ffmpeg(video: Path, loop: bool, out: list[str]) -> subprocess.Popen[bytes]:
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re",
           *(["-stream_loop", "-1"] if loop else []), "-i", str(video), *_ENCODE, *out]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _listening(port: int) -> bool:
    """Whether something listens on TCP `port` (read from /proc: connecting would use up the one client
    ffmpeg's listen mode serves)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:  # "sl local_address rem_address st ...": 0100007F:1F90 ..., st 0A is LISTEN
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return True
    return False


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _listening(port):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"the test source exited ({proc.returncode}) before listening on {port}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the test source did not listen on port {port} within {timeout_s:g} s")
        time.sleep(0.02)


@contextmanager
def _serving(server: LiveServer) -> Iterator[LiveServer]:
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def ts_over_tcp(video: Path, *, loop: bool = True) -> Iterator[LiveServer]:
    """`tcp://127.0.0.1:PORT`: MPEG-TS at real-time rate to the first client (ffmpeg's tcp listen)."""
    port = free_port()

    def start() -> list[subprocess.Popen[bytes]]:
        proc = _ffmpeg(video, loop, ["-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1"])
        _wait_listening(proc, port)
        return [proc]

    with _serving(LiveServer(f"tcp://127.0.0.1:{port}", start)) as server:
        yield server


@contextmanager
def ts_over_http(video: Path, *, loop: bool = True, path: str = "/live.ts") -> Iterator[LiveServer]:
    """`http://127.0.0.1:PORT/live.ts`: MPEG-TS at real-time rate to the first client (ffmpeg's HTTP listen)."""
    port = free_port()

    def start() -> list[subprocess.Popen[bytes]]:
        proc = _ffmpeg(video, loop, ["-f", "mpegts", "-listen", "1", f"http://127.0.0.1:{port}{path}"])
        _wait_listening(proc, port)
        return [proc]

    with _serving(LiveServer(f"http://127.0.0.1:{port}{path}", start)) as server:
        yield server


@contextmanager
def rtsp_source(video: Path, *, loop: bool = True, path: str = "/cam") -> Iterator[LiveServer]:
    """`rtsp://127.0.0.1:PORT/cam`: a real RTSP server (GStreamer's) relaying ffmpeg's H.264 at real-time rate.
    Needs `missing_tools("rtsp")` to be None."""
    port, rtp_port = free_port(), free_port()

    def start() -> list[subprocess.Popen[bytes]]:
        server = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SCRIPT), "--port", str(port), "--path", path,
                                   "--udp-port", str(rtp_port)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        if not ready or server.stdout.readline().strip() != b"ready":
            server.kill()
            err = server.stderr.read().decode(errors="replace") if server.stderr else ""
            raise RuntimeError(f"the RTSP server did not start on port {port}: {err}")
        return [server, _ffmpeg(video, loop, ["-f", "rtp", f"rtp://127.0.0.1:{rtp_port}"])]

    with _serving(LiveServer(f"rtsp://127.0.0.1:{port}{path}", start)) as server:
        yield server


@contextmanager
def hls_playlist(video: Path, folder: Path, *, segment_s: float = 1.0) -> Iterator[str]:
    """`http://127.0.0.1:PORT/index.m3u8`: `video` cut into a finished (VOD) HLS playlist in `folder`,
    served over HTTP."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(video), *_ENCODE,
                    "-f", "hls", "-hls_time", f"{segment_s:g}", "-hls_playlist_type", "vod",
                    str(folder / "index.m3u8")], check=True, timeout=60)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, name="hls-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/index.m3u8"
    finally:
        httpd.shutdown()
        httpd.server_close()


class SilentServer(str):
    """The URL of a silent_tcp_server (a str), and how many connections it has accepted."""

    connections: int


@contextmanager
def silent_tcp_server(prefix: bytes = b"", *, every_connection: bool = False) -> Iterator[SilentServer]:
    """`tcp://127.0.0.1:PORT` that accepts every connection, sends `prefix` (to the first connection only,
    unless `every_connection`), then sends nothing and keeps the connection open until the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    url = SilentServer(f"tcp://127.0.0.1:{listener.getsockname()[1]}")
    url.connections = 0
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)
            url.connections += 1
            if prefix and (every_connection or url.connections == 1):
                threading.Thread(target=send, args=(conn,), name="silent-server-send", daemon=True).start()

    def send(conn: socket.socket) -> None:
        try:
            conn.sendall(prefix)
        except OSError:
            pass

    thread = threading.Thread(target=serve, name="silent-server", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        done.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()
