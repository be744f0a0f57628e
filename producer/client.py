"""The client a backend writes against: `Client` (and `AsyncClient`, its asyncio twin with the same names,
producer/async_client.py), with a `Job` handle per job.

    from producer import Client, Prompt

    client = Client.from_url("redis://localhost:6379/0")         # or Client() for the settings of this machine
    job = client.submit("match.mp4", prompts=[Prompt.point(1, 320, 240)])  # returns once the job is enqueued
    for item in job.follow():                                   # Frame, Update, ObjectChange, Started, terminal
        ...

`submit` returns as soon as the job is on the jobs stream: a file is decoded in a background thread (a
non-daemon thread, so a script that ends after submitting still hands over every frame), a live source
ingested in one until it ends, `Job.stop()` or `Client.close()`. Errors before the enqueue raise from
`submit`; errors after it reach the job's results, as for the command line (the worker fails the job), and
`Job.submit_result()` re-raises them.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import redis

from producer import control, running_prompts
from producer.client_items import (
    BEFORE_TERMINAL,
    Item,
    JobStatus,
    Terminal,
    item_of,
    status_fields,
)
from producer.events import Events
from producer.prompts import build_prompts, merge_prompts
from producer.results import entries
from producer.source_urls import is_live_source
from producer.submission import Submitted
from producer.zones import Line, Zone, build, parse_line, parse_zone
from runtime.connection import connect
from runtime.faults import redact_url, redis_fault
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError, UnknownJobError
from schemas.names import validate_job_id
from schemas.prompts import ObjectPrompt

log = logging.getLogger(__name__)

APPEAR_S = 30.0  # how long follow/wait wait for a job id nobody has enqueued yet, by default
XREAD_COUNT = 256  # entries per read, at most


def prompts_of(prompts: Sequence[ObjectPrompt], points: Sequence[str], boxes: Sequence[str]) -> list[ObjectPrompt]:
    """`prompts` plus the command line's `--point`/`--box` specs ("1:320,240", "2:0,0,50,60@5"), grouped per
    object and frame. Raises PromptError naming the bad spec."""
    return merge_prompts([*prompts, *build_prompts(points=list(points), boxes=list(boxes))])


@contextlib.contextmanager
def redis_faults(settings: Settings) -> Iterator[None]:
    """Redis down, hung or full, raised as one line of the service's exception tree that names the URL (its
    password hidden) and what to do: RedisUnavailable, RedisFull (chained from redis-py's error)."""
    try:
        yield
    except redis.RedisError as e:
        fault = redis_fault(e, settings.redis_url)
        if fault is None:
            raise
        raise fault from e


class BackgroundSubmit:
    """A submit run in its own thread: the caller waits until the job is enqueued (or the submit failed
    before that), the thread goes on decoding or ingesting."""

    def __init__(self, run: Callable[[Callable[[str], None]], Submitted], *, live: bool, name: str) -> None:
        self.live = live
        self.enqueued = threading.Event()
        self.finished = threading.Event()
        self.result: Submitted | None = None
        self.error: BaseException | None = None
        self.job_id = ""
        self._run = run
        self.thread = threading.Thread(target=self._main, name=name, daemon=live)

    def _on_enqueued(self, job_id: str) -> None:
        self.job_id = job_id
        self.enqueued.set()

    def _main(self) -> None:
        try:
            self.result = self._run(self._on_enqueued)
        except BaseException as e:  # handed to the caller (before the enqueue) or to submit_result (after)
            self.error = e
            if self.enqueued.is_set():
                log.warning("job %s: %s after the job was enqueued: %s (the job fails with it)", self.job_id,
                            "ingest failed" if self.live else "decoding failed", e)
        finally:
            self.finished.set()

    def start_and_wait(self) -> str:
        """Start, and return the job id once enqueued; raise the submit's error if it failed before."""
        self.thread.start()
        while not self.enqueued.wait(0.05):
            if self.finished.is_set():
                break
        if self.enqueued.is_set():
            return self.job_id
        if self.error is not None:
            raise self.error
        assert self.result is not None  # finished without an enqueue: the job id existed already
        return self.result.job_id

    def wait(self, timeout_s: float | None) -> Submitted:
        if not self.finished.wait(timeout_s):
            raise TimeoutError(f"the submit of job {self.job_id} is still running after {timeout_s:g} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Client:
    """One Redis connection and the service's settings; thread-safe (redis-py's pool)."""

    def __init__(self, settings: Settings | None = None, *, redis_url: str | None = None,
                 redis_client: redis.Redis | None = None) -> None:
        """`settings`: default `Settings.load()` (configs/service.yaml, then VSEG_* and REDIS_URL from the
        environment); `redis_url` overrides its Redis. `redis_client`: a redis-py client to use instead of a new one."""
        if settings is None:
            settings = Settings.load(redis_url=redis_url)
        elif redis_url is not None:
            settings = dataclasses.replace(settings, redis_url=redis_url)
        self.settings: Settings = settings
        self.redis: redis.Redis = redis_client or connect(self.settings)
        self._submits: list[BackgroundSubmit] = []
        self._closed = False

    @classmethod
    def from_url(cls, redis_url: str, **settings: Any) -> Client:
        """A client for the Redis at `redis_url`; other settings by name (`key_prefix="vseg"`, `storage_root=...`),
        the rest from configs/service.yaml and the environment."""
        return cls(Settings.load(redis_url=redis_url, **settings))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, video: str | Path, prompts: Sequence[ObjectPrompt] = (), *, points: Sequence[str] = (),
               boxes: Sequence[str] = (), job_id: str | None = None, live: bool | None = None, render: bool = True,
               auto: messages.AutoOptions | None = None, labels: Sequence[str] = (), resume: bool = True,
               max_frames: int | None = None, stride: int = 1, start_s: float | None = None,
               end_s: float | None = None, duration_s: float | None = None, realtime: bool = False,
               max_fps: float | None = None, zones: Sequence[str | Zone] = (),
               lines: Sequence[str | Line] = (), text: str | Sequence[str] = ()) -> Job:
        """Enqueue a job and return its handle as soon as it is enqueued.

        `video`: a file (decoded in the background), or a live source (a URL such as rtsp://..., or
        /dev/videoN; `live=True` plays a file as one, at its own rate). `prompts` (`Prompt.point`,
        `Prompt.box`) and/or the command line's `points`/`boxes` specs. `zones` and `lines`: what the events
        (`python -m producer alerts`) are judged against, as `Zone`/`Line` or the command line's specs
        ("door:0,0,200,0,200,300", "gate:0,400,640,400"). `text`: phrases whose every instance is tracked,
        "player, ball" or ["player", "ball"] (a SAM 3 worker takes the job; NoCapableWorker when none is live).
        The other options are `submit`'s on
        the command line (`python -m producer submit --help`). The same `job_id` twice gives one job.
        Raises before anything is enqueued, with nothing left behind: VideoError, PromptError, LimitError,
        JobIdError, SourceUnavailable (a live source that cannot be opened), RedisUnavailable, RedisFull."""
        if self._closed:
            raise RuntimeError("this client is closed")
        all_prompts = prompts_of(prompts, points, boxes)
        phrases = tuple(p.strip() for p in (text.split(",") if isinstance(text, str) else text))
        zone_set = build([z if isinstance(z, Zone) else parse_zone(z) for z in zones],
                         [ln if isinstance(ln, Line) else parse_line(ln) for ln in lines])
        source = str(video)
        is_live = live if live is not None else is_live_source(source)
        settings, client = self.settings, self.redis
        if is_live:
            from producer.live_submit import submit_live

            def run(on_enqueued: Callable[[str], None]) -> Submitted:
                return submit_live(source, all_prompts, settings=settings, client=client, job_id=job_id,
                                   duration_s=duration_s, realtime=realtime or (live is True and Path(source).exists()),
                                   render=render, auto=auto, labels=labels, on_enqueued=on_enqueued, max_fps=max_fps,
                                   zones=zone_set, text=phrases)
        else:
            from producer.submission import submit

            def run(on_enqueued: Callable[[str], None]) -> Submitted:
                return submit(Path(source), all_prompts, settings=settings, client=client, job_id=job_id,
                              max_frames=max_frames, stride=stride, start_s=start_s, end_s=end_s, render=render,
                              resume=resume, auto=auto, labels=labels, on_enqueued=on_enqueued, zones=zone_set,
                              text=phrases)
        background = BackgroundSubmit(run, live=is_live, name=f"submit-{job_id or 'new'}")
        if is_live and not any(s.live for s in self._submits):
            atexit.register(self.close)  # ends live ingests gracefully at exit (daemon threads are not joined)
        self._submits.append(background)
        with redis_faults(self.settings):
            return Job(self, background.start_and_wait(), background)

    def job(self, job_id: str) -> Job:
        """The handle of an existing job (follow and wait wait for it to appear)."""
        return Job(self, validate_job_id(job_id))

    def events(self, group: str, consumer: str, *, start: str = "$", claim_idle_s: float = 60.0) -> Events:
        """Every job's lifecycle on vseg:events through consumer group `group` (created if missing, reading from
        `start`: "$" the events after now, "0" all kept); see producer/events.py."""
        return Events(self.redis, self.settings, group, consumer, start=start, claim_idle_s=claim_idle_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop live ingests this client runs (each job then completes, as with `Job.stop()`) and wait for
        background decodes to hand over their last frame."""
        self._closed = True
        for background in self._submits:
            if background.live and background.job_id and not background.finished.is_set():
                try:
                    control.request_stop(background.job_id, settings=self.settings, client=self.redis)
                except Exception as e:  # noqa: BLE001 - closing: say it, go on with the others
                    log.warning("job %s: could not stop its ingest (%s)", background.job_id, e)
        for background in self._submits:
            background.finished.wait(timeout_s)


class Job:
    """A handle on one job. Cheap: it holds an id and its client; every method asks Redis."""

    def __init__(self, client: Client, job_id: str, background: BackgroundSubmit | None = None) -> None:
        self.client = client
        self.id = job_id
        self._background = background

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def _settings(self) -> Settings:
        return self.client.settings

    def follow(self, *, timeout_s: float | None = None, appear_s: float = APPEAR_S) -> Iterator[Item]:
        """Yield the job's results from its start, in stream order (producer/client_items.py): `Started`,
        then `Frame`s, with `ObjectChange`s and `Update`s in their places, then the terminal entry (`Completed`,
        `Failed`, `Cancelled` or `Dead`), and stop. Blocks while the job runs; waits out a Redis outage.
        Raises UnknownJobError if the job has not appeared within `appear_s`, TimeoutError after `timeout_s`
        without a new entry."""
        self._appear(appear_s)
        for entry_id, msg in entries(self.id, settings=self._settings, client=self.client.redis, timeout_s=timeout_s,
                                     count=XREAD_COUNT):
            item = item_of(msg, entry_id)
            if item is not None:
                yield item

    def wait(self, timeout_s: float | None = None, *, appear_s: float = APPEAR_S) -> Terminal:
        """Wait for the job to end and return its terminal entry (`Completed`, `Failed`, `Cancelled`, `Dead`):
        an ended job is not an error here. Raises TimeoutError after `timeout_s`, UnknownJobError as `follow`."""
        self._appear(appear_s)
        try:  # only the terminal entry comes after BEFORE_TERMINAL
            _entry_id, msg = next(entries(self.id, settings=self._settings, client=self.client.redis,
                                          timeout_s=timeout_s, after=BEFORE_TERMINAL))
        except TimeoutError:
            raise TimeoutError(f"job {self.id} has not ended within {timeout_s:g} s ({self.status().state})") from None
        return cast(Terminal, msg)

    def status(self) -> JobStatus:
        """The job's state hash, typed. Raises UnknownJobError (never submitted, or expired)."""
        with redis_faults(self._settings):
            raw = cast(dict[bytes, bytes], self.client.redis.hgetall(self._settings.keys.job(self.id)))
        if not raw:
            raise UnknownJobError(f"no job {self.id!r} in Redis at {redact_url(self._settings.redis_url)} "
                                  f"(never submitted, or expired)")
        return JobStatus.of(self.id, status_fields(raw))

    def prompt(self, prompts: Sequence[ObjectPrompt] = (), *, points: Sequence[str] = (), boxes: Sequence[str] = (),
               now: bool = False, wait_s: float = 10.0, text: str | Sequence[str] = ()) -> running_prompts.PromptReply:
        """Add objects to the running job or correct its objects, from each prompt's frame on (`now`: from the
        next frame its worker processes); waits up to `wait_s` for what the worker did (`reply.changes`).
        `text` ("ball" or ["ball", "referee"]): a job with text looks for these phrases too, from the next frame on.
        Raises, with nothing sent, as `python -m producer prompt` refuses (PromptError, JobEndedError, ...)."""
        if text:
            if prompts or points or boxes:
                raise PromptError("give text or points and boxes, not both: phrases apply from the next frame on")
            phrases = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
            with redis_faults(self._settings):
                return running_prompts.add_text(self.id, phrases, settings=self._settings, wait_s=wait_s,
                                                client=self.client.redis)
        points, now_p = running_prompts.split_now(points)  # the command line's `@now` works here too
        boxes, now_b = running_prompts.split_now(boxes)
        with redis_faults(self._settings):
            return running_prompts.add_prompts(self.id, prompts_of(prompts, points, boxes), settings=self._settings,
                                               now=now or now_p or now_b, wait_s=wait_s, client=self.client.redis)

    def remove(self, obj_id: int, *, wait_s: float = 10.0) -> running_prompts.PromptReply:
        """Stop tracking object `obj_id` from the next frame the worker processes."""
        with redis_faults(self._settings):
            return running_prompts.remove_object(self.id, obj_id, settings=self._settings, wait_s=wait_s,
                                                 client=self.client.redis)

    def cancel(self) -> control.CancelResult:
        """Cancel the job (idempotent: an ended job is left as it is, and the result says so)."""
        with redis_faults(self._settings):
            return control.request_cancel(self.id, settings=self._settings, client=self.client.redis)

    def stop(self) -> str:
        """End a live job gracefully (its last frames published, then `completed`); InputError on a file job."""
        with redis_faults(self._settings):
            return control.request_stop(self.id, settings=self._settings, client=self.client.redis)

    def submit_result(self, timeout_s: float | None = None) -> Submitted | None:
        """For a job this client submitted: wait for its decode (or live ingest) to end, and return what it
        did, or raise its error. None for a handle from `client.job()`."""
        return None if self._background is None else self._background.wait(timeout_s)

    def _appear(self, appear_s: float) -> None:
        keys, deadline = self._settings.keys, time.monotonic() + appear_s
        while not self._exists(keys.job(self.id), keys.results(self.id)):
            if time.monotonic() > deadline:
                raise UnknownJobError(f"no job {self.id!r} in Redis at {redact_url(self._settings.redis_url)} after "
                                      f"{appear_s:g} s (wrong REDIS_URL or key_prefix, or expired?)")
            time.sleep(0.1)

    def _exists(self, *keys: str) -> bool:
        with redis_faults(self._settings):
            return any(self.client.redis.exists(key) for key in keys)
