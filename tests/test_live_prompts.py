"""Prompts on a running job, the client side (producer/running_prompts.py, `python -m producer prompt` and
`remove`): every refusal is one line at the client with nothing written to the control stream; a command
that goes through is one entry there; its reply is read from the `object` entries on the result stream
(written here by the test, as a worker would, at schemas.names.object_entry_id); and `watch` keeps those
entries in masks.json."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
import redis

from producer.running_prompts import (
    JobEndedError,
    PromptRefused,
    PromptReply,
    UnknownObjectError,
    add_prompts,
    cli_prompts,
    remove_object,
    split_now,
)
from producer.submission import submit
from producer.watching import watch
from runtime.limits import LimitError
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError, UnknownJobError
from schemas.names import (
    STARTED_ENTRY_ID,
    TERMINAL_ENTRY_ID,
    TERMINAL_STATES,
    frame_entry_id,
    object_entry_id,
)
from schemas.prompts import ObjectPrompt
from tests.videos import disc_center, make_video
from tests.workers import ROOT, worker_env

SIZE = (64, 48)
FRAMES = 20


def point(obj_id: int, x: float = 10, y: float = 10, frame_idx: int = 0) -> ObjectPrompt:
    return ObjectPrompt(obj_id, frame_idx, ((x, y),), (1,))


def change(job_id: str, request_id: str, obj_id: int, kind: str, frame_idx: int, note: str = "") -> messages.ObjectChange:
    return messages.ObjectChange(job_id, obj_id, frame_idx, kind, request_id=request_id, note=note)


# ---- no Redis ------------------------------------------------------------------------------------------------

def test_at_now_is_the_same_as_now_and_leaves_submits_syntax_alone() -> None:
    assert split_now(["3:10,20@now", "1:5,5@4", "2:1,1"]) == (["3:10,20", "1:5,5@4", "2:1,1"], True)
    assert split_now(["1:5,5@4"]) == (["1:5,5@4"], False)
    prompts, now = cli_prompts(points=["3:10,20@now"], boxes=["3:1,2,30,40"])
    assert now and prompts == [ObjectPrompt(3, 0, ((10.0, 20.0),), (1,), (1.0, 2.0, 30.0, 40.0))]
    assert cli_prompts(points=["3:10,20@5"]) == ([point(3, 10, 20, 5)], False)


@pytest.mark.parametrize("points, now", [(["3:10,20@now", "4:1,1@5"], False), (["4:1,1@5"], True)])
def test_a_frame_named_with_now_is_refused(points: list[str], now: bool) -> None:
    with pytest.raises(PromptError, match="object 4: a prompt names frame 5, but --now"):
        cli_prompts(points=points, now=now)


def test_no_prompts_is_refused_before_redis() -> None:
    with pytest.raises(PromptError, match="no prompts"):
        cli_prompts()


@pytest.mark.parametrize("reply, text", [
    (PromptReply("j", "r1", (3,), (change("j", "r1", 3, "added", 57),), 10), "object 3 added from frame 57"),
    (PromptReply("j", "r1", (3,), (change("j", "r1", 3, "corrected", 60),), 10), "object 3 corrected from frame 60"),
    (PromptReply("j", "r1", (2,), (change("j", "r1", 2, "removed", 61),), 10), "object 2 removed from frame 61"),
    (PromptReply("j", "r1", (2,), (change("j", "r1", 2, "refused", 61, "over the limit"),), 10),
     "object 2 refused: over the limit"),
    (PromptReply("j", "r1", (3,), (), 10), "sent (request r1): no worker has applied it within 10 s; it applies when "
                                           "the job's worker reaches it (a queued job: from its first frame)"),
    (PromptReply("j", "r1", (3,), (), 0), "sent (request r1): it applies when the job's worker reaches it "
                                          "(a queued job: from its first frame)"),
    (PromptReply("j", "r1", (3, 4), (change("j", "r1", 3, "added", 5),), 2.5),
     "object 3 added from frame 5\nsent (request r1) for object 4: no worker has applied it within 2.5 s; it applies "
     "when the job's worker reaches it (a queued job: from its first frame)"),
    (PromptReply("j", "r1", (3,), (), 10, ended="completed"),
     "sent (request r1): the job ended (completed) before a worker applied it"),
])
def test_each_reply_says_what_became_of_the_command(reply: PromptReply, text: str) -> None:
    assert reply.describe() == text


def test_only_a_command_refused_for_every_object_is_refused() -> None:
    refused = PromptReply("j", "r1", (3, 4), (change("j", "r1", 3, "refused", 5, "no"),
                                              change("j", "r1", 4, "refused", 5, "no")), 10)
    assert refused.refused
    with pytest.raises(PromptRefused, match="job j refused request r1: object 3 refused: no; object 4 refused: no"):
        refused.raise_if_refused()
    assert not PromptReply("j", "r1", (3, 4), (change("j", "r1", 3, "refused", 5, "no"),), 10).refused  # 4: no reply
    assert not PromptReply("j", "r1", (3, 4), (change("j", "r1", 3, "refused", 5, "no"),
                                               change("j", "r1", 4, "added", 5)), 10).refused
    assert not PromptReply("j", "r1", (3,), (), 10).refused


# ---- against a real redis-server -----------------------------------------------------------------------------

def queued_job(settings: Settings, client: redis.Redis, tmp_path: Path, job_id: str, *, stream: bool = False) -> str:
    """A job submitted with object 1 on frame 0 (20 frames of 64x48) that no worker has taken: queued."""
    video = make_video(tmp_path / f"{job_id}.mp4", num_frames=FRAMES, size_wh=SIZE)
    x, y = disc_center(0, FRAMES, SIZE)
    submit(video, [point(1, x, y)], settings=settings, client=client, job_id=job_id, stream=stream)
    return job_id


def commands(client: redis.Redis, settings: Settings, job_id: str) -> list[messages.Message]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(settings.keys.control(job_id)))
    return [messages.decode(fields) for _id, fields in entries]



def last_id(client: redis.Redis, stream: str) -> bytes | str:
    last = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(stream, count=1))
    return last[0][0] if last else "0-0"


@contextmanager
def answering(settings: Settings, job_id: str, kind: str, frame_idx: int, *, note: str = "",
              request_id: str | None = None, terminal: bool = False) -> Iterator[None]:
    """A worker's reply to the next command on the job's control stream: an `object` entry per object at
    object_entry_id(frame_idx, k) (`request_id`: another request's), or (`terminal`) the job's end."""
    client = redis.Redis.from_url(settings.redis_url)
    control, results = settings.keys.control(job_id), settings.keys.results(job_id)
    after = last_id(client, control)

    def run() -> None:
        reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                     client.xread({control: after}, count=1, block=15_000))
        command = messages.decode(reply[0][1][0][1])
        assert isinstance(command, (messages.PromptCommand, messages.RemoveCommand))
        time.sleep(0.1)
        if terminal:
            client.xadd(results, messages.encode(messages.Completed(job_id, "", FRAMES, 1)), id=TERMINAL_ENTRY_ID)
            return
        obj_ids = (sorted({p.obj_id for p in command.prompts}) if isinstance(command, messages.PromptCommand)
                   else [command.obj_id])
        for k, obj_id in enumerate(obj_ids):
            entry = change(job_id, request_id or command.request_id, obj_id, kind, frame_idx, note)
            client.xadd(results, messages.encode(entry), id=object_entry_id(frame_idx, k))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(20)
        client.close()


def publish_frame(client: redis.Redis, settings: Settings, job_id: str, k: int) -> None:
    client.xadd(settings.keys.results(job_id), messages.encode(messages.FrameResult(job_id, k, ())), id=frame_entry_id(k))


def running_at(client: redis.Redis, settings: Settings, job_id: str, frames_done: int) -> None:
    """The job as a worker leaves it after publishing frames 0..frames_done-1."""
    results = settings.keys.results(job_id)
    client.hset(settings.keys.job(job_id), mapping={"state": "running", "attempt": 1, "frames_done": frames_done})
    client.xadd(results, messages.encode(messages.Started(job_id, "w1", FRAMES, (1,))), id=STARTED_ENTRY_ID)
    for k in range(frames_done):
        publish_frame(client, settings, job_id, k)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env=worker_env(settings),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_an_unknown_job_is_refused(settings: Settings, redis_client: redis.Redis) -> None:
    with pytest.raises(UnknownJobError, match="no job 'nope'"):
        add_prompts("nope", [point(2)], settings=settings, client=redis_client, wait_s=0)
    with pytest.raises(UnknownJobError, match="no job 'nope'"):
        remove_object("nope", 1, settings=settings, client=redis_client, wait_s=0)
    assert not redis_client.exists(settings.keys.control("nope"))


@pytest.mark.integration
@pytest.mark.parametrize("state", [s.value for s in TERMINAL_STATES])
def test_a_job_already_ended_is_refused(state: str, settings: Settings, redis_client: redis.Redis,
                                        tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "over")
    redis_client.hset(settings.keys.job(job_id), "state", state)
    with pytest.raises(JobEndedError) as e:
        add_prompts(job_id, [point(2)], settings=settings, client=redis_client, wait_s=0)
    assert str(e.value) == f"job over is already {state}: prompts apply only to a running or queued job"
    with pytest.raises(JobEndedError, match=f"already {state}: objects can be removed only from a running"):
        remove_object(job_id, 1, settings=settings, client=redis_client, wait_s=0)
    assert not redis_client.exists(settings.keys.control(job_id))


@pytest.mark.integration
def test_prompts_outside_the_job_are_refused(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "bounds")
    for prompt, message in [
        (point(2, 65, 10), r"point \(65, 10\) is outside the 64x48 frame"),
        (ObjectPrompt(2, 0, (), (), (0, 0, 30, 49)), r"object 2 on frame 0: box \(0, 0, 30, 49\) is outside the 64x48"),
        (point(2, frame_idx=FRAMES), f"on frame {FRAMES}, but the decoded video has {FRAMES} frames"),
    ]:
        with pytest.raises(PromptError, match=message):
            add_prompts(job_id, [prompt], settings=settings, client=redis_client, wait_s=0)
    with pytest.raises(PromptError, match=r"^object 2: point \(70, 10\) is outside the 64x48 frame"):  # now: no frame
        add_prompts(job_id, [point(2, 70, 10, FRAMES + 5)], settings=settings, client=redis_client, now=True, wait_s=0)
    with pytest.raises(PromptError, match=r"^object 3: box \(1, 1, 100, 20\) is outside the 64x48 frame"):
        add_prompts(job_id, [ObjectPrompt(3, 0, (), (), (1, 1, 100, 20))], settings=settings, client=redis_client,
                    now=True, wait_s=0)
    assert not redis_client.exists(settings.keys.control(job_id))
    add_prompts(job_id, [point(2, frame_idx=FRAMES + 5)], settings=settings, client=redis_client, now=True, wait_s=0)
    assert len(commands(redis_client, settings, job_id)) == 1  # now: whatever frame it names


@pytest.mark.integration
def test_a_streamed_job_still_decoding_takes_frames_up_to_the_job_limit(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "streamed", stream=True)
    frames_stream = settings.keys.frames(job_id)
    assert redis_client.xrange(frames_stream, f"{FRAMES + 1}-0", f"{FRAMES + 1}-0")  # its end marker
    limited = dataclasses.replace(settings, max_frames=30)
    with pytest.raises(PromptError, match=f"but the decoded video has {FRAMES} frames"):  # decoded: its total
        add_prompts(job_id, [point(2, frame_idx=25)], settings=limited, client=redis_client, wait_s=0)
    redis_client.xdel(frames_stream, f"{FRAMES + 1}-0")  # as if still decoding
    with pytest.raises(PromptError, match="past the per-job limit of 30 frames .VSEG_MAX_FRAMES; the video is still"):
        add_prompts(job_id, [point(2, frame_idx=30)], settings=limited, client=redis_client, wait_s=0)
    assert not redis_client.exists(settings.keys.control(job_id))
    add_prompts(job_id, [point(2, frame_idx=25)], settings=limited, client=redis_client, wait_s=0)
    assert len(commands(redis_client, settings, job_id)) == 1


@pytest.mark.integration
def test_the_object_limit_counts_the_jobs_objects_and_earlier_commands(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "limit")
    two = dataclasses.replace(settings, max_objects=2)
    add_prompts(job_id, [point(2)], settings=two, client=redis_client, wait_s=0)  # objects 1 and 2
    with pytest.raises(LimitError, match=r"would track 3 objects, over the limit of 2 \(VSEG_MAX_OBJECTS\)"):
        add_prompts(job_id, [point(3)], settings=two, client=redis_client, wait_s=0)
    assert len(commands(redis_client, settings, job_id)) == 1  # the refused one wrote nothing
    add_prompts(job_id, [point(2, 20, 20)], settings=two, client=redis_client, wait_s=0)  # a correction: fits
    remove_object(job_id, 2, settings=two, client=redis_client, wait_s=0)
    add_prompts(job_id, [point(3)], settings=two, client=redis_client, wait_s=0)  # 2 removed: 3 fits
    assert [type(c).__name__ for c in commands(redis_client, settings, job_id)] == [
        "PromptCommand", "PromptCommand", "RemoveCommand", "PromptCommand"]


@pytest.mark.integration
def test_removing_an_object_the_job_never_had_is_refused(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "rm")
    with pytest.raises(UnknownObjectError, match="job rm has no object 7 .its objects now: 1.$"):
        remove_object(job_id, 7, settings=settings, client=redis_client, wait_s=0)
    assert not redis_client.exists(settings.keys.control(job_id))
    add_prompts(job_id, [point(7)], settings=settings, client=redis_client, wait_s=0)
    remove_object(job_id, 7, settings=settings, client=redis_client, wait_s=0)  # had it since
    assert len(commands(redis_client, settings, job_id)) == 2
    with pytest.raises(UnknownObjectError, match=r"job rm has no object 9 \(its objects now: 1; removed: 7\)$"):
        remove_object(job_id, 9, settings=settings, client=redis_client, wait_s=0)  # 7 is not among "its objects"


@pytest.mark.integration
def test_a_prompt_is_one_command_on_the_control_stream(settings: Settings, redis_client: redis.Redis,
                                                       tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "one")
    prompts = [point(1, 20, 20, 3), ObjectPrompt(4, 6, ((5.0, 6.0),), (0,), (1.0, 2.0, 30.0, 40.0))]
    reply = add_prompts(job_id, prompts, settings=settings, client=redis_client, wait_s=0)
    [command] = commands(redis_client, settings, job_id)
    assert isinstance(command, messages.PromptCommand)
    assert command.job_id == job_id and command.prompts == tuple(prompts) and not command.now
    assert command.request_id == reply.request_id and len(reply.request_id) == 32
    assert reply.obj_ids == (1, 4) and reply.changes == ()
    assert redis_client.ttl(settings.keys.control(job_id)) == -1  # durable while the job lives


@pytest.mark.integration
def test_the_control_stream_takes_the_job_hashs_expiry(settings: Settings, redis_client: redis.Redis,
                                                       tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "ttl")
    redis_client.expire(settings.keys.job(job_id), 500)
    add_prompts(job_id, [point(2)], settings=settings, client=redis_client, wait_s=0)
    assert 490 < cast(int, redis_client.ttl(settings.keys.control(job_id))) <= 500


@pytest.mark.integration
@pytest.mark.parametrize("kind, note, line", [
    ("added", "", "object 3 added from frame 5"),
    ("corrected", "frame 2 was already segmented: applied from frame 5, the next one processed",
     "object 3 corrected from frame 5 (frame 2 was already segmented: applied from frame 5, the next one processed)"),
    ("refused", "the job would track 33 objects", "object 3 refused: the job would track 33 objects"),
])
def test_the_reply_is_the_workers_object_entry(kind: str, note: str, line: str, settings: Settings,
                                               redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "reply")
    running_at(redis_client, settings, job_id, 5)
    started = time.monotonic()
    with answering(settings, job_id, kind, 5, note=note):
        reply = add_prompts(job_id, [point(3, frame_idx=2)], settings=settings, client=redis_client, wait_s=10)
    assert time.monotonic() - started < 5  # it returned at the reply, not at the end of the wait
    [got] = reply.changes
    assert (got.obj_id, got.frame_idx, got.change, got.request_id) == (3, 5, kind, reply.request_id)
    assert reply.describe() == line
    assert reply.refused == (kind == "refused")


@pytest.mark.integration
def test_no_reply_within_the_wait_says_the_command_was_sent(settings: Settings, redis_client: redis.Redis,
                                                            tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "silent")
    with answering(settings, job_id, "added", 0, request_id="another-request"):  # not ours: ignored
        started = time.monotonic()
        reply = add_prompts(job_id, [point(3)], settings=settings, client=redis_client, wait_s=1.0)
    assert 1.0 <= time.monotonic() - started < 4
    assert reply.changes == () and reply.pending == (3,) and not reply.refused
    assert reply.describe() == (f"sent (request {reply.request_id}): no worker has applied it within 1 s; it applies "
                                f"when the job's worker reaches it (a queued job: from its first frame)")


@pytest.mark.integration
def test_the_jobs_end_ends_the_wait(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "ends")
    running_at(redis_client, settings, job_id, 3)
    started = time.monotonic()
    with answering(settings, job_id, "added", 0, terminal=True):
        reply = add_prompts(job_id, [point(3)], settings=settings, client=redis_client, wait_s=10)
    assert time.monotonic() - started < 5
    assert reply.ended == "completed" and reply.changes == ()
    assert reply.describe().endswith("the job ended (completed) before a worker applied it")


@pytest.mark.integration
def test_the_cli_prompt_and_remove(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "cli")

    out = cli(settings, "prompt", job_id, "--point", "3:10,20@now", "--box", "3:1,2,30,40", "--wait", "0")
    assert out.returncode == 0, out.stderr
    [command] = commands(redis_client, settings, job_id)
    assert isinstance(command, messages.PromptCommand) and command.now
    assert command.prompts == (ObjectPrompt(3, 0, ((10.0, 20.0),), (1,), (1.0, 2.0, 30.0, 40.0)),)
    assert out.stdout.strip() == (f"sent (request {command.request_id}): it applies when the job's worker reaches "
                                  f"it (a queued job: from its first frame)")

    running_at(redis_client, settings, job_id, 4)
    with answering(settings, job_id, "added", 4):
        out = cli(settings, "prompt", job_id, "--point", "5:10,20@4", "--wait", "10")
    assert (out.returncode, out.stdout.strip()) == (0, "object 5 added from frame 4"), out.stderr
    publish_frame(redis_client, settings, job_id, 4)
    with answering(settings, job_id, "removed", 5):
        out = cli(settings, "remove", job_id, "3")
    assert (out.returncode, out.stdout.strip()) == (0, "object 3 removed from frame 5"), out.stderr
    publish_frame(redis_client, settings, job_id, 5)
    with answering(settings, job_id, "refused", 6, note="object 1 is the job's last object"):
        out = cli(settings, "remove", job_id, "1")
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.strip().endswith("object 1 refused: object 1 is the job's last object"), out.stderr
    assert len(commands(redis_client, settings, job_id)) == 4


@pytest.mark.integration
def test_the_cli_refuses_in_one_line(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = queued_job(settings, redis_client, tmp_path, "clibad")
    cases = [
        (["prompt", "nosuch", "--point", "2:1,1"], 1, "no job 'nosuch'"),
        (["prompt", job_id, "--point", "2:100,1", "--wait", "0"], 2, "point (100, 1) is outside the 64x48 frame"),
        (["prompt", job_id, "--point", "2:1,1@99"], 2, "but the decoded video has 20 frames"),
        (["prompt", job_id, "--point", "2:1,1@3", "--now"], 2, "a prompt names frame 3, but --now"),
        (["prompt", job_id], 2, "no prompts"),
        (["remove", job_id, "9"], 1, "job clibad has no object 9"),
    ]
    for args, code, message in cases:
        out = cli(settings, *args)
        assert out.returncode == code and message in out.stderr, (args, out)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    redis_client.hset(settings.keys.job(job_id), "state", "completed")
    out = cli(settings, "prompt", job_id, "--point", "2:1,1")
    assert out.returncode == 1 and out.stderr.strip().endswith(
        f"job {job_id} is already completed: prompts apply only to a running or queued job"), out.stderr
    assert not redis_client.exists(settings.keys.control(job_id))


@pytest.mark.integration
def test_watch_keeps_the_object_changes_in_masks_json(settings: Settings, redis_client: redis.Redis,
                                                      tmp_path: Path) -> None:
    job_id = "watched"
    results = settings.keys.results(job_id)
    redis_client.hset(settings.keys.job(job_id), mapping={"state": "running"})
    redis_client.xadd(results, messages.encode(messages.Started(job_id, "w1", 4, (1,))), id=STARTED_ENTRY_ID)
    for k in range(4):
        if k == 2:
            redis_client.xadd(results, messages.encode(change(job_id, "r1", 3, "added", 2)), id=object_entry_id(2, 0))
            redis_client.xadd(results, messages.encode(change(job_id, "r1", 4, "refused", 2, "no")),
                              id=object_entry_id(2, 1))
        redis_client.xadd(results, messages.encode(messages.FrameResult(job_id, k, ())), id=frame_entry_id(k))
    redis_client.xadd(results, messages.encode(messages.Completed(job_id, "", 4, 2)), id=TERMINAL_ENTRY_ID)

    result = watch(job_id, tmp_path / "out", settings=settings, client=redis_client, progress=False)
    doc = json.loads(result.masks_json.read_text())
    assert [f["frame_idx"] for f in doc["frames"]] == [0, 1, 2, 3] and result.num_frames == 4
    assert doc["changes"] == [{"obj_id": 3, "frame_idx": 2, "change": "added", "note": ""},
                              {"obj_id": 4, "frame_idx": 2, "change": "refused", "note": "no"}]
