"""Prompts on a running job, the worker's side (worker/service/control.py): commands on the job's control
stream are applied between frames; each object touched gets an `object` entry in order with the frames;
the other objects' masks stay exactly those of the same job without the change; a bad command is refused
and the job goes on; another attempt replays what the first applied."""

from __future__ import annotations

import signal
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from schemas.rle import decode_mask
from tests.fakes import ChaosHooks, ColourSegmenter
from tests.videos import disc_prompt
from tests.workers import WorkerProcess, wait_for
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 30
SIZE = (96, 64)


def point(obj_id: int, frame: int = 0) -> ObjectPrompt:
    return disc_prompt(obj_id, frame, N, SIZE)


def send(client: redis.Redis, settings: Settings, msg: messages.PromptCommand | messages.RemoveCommand) -> None:
    client.xadd(settings.keys.control(msg.job_id), messages.encode(msg))


def prompt_cmd(job: str, *prompts: ObjectPrompt, now: bool = False) -> messages.PromptCommand:
    return messages.PromptCommand(job, uuid.uuid4().hex, tuple(prompts), now=now)


def entries(client: redis.Redis, settings: Settings, job: str) -> list[tuple[str, messages.Message]]:
    return [(i.decode(), messages.decode(f)) for i, f in client.xrange(settings.keys.results(job))]


def frames_done(client: redis.Redis, settings: Settings, job: str) -> int:
    return int(client.hget(settings.keys.job(job), "frames_done") or 0)


def masks_of(results: list[tuple[str, messages.Message]], obj_id: int) -> dict[int, np.ndarray]:
    return {m.frame_idx: decode_mask(o.mask) for _, m in results if isinstance(m, messages.FrameResult)
            for o in m.objects if o.obj_id == obj_id}


def run_worker(settings: Settings, client: redis.Redis) -> threading.Thread:
    worker = Worker(settings=settings, segmenter=ChaosHooks(ColourSegmenter(), delay_s=0.05), client=client,
                    name="inproc")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    return thread


def test_objects_added_and_removed_mid_job_leave_the_others_exact(video: Path, settings: Settings,
                                                                  redis_client: redis.Redis,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.service.control_reader

    # the removal below must land before the job's last frame: commands read every 10 ms, not 200, and the
    # removal sent at frame 21 of 30 leave a margin of seconds, not of a frame or two
    monkeypatch.setattr(worker.service.control_reader, "POLL_S", 0.01)
    submit(video, [point(1)], settings=settings, job_id="plain")
    run_worker(settings, redis_client).join(60)
    submit(video, [point(1)], settings=settings, job_id="changed")
    thread = run_worker(settings, redis_client)
    wait_for(lambda: frames_done(redis_client, settings, "changed") >= 4, 30, "the job under way")
    send(redis_client, settings, prompt_cmd("changed", point(5, 20)))  # ahead: applied at frame 20
    send(redis_client, settings, prompt_cmd("changed", point(6, 1)))  # already segmented: applied at the next frame
    send(redis_client, settings, messages.RemoveCommand("changed", uuid.uuid4().hex, 9))  # never tracked: refused
    wait_for(lambda: frames_done(redis_client, settings, "changed") >= 21, 30, "past frame 20")
    send(redis_client, settings, messages.RemoveCommand("changed", uuid.uuid4().hex, 6))
    thread.join(60)
    results = entries(redis_client, settings, "changed")
    ids = [i for i, _ in results]
    assert ids == sorted(ids, key=lambda i: tuple(int(x) for x in i.split("-")))  # in stream order, as written
    assert ids[-1] == TERMINAL_ENTRY_ID and isinstance(results[-1][1], messages.Completed)
    changes = {(c.obj_id, c.change): c for _, c in results if isinstance(c, messages.ObjectChange)}
    assert set(changes) == {(5, "added"), (6, "added"), (9, "refused"), (6, "removed")}
    assert changes[(5, "added")].frame_idx == 20 and changes[(5, "added")].note == ""
    six = changes[(6, "added")]
    assert six.frame_idx > 4 and six.requested_frame == 1 and "already segmented" in six.note
    assert "no object 9 to remove" in changes[(9, "refused")].note
    gone = changes[(6, "removed")].frame_idx
    # each change sits right before the frame it takes effect on
    for entry_id, c in results:
        if isinstance(c, messages.ObjectChange):
            assert entry_id.startswith(f"{c.frame_idx}-") and int(entry_id.split("-")[1]) >= 2
    frames = [m for _, m in results if isinstance(m, messages.FrameResult)]
    assert [f.frame_idx for f in frames] == list(range(N))
    for f in frames:
        expected = {1} | ({5} if f.frame_idx >= 20 else set()) | ({6} if six.frame_idx <= f.frame_idx < gone else set())
        assert {o.obj_id for o in f.objects} == expected, f.frame_idx
    plain, ours = masks_of(entries(redis_client, settings, "plain"), 1), masks_of(results, 1)
    assert all(np.array_equal(plain[k], ours[k]) for k in range(N))  # object 1 untouched by the others' changes
    events = [messages.decode(f) for _, f in redis_client.xrange(settings.keys.events)]
    assert {(e.obj_id, e.change) for e in events if isinstance(e, messages.ObjectChange) and e.job_id == "changed"} \
        == set(changes)


def test_a_prompt_sent_while_the_job_is_queued_applies_from_its_frame(video: Path, settings: Settings,
                                                                       redis_client: redis.Redis) -> None:
    submit(video, [point(1)], settings=settings, job_id="queued")
    send(redis_client, settings, prompt_cmd("queued", point(4, 3)))
    run_worker(settings, redis_client).join(60)
    results = entries(redis_client, settings, "queued")
    change = [c for _, c in results if isinstance(c, messages.ObjectChange)]
    assert [(c.obj_id, c.change, c.frame_idx) for c in change] == [(4, "added", 3)]
    assert set(masks_of(results, 4)) >= set(range(3, N))


@pytest.mark.parametrize("resume", ["on", "off"])
def test_another_attempt_replays_what_the_first_applied(video: Path, settings: Settings, redis_client: redis.Redis,
                                                        tmp_path: Path, resume: str) -> None:
    job = f"replay-{resume}"
    submit(video, [point(1)], settings=settings, job_id=job)
    crasher = WorkerProcess(settings, "crasher", tmp_path, delay_s=0.1, faults={job: {"crash_at": 18}})
    wait_for(lambda: frames_done(redis_client, settings, job) >= 3, 30, "the job under way")
    send(redis_client, settings, prompt_cmd(job, point(7, 0), now=True))
    assert crasher.wait(60) == -signal.SIGKILL
    first = [c for _, c in entries(redis_client, settings, job) if isinstance(c, messages.ObjectChange)]
    assert [(c.obj_id, c.change) for c in first] == [(7, "added")]
    taker = WorkerProcess(settings, "taker", tmp_path, delay_s=0.02, env={"VSEG_RESUME": resume})
    try:
        wait_for(lambda: redis_client.xrange(settings.keys.results(job), min=TERMINAL_ENTRY_ID), 60, "the job's end")
    finally:
        taker.signal(signal.SIGTERM)
        taker.wait(30)
    results = entries(redis_client, settings, job)
    changes = [c for _, c in results if isinstance(c, messages.ObjectChange)]
    assert [(c.obj_id, c.change, c.frame_idx) for c in changes] == [(7, "added", first[0].frame_idx)]  # once
    frames = [m for _, m in results if isinstance(m, messages.FrameResult)]
    assert [f.frame_idx for f in frames] == list(range(N))
    assert all({o.obj_id for o in f.objects} == ({1, 7} if f.frame_idx >= first[0].frame_idx else {1}) for f in frames)
