"""The live-source reader against real live sources: ffmpeg serving MPEG-TS over TCP and HTTP, a real RTSP
server, an HLS playlist, a server that goes silent, servers killed and restarted mid-read.

Time limits are loose on purpose (machines are noisy): a check says "within about", never "exactly"."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import av
import pytest

from producer.live_source import (
    LiveFrame,
    LiveOptions,
    LiveReader,
    SourceDown,
    SourceLost,
    SourceOutage,
    SourceRefused,
    check_source,
    is_live_source,
    redacted,
)
from schemas.errors import ConfigError, InputError, SourceUnavailable, VideoError
from tests import live_servers
from tests.live_servers import free_port, missing_tools, mpegts_bytes, silent_tcp_server, ts_over_tcp
from tests.videos import make_audio_only, make_video

pytestmark = pytest.mark.timeout(60)

NO_FFMPEG = missing_tools("ffmpeg")
NO_RTSP = NO_FFMPEG or missing_tools("rtsp")
needs_ffmpeg = pytest.mark.skipif(NO_FFMPEG is not None, reason=NO_FFMPEG or "")
needs_rtsp = pytest.mark.skipif(NO_RTSP is not None, reason=NO_RTSP or "")
FAST = LiveOptions(open_timeout_s=5.0, read_timeout_s=3.0, watchdog_s=3.0, reconnect_min_s=0.1,
                   reconnect_max_s=0.4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s of 160x120 at 30 fps (the servers loop it)."""
    return make_video(tmp_path_factory.mktemp("live") / "clip.mp4", num_frames=60, fps=30)


def frames_of(reader: LiveReader, count: int) -> Iterator[LiveFrame | SourceOutage]:
    """The reader's items until `count` frames have come (outages included)."""
    seen = 0
    for item in reader:
        yield item
        if isinstance(item, LiveFrame):
            seen += 1
            if seen >= count:
                return


# ---- naming ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "live"), [
    ("rtsp://cam.local:554/stream1", True),
    ("RTSP://cam/stream", True),
    ("rtsps://cam/stream", True),
    ("rtmp://server/app/key", True),
    ("http://example.com/live.m3u8", True),
    ("https://example.com/cam.ts", True),
    ("tcp://127.0.0.1:5000", True),
    ("udp://@239.0.0.1:1234", True),
    ("srt://host:9000?mode=caller", True),
    ("/dev/video0", True),
    ("/dev/video12", True),
    ("/dev/video", False),
    ("/dev/videos/clip.mp4", False),
    ("videos/clip.mp4", False),
    ("/abs/path/rtsp.mp4", False),
    ("file:///tmp/clip.mp4", False),
    ("ftp://host/clip.mp4", False),
])
def test_is_live_source(source: str, live: bool) -> None:
    assert is_live_source(source) is live


@pytest.mark.parametrize(("source", "shown"), [
    ("rtsp://admin:s3cret@10.0.0.5:554/h264", "rtsp://***@10.0.0.5:554/h264"),
    ("rtsp://admin@cam/stream", "rtsp://***@cam/stream"),
    ("rtsp://user:p@ss@cam/stream", "rtsp://***@cam/stream"),  # an unescaped @ in the password
    ("https://cdn/live.m3u8?token=abc123&quality=hd", "https://cdn/live.m3u8?token=***&quality=hd"),
    ("http://cam/video.cgi?user=bob&password=hunter2", "http://cam/video.cgi?user=bob&password=***"),
    ("https://api/s.m3u8?api_key=k1&X-Amz-Signature=f00", "https://api/s.m3u8?api_key=***&X-Amz-Signature=***"),
    ("rtsp://cam.local/stream?channel=1", "rtsp://cam.local/stream?channel=1"),
    ("/dev/video0", "/dev/video0"),
    ("videos/user:pw@clip.mp4", "videos/user:pw@clip.mp4"),  # a path, not a URL
])
def test_redacted(source: str, shown: str) -> None:
    assert redacted(source) == shown


@pytest.mark.parametrize("bad", [
    dict(open_timeout_s=0), dict(watchdog_s=-1), dict(reconnect_min_s=2, reconnect_max_s=1),
    dict(rtsp_transport="quic"),
])
def test_options_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LiveOptions(**bad)  # type: ignore[arg-type]


# ---- what cannot be opened -------------------------------------------------------------------------------

def test_missing_capture_device() -> None:
    with pytest.raises(VideoError, match=r"capture device /dev/video99 not found"):
        LiveReader("/dev/video99").open()


def test_unreachable_url_is_redacted() -> None:
    url = f"rtsp://admin:s3cret@127.0.0.1:{free_port()}/cam"
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as raised:  # the operator's to fix: `submit` exits 3, not 2
        LiveReader(url, LiveOptions(open_timeout_s=1.0, reconnect_min_s=0.1)).open()
    message = str(raised.value)
    assert "s3cret" not in message and "admin" not in message
    assert "rtsp://***@127.0.0.1" in message and "connection refused" in message and "within 1 s" in message
    assert time.monotonic() - started < 5


def test_missing_file_and_no_video_stream(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video file not found"):
        LiveReader(str(tmp_path / "nope.mp4")).open()
    with pytest.raises(VideoError, match="no video stream"):
        LiveReader(str(make_audio_only(tmp_path / "audio.m4a"))).open()


# ---- reading ---------------------------------------------------------------------------------------------

SERVERS = [
    pytest.param("ts_over_tcp", marks=needs_ffmpeg, id="tcp"),
    pytest.param("ts_over_http", marks=needs_ffmpeg, id="http"),
    pytest.param("rtsp_source", marks=needs_rtsp, id="rtsp"),
]


@pytest.mark.parametrize("server", SERVERS)
def test_reads_frames(server: str, clip: Path) -> None:
    with getattr(live_servers, server)(clip) as url, LiveReader(url, FAST) as reader:
        header = reader.open()
        assert (header.width, header.height, header.fps) == (160, 120, 30.0) and header.orientation.upright
        items = list(frames_of(reader, 30))
    assert all(isinstance(item, LiveFrame) for item in items) and len(items) == 30
    frames = [item for item in items if isinstance(item, LiveFrame)]
    assert {(f.frame.width, f.frame.height) for f in frames} == {(160, 120)}
    assert all(b.captured_at >= a.captured_at for a, b in zip(frames, frames[1:]))
    stamped = [f.pts_s for f in frames if f.pts_s is not None]
    assert len(stamped) >= 29  # FFmpeg's RTSP gives the first frame none, before the RTCP sender report
    assert stamped == sorted(stamped) and 0.5 < stamped[-1] - stamped[0] < 2.0  # 28 or 29 frames of 1/30 s
    assert reader.stats.frames == 30 and reader.stats.outages == 0


@pytest.mark.parametrize("server", [SERVERS[0], SERVERS[2]])
def test_killed_and_restarted_source(server: str, clip: Path) -> None:
    options = replace(FAST, source_outage_s=20.0)
    outage: SourceOutage | None = None
    frames_before = frames_after = 0
    down: list[SourceDown] = []
    with getattr(live_servers, server)(clip) as source, LiveReader(source, options) as reader:
        for item in reader:
            if isinstance(item, SourceDown):  # said when the outage begins, before any reconnect
                assert not down and outage is None and reader.stats.reconnects == 0
                down.append(item)
            elif isinstance(item, SourceOutage):
                assert outage is None and down, "one outage only, and its start said first"
                outage = item
            elif outage is None:
                frames_before += 1
                if frames_before == 10:
                    source.kill()
                    threading.Timer(0.8, source.restart).start()
            else:
                frames_after += 1
                if frames_after == 10:
                    break
    assert outage is not None and frames_before >= 10 and frames_after == 10  # the same iterator went on
    assert reader.stats.outages == 1 and reader.stats.reconnects >= 1 and reader.stats.frames >= 20
    assert outage.attempts >= 1 and outage.reason and outage.duration_s >= 0.5
    assert outage.began_at <= time.time() - outage.duration_s + 1
    assert down[0].began_at == outage.began_at and down[0].reason


@needs_ffmpeg
def test_reconnect_attempts_go_on_up_to_and_including_the_deadline(clip: Path) -> None:
    """Backoff 0.5 s doubling to 4 s with source_outage_s 10: attempts at about +0.5, 1.5, 3.5, 7.5; the next
    would be at 11.5, past the deadline, so one more is made at the deadline (+10). The source comes back
    after the fourth attempt failed (a condition, not a time): only that last attempt can find it."""
    options = replace(FAST, reconnect_min_s=0.5, reconnect_max_s=4.0, source_outage_s=10.0)
    items: list[object] = []
    errors: list[BaseException] = []
    with ts_over_tcp(clip) as source, LiveReader(source, options) as reader:
        def read() -> None:
            try:
                for item in reader:
                    items.append(item)
                    if isinstance(item, SourceOutage) or len(items) > 2000:
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                errors.append(e)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        wait_until(lambda: len(items) >= 10, "frames before the kill")
        source.kill()
        wait_until(lambda: reader.stats.reconnects_failed >= 4 or bool(errors), "four failed attempts", 20)
        assert not errors and reader.stats.reconnects == 4, (errors, reader.stats)
        source.start()  # back before the deadline attempt, after every regular one
        thread.join(30)
    assert not errors, errors
    outage = next(item for item in items if isinstance(item, SourceOutage))
    assert outage.attempts == 5 and reader.stats.reconnects == 5 and outage.duration_s < options.source_outage_s + 6


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_schemes_are_case_insensitive_and_an_unsupported_one_is_refused_in_one_line() -> None:
    assert check_source("RTSP://user:pw@cam.local/stream") == "rtsp://user:pw@cam.local/stream"
    assert is_live_source("Rtsp://cam.local/stream") and check_source("clip.mp4") == "clip.mp4"
    assert LiveReader("HTTP://127.0.0.1:9/live.ts").source == "http://127.0.0.1:9/live.ts"
    with pytest.raises(InputError) as raised:
        check_source("ftp://user:secret@host/video.mp4")
    message = str(raised.value)
    assert "ftp:// is not a source this service reads" in message and "rtsp://" in message and "srt://" in message
    assert "secret" not in message and "\n" not in message


@pytest.mark.parametrize("status", [404, 401, 403])
def test_a_permanent_http_error_is_refused_at_once(status: int) -> None:
    """Retrying cannot help: one attempt, SourceRefused (a fleet daemon still retries with its own backoff)."""
    import http.server

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_error(status)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reader = LiveReader(f"http://user:pw@127.0.0.1:{server.server_address[1]}/cam.ts",
                            LiveOptions(open_timeout_s=30.0, reconnect_min_s=0.2))
        with pytest.raises(SourceRefused) as raised:
            reader.open()
    finally:
        server.shutdown()
    assert reader._connections == 1  # noqa: SLF001 - not retried
    assert "retrying cannot help" in str(raised.value) and "pw" not in str(raised.value)


@needs_ffmpeg
def test_source_that_never_comes_back(clip: Path) -> None:
    options = replace(FAST, source_outage_s=1.5)
    with ts_over_tcp(clip) as source, LiveReader(source, options) as reader:
        items = frames_of(reader, 1000)
        for _ in range(10):
            next(items)
        source.kill()
        killed = time.monotonic()
        with pytest.raises(SourceLost) as lost:
            for _ in items:
                pass
    took = time.monotonic() - killed
    assert 1.0 < took < 6.0
    message = str(lost.value)
    assert source.url in message and "lost" in message and "connection refused" in message
    assert lost.value.attempts >= 1 and "\n" not in message


def set_later(event: threading.Event, delay_s: float) -> dict[str, float]:
    """Set `event` in `delay_s` from a timer thread; the dict gets "at": when (monotonic)."""
    when: dict[str, float] = {}

    def fire() -> None:
        when["at"] = time.monotonic()
        event.set()

    threading.Timer(delay_s, fire).start()
    return when


@needs_ffmpeg
def test_stop_during_backoff_returns_promptly(clip: Path) -> None:
    stop = threading.Event()
    options = replace(FAST, reconnect_min_s=30.0, reconnect_max_s=30.0)
    with ts_over_tcp(clip) as source, LiveReader(source, options, stop=stop) as reader:
        items = frames_of(reader, 1000)
        for _ in range(5):
            next(items)
        source.kill()
        stopped = set_later(stop, 1.0)
        rest = list(items)  # returns: frames decoded before the kill, the outage's start, then nothing
        returned = time.monotonic()
    assert [type(item) for item in rest if not isinstance(item, LiveFrame)] == [SourceDown]
    assert reader.stats.outages == 1 and reader.stats.reconnects == 0  # it was waiting out the backoff
    assert returned - stopped["at"] < 1.0


def test_stop_while_connecting_returns_promptly() -> None:
    stop = threading.Event()
    with silent_tcp_server() as url:  # accepts, then never sends: the open hangs
        reader = LiveReader(url, LiveOptions(open_timeout_s=30.0), stop=stop)
        stopped = set_later(stop, 0.5)
        assert list(reader) == []
        returned = time.monotonic()
    assert returned - stopped["at"] < 1.0


# ---- stalls ----------------------------------------------------------------------------------------------

@needs_ffmpeg
def test_watchdog_catches_a_silent_source(clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Frames, then the connection stays open and silent; the read timeout is far off (30 s), so only
    the watchdog can see it. It does within about watchdog_s, reconnects (to a server that now sends
    nothing at all), and gives the source up after source_outage_s."""
    options = LiveOptions(open_timeout_s=1.0, read_timeout_s=30.0, watchdog_s=1.0, reconnect_min_s=0.2,
                          reconnect_max_s=0.4, source_outage_s=3.0)
    caplog.set_level(logging.INFO, logger="producer.live_source")
    with silent_tcp_server(mpegts_bytes(clip)) as url, LiveReader(url, options) as reader:
        frames: list[LiveFrame] = []
        downs: list[SourceDown] = []
        with pytest.raises(SourceLost) as lost:
            for item in reader:
                if isinstance(item, SourceDown):
                    downs.append(item)
                    continue
                assert isinstance(item, LiveFrame) and not downs
                frames.append(item)
        assert url.connections >= 2  # reconnect attempted
        assert len(downs) == 1 and "(watchdog)" in downs[0].reason
    assert len(frames) > 30 and reader.stats.stalls >= 1
    stalled = [r for r in caplog.records if "(watchdog)" in r.getMessage()]
    assert stalled, caplog.text
    assert 0.8 < stalled[0].created - frames[-1].captured_at < options.watchdog_s + 2.0
    assert url in str(lost.value) and 2.5 < lost.value.duration_s < 10


@needs_ffmpeg
def test_pyav_read_timeout_still_applies_after_the_open(clip: Path) -> None:
    """PyAV issue 584: the read timeout must still apply after the open. In PyAV 18 it does: demux()
    re-arms the interrupt callback's timer before each read, so a silent read fails (ExitError) even
    without FFmpeg's own socket timeouts (which the reader sets as well)."""
    with silent_tcp_server(mpegts_bytes(clip)) as url, av.open(url, timeout=(2.0, 1.0)) as container:
        started = time.monotonic()
        with pytest.raises(av.error.ExitError):
            for _ in container.decode(video=0):
                pass
        assert time.monotonic() - started < 10


@needs_ffmpeg
def test_read_timeout_ends_a_silent_read(clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A connected but silent source fails the read after read_timeout_s with the watchdog far off."""
    options = LiveOptions(open_timeout_s=1.0, read_timeout_s=1.0, watchdog_s=30.0, reconnect_min_s=0.2,
                          reconnect_max_s=0.4, source_outage_s=2.5)
    caplog.set_level(logging.INFO, logger="producer.live_source")
    with silent_tcp_server(mpegts_bytes(clip)) as url, LiveReader(url, options) as reader:
        with pytest.raises(SourceLost):
            for _ in reader:
                pass
    assert reader.stats.stalls == 0
    # PyAV's read timer or FFmpeg's socket timeout, whichever looks first
    assert any("no data for 1 s (read timeout)" in r.getMessage() or "timed out" in r.getMessage()
               for r in caplog.records), caplog.text


# ---- the end for good ------------------------------------------------------------------------------------

def test_realtime_file_is_paced_by_its_timestamps(tmp_path: Path) -> None:
    video = make_video(tmp_path / "one_second.mp4", num_frames=30, fps=30)
    paced = [i for i in LiveReader(str(video), LiveOptions(realtime=True)) if isinstance(i, LiveFrame)]
    fast = [i for i in LiveReader(str(video)) if isinstance(i, LiveFrame)]
    assert len(paced) == len(fast) == 30  # the file's end ends the iteration
    spread = paced[-1].captured_at - paced[0].captured_at
    assert 0.7 < spread < 5.0  # 29 frame intervals of 1/30 s: about 0.97 s
    assert fast[-1].captured_at - fast[0].captured_at < spread


@needs_ffmpeg
def test_hls_playlist_end_ends_the_iteration(clip: Path, tmp_path: Path) -> None:
    with live_servers.hls_playlist(clip, tmp_path / "hls") as url:
        reader = LiveReader(url, FAST)
        items = list(reader)
    assert len(items) == 60 and all(isinstance(i, LiveFrame) for i in items)
    assert reader.stats.outages == 0
