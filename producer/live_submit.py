"""Submitting a live job: a camera, a broadcast, a capture device, or a file played at its own rate
(`--live`), ingested for as long as the job runs.

`submit_live` opens the source first (producer/live_source.py: timeouts, RTSP over TCP, a watchdog,
reconnects), so a source that cannot be opened is refused with nothing written. Then, as for a
streamed file, it writes each frame's JPEG into the job's frames directory and announces it on
`vseg:frames:{job_id}` (with `captured_at` and the source `pts`), keeping its liveness key alive. The
job is enqueued once frame 0 is on disk, and its id is handed to `on_enqueued` (the command line
prints it, flushed, on its own line). An outage the source came back from is noted on the frames
stream (id `N-1` after frame N-1's announcement; the worker reports it in progress events).

How it ends:
- `python -m producer stop JOB_ID` (the job's `stop` flag, looked at every second), `--duration S`,
  Ctrl-C, or the source ending for good: the end marker with the frame count; the worker publishes the
  last frames, finishes the render and completes the job;
- the source down longer than `source_outage_s` (SourceLost), or any other error: the error marker,
  and the worker fails the job with that error;
- the job cancelled or failed meanwhile: ingest stops;
- this process killed: its liveness key expires and the worker fails the job, as for a file.

The frames stream is trimmed to about `live_frames_maxlen` entries: the worker reads it by id as it
goes, and a worker falling behind skips to the newest frame anyway.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import redis

from producer import decode
from producer.announce import FrameAnnouncer
from producer.capabilities import require_worker
from producer.job_dir import frames_dir_of, make_fresh
from producer.live_buffer import IngestBuffer
from producer.live_source import (
    LiveFrame,
    LiveHeader,
    LiveOptions,
    LiveReader,
    SourceDown,
    SourceOutage,
    redacted,
)
from producer.planes import frame_payload
from producer.preview import PreviewWriter
from producer.streaming import abandon
from producer.submission import (
    Submitted,
    check_auto,
    check_text,
    enqueue_job,
    holding_submit_lock,
    job_exists,
    new_job_id,
)
from producer.zones import ZoneSet
from runtime.cleanup import job_ended
from runtime.connection import connect
from runtime.layout import ensure_layout
from runtime.limits import check_job_limits
from runtime.settings import Settings
from schemas import messages
from schemas.errors import InputError, JobFailed, PromptError
from schemas.names import EVENTS_MAXLEN, POINTS, TEXT, validate_job_id
from schemas.prompts import ObjectPrompt, validate_prompts
from schemas.storage import frame_name, job_preview_rel, resolve_inside

log = logging.getLogger(__name__)

INGESTING = ("its source was being ingested", "ingest")  # what stops when the worker closes the frames stream
FLAGS_CHECK_S = 1.0  # how often the ingest looks at the job's hash: stopped, cancelled, failed


def live_options(settings: Settings, *, realtime: bool = False) -> LiveOptions:
    return LiveOptions(open_timeout_s=settings.source_open_timeout_s, read_timeout_s=settings.source_read_timeout_s,
                       watchdog_s=settings.source_watchdog_s, source_outage_s=settings.source_outage_s,
                       rtsp_transport=settings.rtsp_transport, realtime=realtime)


def check_live_prompts(prompts: Sequence[ObjectPrompt], width: int, height: int, *, auto: bool = False) -> None:
    """A live job's prompts are on its first frame: the frames of a camera are not known in advance."""
    later = sorted({p.frame_idx for p in prompts if p.frame_idx != 0})
    if later:
        raise PromptError(f"a live job's prompts apply to its first frame, but some name frames {later}: drop the "
                          "@FRAME part, or prompt the running job later with python -m producer prompt JOB --now")
    validate_prompts(prompts, width=width, height=height, num_frames=1, allow_none=auto)


def submit_live(
    source: str | Path,
    prompts: Sequence[ObjectPrompt],
    *,
    settings: Settings,
    client: redis.Redis | None = None,
    job_id: str | None = None,
    duration_s: float | None = None,
    realtime: bool = False,
    render: bool = True,
    auto: messages.AutoOptions | None = None,
    labels: Sequence[str] = (),
    on_enqueued: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    stop_reason: Callable[[], str] | None = None,
    max_fps: float | None = None,
    zones: ZoneSet | None = None,
    camera: str = "",
    text: Sequence[str] = (),
) -> Submitted:
    """Ingest `source` as a live job until it ends (see the module doc); returns when ingest has ended.
    `realtime`: a file played at its own rate (`--live`). Raises VideoError (cannot open, no video),
    PromptError, LimitError before anything is enqueued; SourceUnavailable when the source cannot be
    opened; SourceLost once the source is gone for good after the job started (the job fails with it).
    `stop` set (from any thread, a signal handler): ingest ends as `producer stop` ends it, the end marker
    written, and the worker completes the job; `stop_reason` says why in the log. `max_fps`: frames are
    sampled at ingest to at most this rate (the others dropped at ingest: not encoded, not announced).
    `zones`: what its events are judged against (checked against the displayed frame: ZoneError); `camera`:
    the fleet camera it runs for (the job hash's `camera`, for the viewer and the events); `text`: phrases whose
    every instance is tracked (SAM 3; NoCapableWorker at once when no live worker takes text)."""
    if duration_s is not None and not 0 < duration_s < float("inf"):
        raise InputError(f"--duration must be a number of seconds > 0, but got {duration_s:g}")
    if max_fps is not None and not 0 < max_fps < float("inf"):
        raise InputError(f"fps must be a number of frames a second > 0, but got {max_fps:g}")
    client = client or connect(settings)
    keys = settings.keys
    job_id = validate_job_id(job_id) if job_id else new_job_id()
    ensure_layout(client, keys, mark=False)  # LayoutError on a Redis of the old key layout, before anything is written
    check_text(text, prompts, auto)
    require_worker(client, keys, TEXT if text else POINTS, url=settings.redis_url)
    if job_exists(client, keys, job_id):
        log.info("job %s already exists: not submitting it again", job_id)
        return Submitted(job_id, created=False)
    stop = stop or threading.Event()
    reader = LiveReader(str(source), live_options(settings, realtime=realtime), stop=stop)
    try:
        header = reader.open()  # a source that cannot be opened is refused here, nothing written
        check_job_limits(1, header.width, header.height, prompts, settings)
        check_live_prompts(prompts, header.width, header.height, auto=auto is not None or bool(text))
        check_auto(auto, labels, header.width, header.height)
        zones = (zones or ZoneSet()).check(header.width, header.height)
        lock = client.lock(keys.submit_lock(job_id), timeout=60, blocking_timeout=60)
        with holding_submit_lock(lock, job_id):  # held until the job exists; the ingest then runs without it
            if job_exists(client, keys, job_id):
                return Submitted(job_id, created=False)
            ingest = LiveIngest(client, settings, job_id, reader.source, header, prompts, render=render,
                                duration_s=duration_s, stop=stop, auto=auto, labels=tuple(labels),
                                stop_reason=stop_reason, max_fps=max_fps, text=tuple(p.strip() for p in text),
                                extra={**({"zones": zones.to_json()} if zones else {}),
                                       **({"camera": camera} if camera else {})})
        return ingest.run(reader, on_enqueued)
    finally:
        reader.close()


class LiveIngest:
    """One live job's ingest: frames to disk and announced, enqueue after the first, the end or error marker."""

    def __init__(self, client: redis.Redis, settings: Settings, job_id: str, source: str, header: LiveHeader,
                 prompts: Sequence[ObjectPrompt], *, render: bool, duration_s: float | None,
                 stop: threading.Event, auto: messages.AutoOptions | None = None, labels: tuple[str, ...] = (),
                 stop_reason: Callable[[], str] | None = None, max_fps: float | None = None,
                 extra: Mapping[str, str] | None = None, text: tuple[str, ...] = ()) -> None:
        self.client = client
        self.settings = settings
        self.job_id = job_id
        self.header = header
        self.duration_s = duration_s
        self.stop = stop
        self.frames_rel, self.frames_dir = frames_dir_of(settings, job_id)
        self.announcer = FrameAnnouncer(client, settings, job_id, maxlen=settings.live_frames_maxlen)
        self.stream = self.announcer.stream
        self.job = messages.JobMessage(
            job_id=job_id, frames_dir=self.frames_rel, num_frames=1, width=header.width, height=header.height,
            fps=min(header.fps, max_fps or header.fps), prompts=tuple(prompts), source=redacted(source), frames_stream=self.stream,
            producer_ttl_s=settings.producer_ttl_s, render=render, live=True, auto=auto, labels=labels,
            text=text)
        self.announced = 0
        self.enqueued = False
        self.tried_enqueue = False
        self.started_at: float | None = None
        self.checked_at = 0.0
        self.ended_why = ""
        self.stop_reason = stop_reason or (lambda: "stopped")
        self.buffer = IngestBuffer(lambda k: self.frames_dir / frame_name(k), limit=settings.live_buffer_frames,
                                   idle_refresh_s=settings.max_latency_s, min_spacing_s=1 / max_fps if max_fps else 0.0)
        self._down_note_id = ""
        self.extra = dict(extra or {})
        self.preview: PreviewWriter | None = None
        if settings.live_preview_height:
            self.extra["preview"] = job_preview_rel(job_id)

    def run(self, reader: LiveReader, on_enqueued: Callable[[str], None] | None) -> Submitted:
        make_fresh(self.settings, self.frames_dir)
        self.frames_dir.mkdir()
        if "preview" in self.extra:
            self.preview = PreviewWriter(
                resolve_inside(self.settings.storage_root, self.extra["preview"]).parent, width=self.header.width,
                height=self.header.height, orientation=self.header.orientation,
                max_height=self.settings.live_preview_height, segment_s=self.settings.live_segment_s,
                window=self.settings.live_playlist_size, fps=self.job.fps)
        try:
            with self.announcer.running():
                try:
                    self._ingest(reader, on_enqueued)
                except KeyboardInterrupt:  # Ctrl-C on a live job: stop it, as `producer stop` does
                    if not self.enqueued:
                        raise
                    self.ended_why = "interrupted (Ctrl-C): stopping the job"
                    log.warning("job %s: %s", self.job_id, self.ended_why)
                self._finish()
        except BaseException as e:
            if self.preview is not None and not self.enqueued:  # nothing of a job never enqueued is left
                shutil.rmtree(self.preview.folder, ignore_errors=True)
            abandon(self.client, self.settings, self.job_id, self.frames_dir, e, maybe_enqueued=self.tried_enqueue)
            raise
        return Submitted(self.job_id, created=self.enqueued)

    def _ingest(self, reader: LiveReader, on_enqueued: Callable[[str], None] | None) -> None:
        for item in reader:
            if isinstance(item, SourceDown):
                self._note_down(item)
                if self._should_end():
                    return
                continue
            if isinstance(item, SourceOutage):
                self._note_outage(item)
                continue
            if self.preview is not None:  # every captured frame, those dropped at ingest too
                self.preview.write(item.frame, item.captured_at)
            if not self.buffer.admit(item.captured_at, time.time()).write:  # dropped at ingest: not encoded
                if self._should_end():
                    return
                continue
            self._write(item)
            if not self.enqueued:
                self.tried_enqueue = True
                self.enqueued = enqueue_job(self.client, self.settings.keys, self.job, self.extra)
                self.client.hset(self.settings.keys.job(self.job_id), mapping={"live": 1, "source_state": "up"})
                log.info("live job %s enqueued (%dx%d at %.2f fps from %s)", self.job_id, self.job.width,
                         self.job.height, self.job.fps, self.job.source)
                if on_enqueued is not None:
                    on_enqueued(self.job_id)
            if self._should_end():
                return
        self.ended_why = self.ended_why or (self.stop_reason() if self.stop.is_set() else "the source ended")

    def _write(self, item: LiveFrame) -> None:
        k = self.announced
        payload, _height, _width = frame_payload(item.frame, self.header.orientation)
        decode.write_jpeg(self.frames_dir / frame_name(k), payload, self.settings.jpeg_quality, True)
        fields: dict[str, str | int] = {"at": f"{time.time():.6f}", "captured_at": f"{item.captured_at:.6f}",
                                        "dropped_at_ingest": self.buffer.dropped}
        if item.pts_s is not None:
            fields["pts"] = f"{item.pts_s:.6f}"
        self._patiently(lambda: self.announcer.announce({k: fields}, INGESTING), f"frame {k}'s announcement")
        self.announced = k + 1
        self.buffer.added(k, item.captured_at)
        if self.started_at is None:
            self.started_at = time.monotonic()

    def _patiently(self, call: Callable[[], object], what: str) -> None:
        """A Redis write that waits out a Redis outage (up to source_outage_s: a live job runs for days and a
        Redis restart must not end it; the worker holding the job waits for Redis too)."""
        deadline = time.monotonic() + self.settings.source_outage_s
        while True:
            try:
                call()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > deadline or self.stop.is_set():
                    raise
                log.warning("job %s: Redis unavailable for %s (%s); retrying", self.job_id, what, e)
                time.sleep(0.5)

    def _note_down(self, down: SourceDown) -> None:
        """An outage began: said at once in the job hash (`source_state` down, `source_down_since`, the outage
        counted), on the frames stream (the worker's progress events say it too) and as a progress event on
        vseg:events, not only once the source is back."""
        if not self.enqueued:
            return
        keys = self.settings.keys
        job_key = keys.job(self.job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(job_key, mapping={"source_state": "down", "source_down_since": f"{down.began_at:.3f}"})
        pipe.hincrby(job_key, "source_outages", 1)
        pipe.hget(job_key, "frames_done")
        pipe.hget(job_key, "source_down_s")
        _, outages, frames_done, down_s = pipe.execute()
        self._down_note_id = f"{self.announced}-1"  # between frame N-1's announcement and frame N's
        self.client.xadd(self.stream, {"down_since": f"{down.began_at:.3f}", "reason": down.reason[:200]},
                         id=self._down_note_id)
        self._event(int(frames_done or 0), outages=int(outages), down_s=float(down_s or 0), down_since=down.began_at)
        log.warning("job %s: the source went down (%s); reconnecting for up to %g s", self.job_id, down.reason,
                    self.settings.source_outage_s)

    def _note_outage(self, outage: SourceOutage) -> None:
        log.warning("job %s: the source was down for %.1f s (%s) and is back after %d attempts", self.job_id,
                    outage.duration_s, outage.reason, outage.attempts)
        if not self.enqueued:
            return
        job_key = self.settings.keys.job(self.job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(job_key, "source_state", "up")
        pipe.hdel(job_key, "source_down_since")
        pipe.hincrbyfloat(job_key, "source_down_s", round(outage.duration_s, 3))
        pipe.hget(job_key, "source_outages")
        pipe.hget(job_key, "frames_done")
        _, _, down_s, outages, frames_done = pipe.execute()
        # the note after the down note (N-1), or between frame N-1's announcement (N-0) and frame N's
        note_id = f"{self.announced}-2" if self._down_note_id == f"{self.announced}-1" else f"{self.announced}-1"
        if self.announced:
            self.client.xadd(self.stream, {"outage_s": f"{outage.duration_s:.3f}", "reason": outage.reason[:200]},
                             id=note_id)
        self._event(int(frames_done or 0), outages=int(outages or 0), down_s=float(down_s), down_since=None)

    def _event(self, frames_done: int, *, outages: int, down_s: float, down_since: float | None) -> None:
        """A progress event on vseg:events as the source goes down or comes back (the worker's own progress
        events come only with processed frames, and none come while the source is down)."""
        msg = messages.Progress(self.job_id, frames_done, self.announced, source_outages=outages,
                                source_down_s=round(down_s, 3), source_state="down" if down_since else "up",
                                source_down_since=down_since)
        self.client.xadd(self.settings.keys.events, cast(Any, messages.encode(msg)), maxlen=EVENTS_MAXLEN,
                         approximate=True)

    def _should_end(self) -> bool:
        """Whether ingest stops now: --duration reached, the job's stop flag, or the job ended (raises)."""
        now = time.monotonic()
        if self.duration_s is not None and self.started_at is not None and now - self.started_at >= self.duration_s:
            self.ended_why = f"--duration {self.duration_s:g} s reached"
            return True
        if self.stop.is_set():
            self.ended_why = self.ended_why or self.stop_reason()
            return True
        if now - self.checked_at < FLAGS_CHECK_S:
            return False
        self.checked_at = now
        job_key = self.settings.keys.job(self.job_id)
        if self.buffer.dropped:
            self.client.hset(job_key, "dropped_at_ingest", self.buffer.dropped)
        state, stop, error = cast(list[bytes | None], self.client.hmget(job_key, ["state", "stop", "error"]))
        if job_ended(self.client, self.settings, self.job_id):
            raise JobFailed(self.job_id, f"it ended {(state or b'expired').decode()} while its source was being "
                                         f"ingested, so ingest stopped ({(error or b'no error recorded').decode()})")
        if stop == b"1":
            self.ended_why = "python -m producer stop"
            return True
        return False

    def _finish(self) -> None:
        """The end marker (the frame count, and the frames dropped at ingest), then the frames go if the
        worker finished first (producer/announce.py)."""
        self.announcer.end(self.announced, dropped_at_ingest=self.buffer.dropped)
        if self.preview is not None:
            self.preview.close()
        log.info("live job %s: ingest ended after %d frames announced, %d dropped at ingest (%s)", self.job_id,
                 self.announced, self.buffer.dropped, self.ended_why)
