"""Unit tier: prompt syntax on the command line and in JSON files."""

from __future__ import annotations

import json
from contextlib import nullcontext as does_not_raise
from pathlib import Path
from typing import Any

import pytest

from producer.prompts import build_prompts, parse_box, parse_point
from schemas.errors import PromptError
from schemas.prompts import ObjectPrompt


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("1:100,200", (1, 0, (100.0, 200.0), 1)),
        ("2:10.5,20:0@5", (2, 5, (10.5, 20.0), 0)),
        ("3:7,8:1", (3, 0, (7.0, 8.0), 1)),
        ("4:.5,1.@12", (4, 12, (0.5, 1.0), 1)),
        (" 5 : 1 , 2 ", (5, 0, (1.0, 2.0), 1)),
    ],
)
def test_good_points(spec: str, expected: tuple[Any, ...]) -> None:
    assert parse_point(spec) == expected


@pytest.mark.parametrize("spec", ["", "1", "1:2", "x:1,2", "1:1,2:2", "1:1,2@", "1:1,2@-3", "-1:1,2", "1:a,b",
                                  "1:1,2,3", "1:1,2:1:0"])
def test_bad_points_say_the_syntax(spec: str) -> None:
    with pytest.raises(PromptError, match=r"bad --point .*expected OBJ:X,Y\[:LABEL\]\[@FRAME\]"):
        parse_point(spec)


@pytest.mark.parametrize(
    "spec, expectation",
    [
        ("3:0,0,50,60@2", does_not_raise()),
        ("1:1.5,2,30,40", does_not_raise()),
        ("1:1,2,3", pytest.raises(PromptError, match=r"expected OBJ:X0,Y0,X1,Y1")),
        ("1:1,2,3,4,5", pytest.raises(PromptError, match="bad --box")),
        ("box", pytest.raises(PromptError, match="bad --box")),
    ],
)
def test_boxes(spec: str, expectation: Any) -> None:
    with expectation:
        parse_box(spec)


def test_points_and_box_for_one_object_and_frame_become_one_prompt() -> None:
    prompts = build_prompts(points=["1:10,20", "1:5,5:0", "2:1,2@3"], boxes=["1:0,0,30,30"])
    assert prompts == [
        ObjectPrompt(1, 0, ((10.0, 20.0), (5.0, 5.0)), (1, 0), (0.0, 0.0, 30.0, 30.0)),
        ObjectPrompt(2, 3, ((1.0, 2.0),), (1,)),
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"boxes": ["1:0,0,5,5", "1:1,1,6,6"]}, "two boxes on frame 0"),
        ({"boxes": ["1:5,5,1,1"]}, "X1 > X0"),
    ],
)
def test_bad_combinations(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(PromptError, match=match):
        build_prompts(**kwargs)


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([
        {"obj_id": 1, "points": [[10, 20]]},
        {"obj_id": 2, "frame_idx": 4, "box": [0, 0, 8, 8], "points": [[2, 2], [3, 3]], "labels": [1, 0]},
        {"obj_id": 3, "points_xy": [[1, 1]], "labels": [1], "box_xyxy": [0, 0, 2, 2]},
    ]))
    prompts = build_prompts(json_file=path, points=["1:11,21"])
    assert prompts[0] == ObjectPrompt(1, 0, ((11.0, 21.0), (10.0, 20.0)), (1, 1))
    assert prompts[1] == ObjectPrompt(3, 0, ((1.0, 1.0),), (1,), (0.0, 0.0, 2.0, 2.0))
    assert prompts[2] == ObjectPrompt(2, 4, ((2.0, 2.0), (3.0, 3.0)), (1, 0), (0.0, 0.0, 8.0, 8.0))


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "prompts file not found"),
        ("{not json", "not valid JSON"),
        ('{"obj_id": 1}', "must hold a JSON list"),
        ("[1]", "expected an object"),
        ('[{"points": [[1, 2]]}]', "missing obj_id"),
        ('[{"obj_id": 1, "points": [[1, 2]], "labels": [1, 1]}]', "1 points but 2 labels"),
        ('[{"obj_id": "one", "points": [[1, 2]]}]', "obj_id must be an integer"),
    ],
)
def test_bad_json_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptError, match=match):
        build_prompts(json_file=path)
