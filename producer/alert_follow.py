"""One job followed by the events consumer (producer/alerts.py): its result stream read through the consumer's
own group on it, each frame judged (producer/zone_judge.py), the events published, the judge's state saved.

Each `step` is one batch: the job hash's `zones` and `camera` and the next entries of the result stream, read
in one round trip (the job's keys share a slot); then, in this order, every event of the batch on
`vseg:alerts` (a shared key, another slot), then on the job's `vseg:job:{id}:alerts` with the judge's state
(`Keys.zone_state`: its objects, the last entry id judged, the job's fps) and the XACK of the batch's entries,
in one pipeline on the job's slot. A crash anywhere leaves the batch's entries pending: a restart loads the
state saved before it, reads its own pending entries again (XREADGROUP from 0), acknowledges those at or
before the saved last id without judging them, and judges the others again from that state, giving the same
events under the same keys. Hence at least once, never an event missing.

Jobs without zones or lines cost no decoding: their entries are acknowledged unread. On the terminal entry
the job's alerts stream and state are set to expire with its results (results_ttl_s) and the job is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import msgspec
import redis

from producer.enqueue import lane_keys
from producer.zone_judge import FrameIn, JudgeState, ObjectMask, Rules, ZoneJudge
from producer.zones import ZoneSet
from runtime.settings import Settings
from schemas import alerts, messages
from schemas.alerts import AlertEvent
from schemas.errors import SchemaError, ZoneError
from schemas.names import EVENTS_MAXLEN, TERMINAL_ENTRY_ID, TERMINAL_STATES

log = logging.getLogger(__name__)

READ_COUNT = 64  # result entries a step reads, at most
IDLE, BUSY, WAITING, ENDED, GONE = "idle", "busy", "waiting", "ended", "gone"


class Saved(msgspec.Struct):
    """What `Keys.zone_state` holds (JSON)."""

    v: int = 1
    last_id: str = "0-0"  # the last result entry judged
    fps: float | None = None  # the job's frame rate (file jobs' t_s), once looked up
    t0: float | None = None  # live frames without a timestamp: captured_at of the first one judged (t_s 0)
    judge: JudgeState = msgspec.field(default_factory=JudgeState)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def job_fps(client: redis.Redis, settings: Settings, job_id: str) -> float | None:
    """A job's frame rate: its hash's `fps`, else its job message's (on vseg:jobs while the job runs)."""
    keys = settings.keys
    fps, entry_id, lane = cast(list[bytes | None], client.hmget(keys.job(job_id), ["fps", "entry_id", "lane"]))
    if fps:
        return float(fps)
    if not entry_id:
        return None
    for _id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]],
                            client.xrange(lane_keys(keys, lane).jobs, min=_text(entry_id), max=_text(entry_id),
                                          count=1)):
        try:
            msg = messages.decode(fields)
        except SchemaError:
            return None
        if isinstance(msg, messages.JobMessage) and msg.job_id == job_id and msg.fps > 0:
            return msg.fps
    return None


class JobFollower:
    """One job's result stream, judged batch by batch (see the module doc). `step()` says what happened:
    BUSY (entries handled), IDLE (none new), WAITING (the stream is not there yet), ENDED (its terminal entry
    was handled), GONE (the job's keys are gone: expired, or Redis was emptied). A Redis error propagates;
    `reset()` then makes the next step load the saved state and read the pending entries again."""

    def __init__(self, client: redis.Redis, settings: Settings, job_id: str, *, group: str, consumer: str,
                 on_event: Callable[[AlertEvent], None] = lambda e: None) -> None:
        self.client, self.settings, self.job_id = client, settings, job_id
        self.group, self.consumer, self.on_event = group, consumer, on_event
        keys = settings.keys
        self.stream, self.job_key = keys.results(job_id), keys.job(job_id)
        self.state_key, self.alerts_key = keys.zone_state(job_id), keys.job_alerts(job_id)
        self.rules = Rules.of(settings)
        self.saved = Saved()
        self.judge = ZoneJudge(job_id, self.rules, state=self.saved.judge)
        self.loaded = False
        self.read_from = "0"
        self._zones: tuple[Any, ZoneSet] = (None, ZoneSet())

    def reset(self) -> None:
        self.loaded = False

    def _load(self) -> str:
        if not self.client.exists(self.stream):
            state = self.client.hget(self.job_key, "state")
            return GONE if state is None or _text(state) in TERMINAL_STATES else WAITING
        try:
            self.client.xgroup_create(self.stream, self.group, id="0")
        except redis.ResponseError as e:
            if "requires the key to exist" in str(e):  # expired just now
                return GONE
            if "BUSYGROUP" not in str(e):
                raise
        raw = self.client.get(self.state_key)
        self.saved = Saved()
        if raw:
            try:
                self.saved = msgspec.json.decode(raw, type=Saved)
            except msgspec.MsgspecError as e:
                log.error("job %s: its saved zone state does not decode (%s): judging from a fresh state", self.job_id, e)
        self.judge = ZoneJudge(self.job_id, self.rules, camera=self.judge.camera, state=self.saved.judge)
        self.loaded, self.read_from = True, "0"
        return IDLE

    def step(self) -> str:
        if not self.loaded:
            loaded = self._load()
            if loaded != IDLE:
                return loaded
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.job_key, ["zones", "camera"])
        pipe.xreadgroup(self.group, self.consumer, {self.stream: self.read_from}, count=READ_COUNT)
        (zones_raw, camera), reply = pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            if isinstance(reply, redis.ResponseError) and ("NOGROUP" in str(reply) or "no such key" in str(reply)):
                log.warning("job %s: the group %s on %s is gone: making it again", self.job_id, self.group, self.stream)
                self.loaded = False
                return IDLE
            raise reply
        entries = [(_text(i), f) for i, f in (reply[0][1] if reply else [])]
        if self.read_from != ">":  # this consumer's pending entries first (a restart), then new ones
            self.read_from = entries[-1][0] if entries else ">"
            if not entries:
                return BUSY
        if not entries:
            return IDLE
        self.judge.camera = _text(camera) if camera else ""
        return self._handle(entries, self._zone_set(zones_raw))

    def _zone_set(self, raw: Any) -> ZoneSet:
        """The job's zones as its hash holds them now (parsed once per value; a malformed value keeps the last)."""
        if raw != self._zones[0]:
            try:
                self._zones = (raw, ZoneSet.from_json(raw))
                log.info("job %s: judging %d zones and %d lines from now on", self.job_id,
                         len(self._zones[1].zones), len(self._zones[1].lines))
            except ZoneError as e:
                log.error("job %s: its zones field is malformed (%s): still judging the previous ones", self.job_id, e)
                self._zones = (raw, self._zones[1])
        return self._zones[1]

    def _handle(self, entries: list[tuple[str, Any]], zones: ZoneSet) -> str:
        events: list[AlertEvent] = []
        judged = terminal = False
        last = id_tuple(self.saved.last_id)
        for entry_id, fields in entries:
            if entry_id == TERMINAL_ENTRY_ID:
                terminal = True
            elif fields and zones and id_tuple(entry_id) > last and fields.get(b"type") == b"frame":
                frame = self._frame(entry_id, fields)
                try:
                    events += self.judge.judge(frame, zones) if frame is not None else []
                except ValueError as e:  # masks of another size than the frame's: judged as if it had none
                    log.error("job %s: skipping frame entry %s: %s", self.job_id, entry_id, e)
                judged = judged or frame is not None
        if not zones and self.judge.state.objects:
            self.judge.state = self.saved.judge = JudgeState()  # no zones now: a zone set later starts afresh
            judged = True
        frames = [i for i, _ in entries if i != TERMINAL_ENTRY_ID]
        if judged and frames:
            self.saved.last_id = max(frames, key=id_tuple)
        self._publish(events, [i for i, _ in entries], judged, terminal)
        return ENDED if terminal else BUSY

    def _frame(self, entry_id: str, fields: Any) -> FrameIn | None:
        try:
            msg = messages.decode(fields)
        except SchemaError as e:
            log.error("job %s: skipping undecodable entry %s: %s", self.job_id, entry_id, e)
            return None
        if not isinstance(msg, messages.FrameResult) or msg.skipped:
            return None
        objects = [ObjectMask(o.obj_id, o.mask, o.label) for o in msg.objects]
        height, width = (int(v) for v in msg.objects[0].mask["size"]) if msg.objects else (0, 0)
        return FrameIn(msg.frame_idx, self._t_s(msg), width, height, objects, msg.captured_at)

    def _t_s(self, msg: messages.FrameResult) -> float:
        """Video time: a live frame's timestamp (else seconds since the first frame judged), a file frame's
        frame_idx / fps."""
        if msg.pts_s is not None:
            return msg.pts_s
        if msg.captured_at is not None:
            self.saved.t0 = msg.captured_at if self.saved.t0 is None else self.saved.t0
            return msg.captured_at - self.saved.t0
        if self.saved.fps is None:
            self.saved.fps = job_fps(self.client, self.settings, self.job_id)
            if self.saved.fps is None:
                log.warning("job %s: its frame rate is unknown (its job entry is gone): t_s and dwell times count "
                            "frames as seconds", self.job_id)
                self.saved.fps = 1.0
        return msg.frame_idx / self.saved.fps

    def _publish(self, events: list[AlertEvent], ids: list[str], judged: bool, terminal: bool) -> None:
        keys, ttl_s = self.settings.keys, self.settings.results_ttl_s
        encoded = [alerts.encode(e) for e in events]
        if encoded:  # the shared stream first: the job's own pipeline below acknowledges the entries
            pipe = self.client.pipeline(transaction=False)
            for fields in encoded:
                pipe.xadd(keys.alerts, cast(Any, fields), maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for fields in encoded:
            pipe.xadd(self.alerts_key, cast(Any, fields), maxlen=EVENTS_MAXLEN, approximate=True)
        if judged:
            pipe.set(self.state_key, msgspec.json.encode(self.saved))
        if terminal:
            pipe.expire(self.alerts_key, ttl_s)
            pipe.expire(self.state_key, ttl_s)
        pipe.xack(self.stream, self.group, *ids)
        pipe.execute()
        for event in events:
            self.on_event(event)
