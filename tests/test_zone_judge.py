"""The zone judge (producer/zone_judge.py) on synthetic masks: enter and leave, a mask flickering on a zone's edge
gives no event, line crossings both ways with their direction (and none round a line's end or on its margin),
dwell once per stay, confirmation frames, an object gone leaves, a zone set changed mid-job, masks as arrays or
RLE alike, and the state's JSON round trip resuming exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec
import numpy as np
import pytest

from producer.zone_judge import FrameIn, ObjectMask, Rules, ZoneJudge, centroid, zone_raster
from producer.zones import ZoneSet, parse_zones
from schemas import alerts
from schemas.alerts import AlertEvent
from schemas.rle import encode_mask

W, H, FPS = 100, 60, 10.0
RIGHT = parse_zones(["right:50,0,100,0,100,60,50,60"])  # columns 50..99
MIDLINE = parse_zones(lines=["mid:50,0,50,60"])  # walking down the picture: its left is x > 50


def box(x0: int, y0: int = 25, w: int = 10, h: int = 10) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[max(y0, 0):y0 + h, max(x0, 0):x0 + w] = True
    return mask


def frames(positions: Iterable[int | None], obj_id: int = 1, start: int = 0) -> list[FrameIn]:
    """One object as a 10x10 box at x = each position (None: absent from the frame)."""
    return [FrameIn(start + i, (start + i) / FPS, W, H, [] if x is None else [ObjectMask(obj_id, box(x))])
            for i, x in enumerate(positions)]


def judge_all(judge: ZoneJudge, seq: Sequence[FrameIn], zones: ZoneSet) -> list[AlertEvent]:
    return [e for f in seq for e in judge.judge(f, zones, at=1.0)]


def brief(events: Iterable[AlertEvent]) -> list[tuple[str, str, int]]:
    return [(e.type, e.zone, e.frame_idx) for e in events]


def new(**rules: float) -> ZoneJudge:
    return ZoneJudge("job1", Rules(**{"confirm_frames": 2, "dwell_s": 100.0, **rules}), camera="gate")  # type: ignore[arg-type]


def test_the_raster_takes_a_pixel_whose_centre_is_inside() -> None:
    mask, rle = zone_raster(RIGHT.zones[0].points, W, H)
    assert mask[:, 50:].all() and not mask[:, :50].any()
    assert np.array_equal(np.asarray(__import__("pycocotools.mask").mask.decode(dict(rle)), bool), mask)
    assert centroid(box(10, 20, 4, 2)) == (12.0, 21.0)
    assert centroid(np.zeros((H, W), bool)) is None


def test_enter_then_leave_stamped_at_the_first_frame_of_each_change() -> None:
    judge = new()
    # x 30: 0 inside; x 45: 5 of 10 columns inside (0.5, enter); x 70 inside; x 42: 0.2 < 0.25 (out)
    events = judge_all(judge, frames([30, 30, 45, 70, 70, 70, 42, 30, 30]), RIGHT)
    assert brief(events) == [("zone_enter", "right", 2), ("zone_leave", "right", 6)]
    enter, leave = events
    assert enter.overlap == 0.5 and enter.t_s == pytest.approx(0.2) and enter.camera == "gate" and enter.obj_id == 1
    assert enter.key == "job1:2:1:zone_enter:right" and enter.direction == "" and enter.dwell_s is None
    assert leave.overlap == pytest.approx(0.2) and leave.dwell_s == pytest.approx(0.4)


def test_a_mask_flickering_on_an_edge_gives_no_event() -> None:
    judge = new()
    # outside, the mask jumps in and out every frame: never two frames in a row, so never confirmed
    assert judge_all(judge, frames([45, 30] * 5), RIGHT) == []
    # inside, it wobbles on the edge between 0.3 and 0.6: above the leave threshold (0.25), so it stays in
    events = judge_all(judge, frames([45, 45] + [43, 46] * 6, start=10), RIGHT)
    assert brief(events) == [("zone_enter", "right", 10)]
    # a real leave still comes
    assert brief(judge_all(judge, frames([30, 30], start=30), RIGHT)) == [("zone_leave", "right", 30)]


def test_confirm_frames_a_short_excursion_is_no_event_a_long_one_is_stamped_at_its_start() -> None:
    judge = new(confirm_frames=3)
    assert judge_all(judge, frames([30, 70, 70, 30, 30]), RIGHT) == []
    events = judge_all(judge, frames([70, 70, 70, 70], start=5), RIGHT)
    assert brief(events) == [("zone_enter", "right", 5)]
    assert judge_all(new(confirm_frames=1), frames([70]), RIGHT)[0].frame_idx == 0


def test_a_line_crossed_both_ways_with_its_direction() -> None:
    judge = new()
    there = judge_all(judge, frames([10, 20, 30, 40, 50, 60, 70, 80]), MIDLINE)
    assert brief(there) == [("line_cross", "mid", 4)] and there[0].direction == "out"  # right to left
    assert there[0].key == "job1:4:1:line_cross:mid" and there[0].overlap is None
    back = judge_all(judge, frames([70, 60, 50, 40, 30, 20], start=8), MIDLINE)
    assert brief(back) == [("line_cross", "mid", 11)] and back[0].direction == "in"
    # the other way round the line's points swaps the directions
    flipped = judge_all(new(), frames([10, 30, 50, 70, 80]), parse_zones(lines=["mid:50,60,50,0"]))
    assert [e.direction for e in flipped] == ["in"]


def test_on_the_line_keeps_the_side_and_wobbling_across_it_is_no_crossing() -> None:
    judge = new(line_margin_px=4.0)
    # centroid x = position + 5: 47, 51, 48, 53 are within 4 px of x 50: on the line, the side stays the right
    events = judge_all(judge, frames([30, 42, 46, 43, 48, 42, 48, 42, 30]), MIDLINE)
    assert events == [] and judge.state.objects[1].lines["mid"].side == 1
    # past the margin on both sides, one frame each: never held two frames, so no crossing
    assert judge_all(judge, frames([39, 51, 39, 51, 39, 51, 30], start=9), MIDLINE) == []


def test_passing_round_the_end_of_a_line_segment_is_no_crossing() -> None:
    short = parse_zones(lines=["stub:50,0,50,15"])  # the box's centre is at y 30: it passes below the stub
    judge = new()
    assert judge_all(judge, frames([10, 30, 50, 70, 90]), short) == []
    assert judge.state.objects[1].lines["stub"].side == -1  # its side did change: coming back is no crossing either
    assert judge_all(judge, frames([70, 50, 30, 10], start=5), short) == []


def test_dwell_once_per_stay_and_the_leave_says_how_long_it_lasted() -> None:
    judge = new(dwell_s=1.0)
    stay = [30] + [70] * 25 + [30, 30]  # in from frame 1 (t 0.1) to frame 26 (t 2.6)
    events = judge_all(judge, frames(stay), RIGHT)
    assert brief(events) == [("zone_enter", "right", 1), ("dwell", "right", 11), ("zone_leave", "right", 26)]
    assert events[1].dwell_s == pytest.approx(1.0) and events[2].dwell_s == pytest.approx(2.5)
    again = judge_all(judge, frames([70] * 12, start=40), RIGHT)  # a second stay: a dwell of its own
    assert brief(again) == [("zone_enter", "right", 40), ("dwell", "right", 50)]


def test_an_object_gone_from_the_frame_leaves_and_is_forgotten() -> None:
    judge = new()
    events = judge_all(judge, frames([70, 70, None, None, None]), RIGHT)
    assert brief(events) == [("zone_enter", "right", 0), ("zone_leave", "right", 2)]
    assert events[1].overlap == 0.0 and judge.state.objects == {}


def test_an_empty_mask_is_outside_every_zone_and_keeps_its_side_of_a_line() -> None:
    judge = new()
    empty = FrameIn(3, 0.3, W, H, [ObjectMask(1, np.zeros((H, W), bool))])
    zones = ZoneSet(RIGHT.zones, MIDLINE.lines)
    before = judge_all(judge, frames([70, 70, 70]), zones)
    assert brief(before) == [("zone_enter", "right", 0)]
    assert brief(judge_all(judge, [empty, *frames([None], start=4)], zones)) == [("zone_leave", "right", 3)]
    assert 1 not in judge.state.objects


def test_several_objects_in_object_order() -> None:
    judge = new(confirm_frames=1)
    seq = [FrameIn(0, 0.0, W, H, [ObjectMask(2, box(70)), ObjectMask(1, box(80))])]
    assert [(e.obj_id, e.type) for e in judge_all(judge, seq, RIGHT)] == [(1, "zone_enter"), (2, "zone_enter")]


def test_masks_as_rle_give_the_same_events_as_arrays() -> None:
    zones = ZoneSet(RIGHT.zones, MIDLINE.lines)
    positions = [10, 30, 45, 47, 60, 80, 60, 43, 20, 10]
    dense = judge_all(new(), frames(positions), zones)
    as_rle = [FrameIn(f.frame_idx, f.t_s, W, H, [ObjectMask(o.obj_id, encode_mask(o.mask)) for o in f.objects])
              for f in frames(positions)]
    assert judge_all(new(), as_rle, zones) == dense and len(dense) == 4


def test_a_mask_of_another_size_is_refused_saying_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"must be 60x100 .* but is 30x50"):
        new().judge(FrameIn(0, 0.0, W, H, [ObjectMask(1, np.ones((30, 50), bool))]), RIGHT)


def test_the_state_round_trips_through_json_and_resumes_exactly() -> None:
    zones = ZoneSet(RIGHT.zones, MIDLINE.lines)
    seq = frames([10, 30, 45, 60, 70, 70, 60, 43, 30, 10, 30, 60, 80])
    whole = judge_all(new(dwell_s=0.3), seq, zones)
    first = new(dwell_s=0.3)
    head = judge_all(first, seq[:7], zones)  # mid-way: a crossing confirmed, a run under way
    text = first.to_json()
    resumed = ZoneJudge.from_json("job1", Rules(confirm_frames=2, dwell_s=0.3), text, camera="gate")
    assert head + judge_all(resumed, seq[7:], zones) == whole
    assert {e.type for e in whole} == {"zone_enter", "zone_leave", "line_cross", "dwell"}
    with pytest.raises(msgspec.DecodeError):
        ZoneJudge.from_json("job1", Rules(), b"{not json")


def test_a_zone_set_changed_mid_job_is_judged_from_then_on() -> None:
    judge = new()
    assert brief(judge_all(judge, frames([20, 20, 20]), RIGHT)) == []
    left = parse_zones(["left:0,0,50,0,50,60,0,60"])
    # the viewer replaced the zones: the object is already inside the new one, so it enters it
    assert brief(judge_all(judge, frames([20, 20], start=3), left)) == [("zone_enter", "left", 3)]
    # the zone is gone: forgotten without an event; the object is in no zone now
    assert judge_all(judge, frames([20, 20], start=5), ZoneSet()) == []
    assert judge.state.objects[1].zones == {}
    # a line whose points changed starts afresh: its first side is where the object is, no crossing
    assert judge_all(judge, frames([20, 20], start=7), MIDLINE) == []
    moved = parse_zones(lines=["mid:10,0,10,60"])
    assert judge_all(judge, frames([20, 20], start=9), moved) == []
    assert judge.state.objects[1].lines["mid"].geom == (10.0, 0.0, 10.0, 60.0)


def test_events_encode_to_stream_fields_and_back() -> None:
    (event,) = judge_all(new(confirm_frames=1), frames([70]), RIGHT)
    fields = alerts.encode(event)
    assert fields["type"] == b"zone_enter" and fields["key"] == event.key.encode()
    assert alerts.decode(fields) == event
    assert msgspec.json.decode(alerts.to_json(event))["key"] == event.key
