"""Messages of several sessions read from one pipe: a model process shared by a worker's slots
(worker/model/process.py) sends every session's frames and answers down one connection, and each job's
thread waits for its own.

Whichever waiting thread finds nobody reading reads the pipe for a moment and puts each message in its
session's inbox; the others wait on the inboxes (leader and followers, no thread of its own). At most
`limit` messages wait in one inbox: a session its job reads slowly then holds the child back, as a pipe
of its own would (the child's sender for that session waits, and its model with it), instead of piling up
frames here. A message for a session that is no longer open is dropped.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

POLL_S = 0.2  # how long one turn of reading (or of waiting for the reader) lasts


class Inboxes:
    """Per-session inboxes over one reader (see the module doc)."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._boxes: dict[int, collections.deque[Any]] = {}
        self._reading = False

    def open(self, session_id: int) -> None:
        with self._cond:
            self._boxes[session_id] = collections.deque()

    def close(self, session_id: int) -> None:
        with self._cond:
            self._boxes.pop(session_id, None)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._boxes.clear()
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return len(self._boxes)

    def next_for(self, session_id: int, read: Callable[[float], Any]) -> Any | None:
        """A message for `session_id` waiting or read within about POLL_S, else None. `read(poll_s)` reads
        one message of anyone's, or None if none came (what it raises, the caller gets)."""
        with self._cond:
            box = self._boxes.get(session_id)
            if box:
                self._cond.notify_all()  # room again for a reader held back by this inbox
                return box.popleft()
            if self._reading or any(len(b) >= self.limit for b in self._boxes.values()):
                self._cond.wait(POLL_S)
                box = self._boxes.get(session_id)
                return box.popleft() if box else None
            self._reading = True
        try:
            msg = read(POLL_S)
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
        if msg is None:
            return None
        owner = getattr(msg, "session", None)
        if owner == session_id:
            return msg
        with self._cond:
            other = self._boxes.get(owner) if isinstance(owner, int) else None
            if other is not None:
                other.append(msg)
                self._cond.notify_all()
        return None
