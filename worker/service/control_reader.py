"""Reading a job's control stream (`vseg:control:{job_id}`) for worker/service/control.py: the commands so far
and what earlier attempts recorded of them (`recorded`), then new ones from a reader thread every POLL_S, off
the model's thread (a hung Redis must not hold it up)."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import cast

import redis

from runtime.logs import ContextThread
from schemas import messages
from schemas.errors import SchemaError
from schemas.names import TERMINAL_ENTRY_ID, Keys

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often new commands are looked for (one XRANGE on the control stream)

Command = messages.PromptCommand | messages.RemoveCommand


class ControlReader:
    """The control stream's commands in order, each once; `ids` maps a command's request id to its entry id."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, reachable: Callable[[], bool]) -> None:
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.reachable = reachable  # False while the job's lease is presumed lost (Redis away): no reads then
        self.last_id = "0-0"
        self.ids: dict[str, str] = {}
        self._arrived: list[Command] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def recorded(self) -> dict[str, list[messages.ObjectChange]]:
        """What earlier attempts did with each command: their `object` entries, by request id."""
        recorded: dict[str, list[messages.ObjectChange]] = defaultdict(list)
        for _entry_id, fields in self._xrange(self.keys.results(self.job_id), "0-0", f"({TERMINAL_ENTRY_ID}"):
            if fields.get(b"type") != messages.EntryType.OBJECT.value.encode():
                continue  # frames (most of the stream): not decoded
            msg = decode(fields)
            if isinstance(msg, messages.ObjectChange) and msg.request_id:
                recorded[msg.request_id].append(msg)
        return recorded

    def done_id(self) -> tuple[int, int]:
        """The last command an earlier attempt applied (the job hash's `control_done`)."""
        done = self.client.hget(self.keys.job(self.job_id), "control_done")
        return stream_id(done.decode() if isinstance(done, bytes) else "0-0")

    def read(self) -> list[Command]:
        """The commands after those read so far."""
        commands: list[Command] = []
        for entry_id, fields in self._xrange(self.keys.control(self.job_id), f"({self.last_id}", "+"):
            self.last_id = entry_id.decode()
            msg = decode(fields)
            if isinstance(msg, (messages.PromptCommand, messages.RemoveCommand)) and msg.job_id == self.job_id:
                self.ids[msg.request_id] = self.last_id
                commands.append(msg)
            elif msg is not None:
                log.warning("job %s: ignoring a %s entry on %s", self.job_id, msg.TYPE.value,
                            self.keys.control(self.job_id))
        return commands

    def start(self) -> None:
        ContextThread(target=self._loop, daemon=True, name=f"control-{self.job_id}").start()

    def stop(self) -> None:
        self._stop.set()

    def arrived(self) -> list[Command]:
        """What the thread has read since the last call."""
        with self._lock:
            out, self._arrived = self._arrived, []
        return out

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            if not self.reachable():
                continue
            try:
                commands = self.read()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                # Redis away (or full): the job's lease decides what happens to the job; commands wait
                log.debug("job %s: control stream not read (%s); trying again", self.job_id, e)
                continue
            with self._lock:
                self._arrived.extend(commands)

    def _xrange(self, key: str, start: str, end: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        if start == "(0-0":
            start = "-"
        return cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(key, min=start, max=end))


def stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def decode(fields: dict[bytes, bytes]) -> messages.Message | None:
    try:
        return messages.decode(fields)
    except SchemaError as e:
        log.warning("ignoring an entry that does not decode: %s", e)
        return None
