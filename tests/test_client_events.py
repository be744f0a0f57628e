"""`client.events(group, consumer)` (producer/events.py) against a real Redis: the group is created if missing,
an event is acknowledged only after its handler returned (a failed one comes back), a job's second terminal
copy is not delivered (per group), poison is acknowledged unseen, a dead consumer's events are claimed, and a
group lost with an emptied Redis is made again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from producer import Client, Event
from runtime.settings import Settings
from schemas import messages

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def emit(client: Client, *msgs: messages.Message) -> list[str]:
    return [client.redis.xadd(client.settings.keys.events, cast(Any, messages.encode(m))).decode() for m in msgs]


def lifecycle(job_id: str) -> list[messages.Message]:
    return [messages.Started(job_id, "w1", 10, (1,)), messages.Progress(job_id, 5, 10),
            messages.Completed(job_id, "", 10, 1)]


def take(events: Any, n: int) -> list[Event]:
    got: list[Event] = []
    events.run(got.append, max_events=n)
    return got


def pending(client: Client, group: str) -> int:
    return int(cast(dict[str, Any], client.redis.xpending(client.settings.keys.events, group))["pending"])


def test_every_jobs_lifecycle_in_order_and_acknowledged(client: Client) -> None:
    emit(client, *lifecycle("a"), *lifecycle("b"))
    got = take(client.events("billing", "pod-1", start="0"), 6)
    assert [(e.job_id, e.type) for e in got] == [(j, t) for j in "ab" for t in ("started", "progress", "completed")]
    assert isinstance(got[2].msg, messages.Completed) and got[2].terminal and not got[0].terminal
    assert pending(client, "billing") == 0
    # the default start is "$": a group made now sees only what comes after
    late = client.events("late", "pod-1")
    emit(client, *lifecycle("c"))
    assert [e.job_id for e in take(late, 3)] == ["c"] * 3


def test_a_handler_that_raises_leaves_its_event_pending_and_it_comes_back(client: Client) -> None:
    emit(client, *lifecycle("a"))

    def fail_on_completed(event: Event) -> None:
        if event.type == "completed":
            raise RuntimeError("backend down")

    with pytest.raises(RuntimeError):
        client.events("g", "pod-1", start="0").run(fail_on_completed)
    assert pending(client, "g") == 1
    again = take(client.events("g", "pod-1", start="0"), 1)  # this consumer's pending entries first
    assert [(e.job_id, e.type) for e in again] == [("a", "completed")]
    assert pending(client, "g") == 0


def test_iterating_acknowledges_an_event_when_the_loop_asks_for_the_next(client: Client) -> None:
    emit(client, *lifecycle("a"))
    seen = []
    for event in client.events("it", "pod-1", start="0"):
        seen.append(event.type)
        assert pending(client, "it") >= 1  # the one in hand is not acknowledged yet
        if event.type == "completed":
            break  # left the loop: the last one is delivered again
    assert seen == ["started", "progress", "completed"] and pending(client, "it") == 1


def test_a_second_terminal_copy_is_not_delivered_in_any_consumer_of_the_group(client: Client) -> None:
    first = lifecycle("a")
    emit(client, *first)
    emit(client, first[-1], *lifecycle("b")[:1])  # the at-least-once second copy of a's completed entry
    got = take(client.events("g", "pod-1", start="0"), 4)
    assert [(e.job_id, e.type) for e in got] == [("a", "started"), ("a", "progress"), ("a", "completed"),
                                                 ("b", "started")]
    assert pending(client, "g") == 0  # the copy was acknowledged, unseen
    emit(client, first[-1])  # a third copy, read by another consumer of the group
    emit(client, lifecycle("b")[2])
    assert [(e.job_id, e.type) for e in take(client.events("g", "pod-2"), 1)] == [("b", "completed")]
    other = take(client.events("audit", "x", start="0"), 5)  # another group collapses for itself
    assert [(e.job_id, e.type) for e in other].count(("a", "completed")) == 1


def test_poison_is_acknowledged_and_not_delivered(client: Client) -> None:
    client.redis.xadd(client.settings.keys.events, {"type": "frame", "data": b"\x01"})
    emit(client, *lifecycle("a")[:1])
    got = take(client.events("g", "pod-1", start="0"), 1)
    assert [e.type for e in got] == ["started"] and pending(client, "g") == 0


def test_a_dead_consumers_events_are_claimed_by_another(client: Client) -> None:
    emit(client, *lifecycle("a"))
    for _event in client.events("g", "dead-pod", start="0", claim_idle_s=0.3):
        break  # dies holding the first event (and the others of its read, which it never handed out)
    assert pending(client, "g") == 3
    got = take(client.events("g", "pod-2", claim_idle_s=0.3), 3)
    assert sorted(e.type for e in got) == ["completed", "progress", "started"]
    assert pending(client, "g") == 0


def test_a_group_lost_with_an_emptied_redis_is_made_again(client: Client) -> None:
    events = client.events("g", "pod-1", start="0")
    client.redis.flushall()
    stop = threading.Event()
    got: list[Event] = []

    def handle(event: Event) -> None:
        got.append(event)
        stop.set()

    runner = threading.Thread(target=events.run, args=(handle,), kwargs={"stop": stop})
    runner.start()
    threading.Timer(0.5, lambda: emit(client, *lifecycle("a")[:1])).start()
    runner.join(30)
    assert [e.type for e in got] == ["started"]
