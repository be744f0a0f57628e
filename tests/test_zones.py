"""Zones and lines (producer/zones.py) as a user gives them: the command line's specs, cameras.yaml's maps,
the viewer's JSON; every mistake is one line saying what to write instead; checked against the frame."""

from __future__ import annotations

import pytest

from producer.zones import Line, Zone, ZoneSet, from_config, parse_line, parse_zone, parse_zones
from schemas.errors import PromptError, ZoneError


def test_specs_give_zones_and_lines_and_json_round_trips() -> None:
    zones = parse_zones(["door:0,0,100,0,100,50"], ["gate:0,40.5,96,40.5"])
    assert zones.zones == (Zone("door", ((0, 0), (100, 0), (100, 50))),)
    assert zones.lines == (Line("gate", (0, 40.5), (96, 40.5)),)
    assert ZoneSet.from_json(zones.to_json()) == zones
    assert ZoneSet.from_dict(zones.to_dict()) == zones
    assert ZoneSet.from_json(None) == ZoneSet() and not ZoneSet()
    assert from_config({"door": [[0, 0], [100, 0], [100, 50]]}, {"gate": [[0, 40.5], [96, 40.5]]}, "f") == zones


@pytest.mark.parametrize("zones, lines, says", [
    (["door"], [], "write --zone NAME:x,y,x,y,x,y"),
    (["door:0,0,1,1"], [], "3 points or more"),
    (["door:0,0,1,1,2"], [], "3 points or more"),
    (["door:0,0,a,1,2,2"], [], "must be numbers"),
    (["door:0,0,1,1,2,2"], [], "enclose no area"),
    (["bad name:0,0,10,0,10,10"], [], "letters, digits"),
    (["a:0,0,10,0,10,10"], ["a:0,0,5,5"], "two zones or lines"),
    ([], ["gate:0,0,5"], "two points, 4 numbers"),
    ([], ["gate:1,1,1,1"], "the same"),
])
def test_each_mistake_is_one_line_saying_what_to_write(zones: list[str], lines: list[str], says: str) -> None:
    with pytest.raises(ZoneError, match=says) as caught:
        parse_zones(zones, lines)
    assert "\n" not in str(caught.value) and isinstance(caught.value, PromptError)


def test_a_point_outside_the_frame_is_refused_naming_it() -> None:
    zones = parse_zones(["door:0,0,100,0,100,50"])
    assert zones.check(100, 50) is zones
    with pytest.raises(ZoneError, match=r"zone door: point \(100, 0\) lies outside the 96x64 frame"):
        zones.check(96, 64)
    with pytest.raises(ZoneError, match="line gate"):
        ZoneSet(lines=(parse_line("gate:0,0,97,0"),)).check(96, 64)


@pytest.mark.parametrize("raw, says", [
    ([], "must be {"),
    ({"zones": [{"name": "a"}]}, '"points"'),
    ({"zones": [{"name": "a", "points": [[0, 0], [1, "x"], [2, 2]]}]}, "not a point"),
    ({"zones": [{"name": "a", "points": [[0, 0], [float("nan"), 1], [2, 2]]}]}, "not a finite point"),
    ({"zones": "a"}, "must be a list"),
    ({"other": []}, "must be {"),
])
def test_the_viewers_json_is_checked(raw: object, says: str) -> None:
    with pytest.raises(ZoneError, match=says):
        ZoneSet.from_dict(raw)
    with pytest.raises(ZoneError, match="not valid JSON"):
        ZoneSet.from_json("{")


def test_config_maps_say_where() -> None:
    with pytest.raises(ZoneError, match=r"cameras.yaml: camera 'gate', field zones: a map"):
        from_config([[0, 0]], None, "cameras.yaml: camera 'gate'")
    with pytest.raises(ZoneError, match="cameras.yaml: camera 'gate', field lines: line x: a line is 2 points"):
        from_config(None, {"x": [[0, 0]]}, "cameras.yaml: camera 'gate'")
    assert parse_zone("z:1,1,5,1,5,5").name == "z"
