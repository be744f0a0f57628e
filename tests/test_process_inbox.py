"""Unit tier: several sessions' messages read from one pipe (worker/model/process_inbox.py)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from worker.model.process_inbox import Inboxes


@dataclass(frozen=True)
class Msg:
    session: int
    n: int


class Pipe:
    """What the child sent, read one message at a time; counts reads at once (there must never be two)."""

    def __init__(self, msgs: list[Msg]) -> None:
        self.msgs = deque(msgs)
        self.lock = threading.Lock()
        self.readers = 0
        self.most_readers = 0

    def read(self, poll_s: float) -> Msg | None:
        with self.lock:
            self.readers += 1
            self.most_readers = max(self.most_readers, self.readers)
        try:
            with self.lock:
                return self.msgs.popleft() if self.msgs else None
        finally:
            with self.lock:
                self.readers -= 1


def drain(inbox: Inboxes, session: int, pipe: Pipe, count: int) -> list[Msg]:
    got: list[Msg] = []
    while len(got) < count:
        msg = inbox.next_for(session, pipe.read)
        if msg is not None:
            got.append(msg)
    return got


def test_each_session_gets_its_own_messages_in_order_from_one_reader_at_a_time() -> None:
    sent = [Msg(s, n) for n in range(200) for s in (1, 2, 3)]
    pipe = Pipe(sent)
    inbox = Inboxes(limit=8)
    for s in (1, 2, 3):
        inbox.open(s)
    got: dict[int, list[Msg]] = {}
    threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, drain(inbox, s, pipe, 200))) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in (1, 2, 3):
        assert got[s] == [Msg(s, n) for n in range(200)]
    assert pipe.most_readers == 1


def test_a_full_inbox_holds_the_reader_back_and_a_closed_session_drops_its_messages() -> None:
    pipe = Pipe([Msg(1, n) for n in range(5)] + [Msg(9, 0), Msg(2, 0)])
    inbox = Inboxes(limit=3)
    inbox.open(1)
    inbox.open(2)
    assert inbox.next_for(2, pipe.read) is None  # read a message of session 1's: kept for it
    assert inbox.next_for(2, pipe.read) is None
    assert inbox.next_for(2, pipe.read) is None
    assert len(pipe.msgs) == 4
    assert inbox.next_for(2, pipe.read) is None  # session 1's inbox is full: nothing more is read
    assert len(pipe.msgs) == 4
    assert [inbox.next_for(1, pipe.read) for _ in range(3)] == [Msg(1, 0), Msg(1, 1), Msg(1, 2)]
    inbox.close(1)  # closed: what is still sent for it is dropped
    assert inbox.next_for(2, pipe.read) is None  # Msg(1, 3): dropped
    assert inbox.next_for(2, pipe.read) is None  # Msg(1, 4)
    assert inbox.next_for(2, pipe.read) is None  # Msg(9, 0): nobody's
    assert inbox.next_for(2, pipe.read) == Msg(2, 0)
    assert inbox.count() == 1
