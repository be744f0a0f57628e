"""The Python API imported exactly as `producer/__init__.py`'s docstring and the README show it: every name is
what it says (a function or class, never a submodule of the same name), in a fresh interpreter, whatever was
imported before it (the command line, every submodule), and `submit` works twice in one process."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.settings import Settings
from tests.videos import disc_prompt, make_video
from tests.workers import ROOT, worker_env

SIZE = (96, 64)


def documented_names() -> list[str]:
    """The names `from producer import ...` lines in the package docstring import."""
    doc = ast.get_docstring(ast.parse((ROOT / "producer" / "__init__.py").read_text())) or ""
    names = [n.strip() for line in re.findall(r"from producer import ([^#\n]+)", doc) for n in line.split(",")]
    assert len(names) >= 10, names
    return names


def test_every_documented_name_is_in_all_and_no_submodule_shadows_one() -> None:
    import producer

    names = documented_names()
    assert sorted(names) == sorted(producer.__all__)
    modules = {p.stem for p in (ROOT / "producer").glob("*.py")}
    assert not set(names) & modules, "a submodule named like an API name replaces it once imported"


@pytest.mark.parametrize("first", ["", "import producer.cli", "import producer.submission, producer.watching, "
                                                             "producer.results, producer.live_submit, producer.control"])
def test_the_documented_imports_give_the_functions_whatever_was_imported_first(first: str) -> None:
    names = documented_names()
    program = f"""
{first}
import types
from producer import {", ".join(names)}
first = [{", ".join(names)}]
import producer
from producer import {", ".join(names)}
again = [{", ".join(names)}]
for name, a, b in zip({names!r}, first, again):
    assert not isinstance(a, types.ModuleType) and callable(a), (name, a)
    assert a is b is getattr(producer, name), name
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.integration
def test_submit_imported_as_documented_is_called_twice(settings: Settings, tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", num_frames=6, size_wh=SIZE, fps=10)
    x, y = disc_prompt(1, 0, 6, SIZE).points_xy[0]
    program = f"""
from producer import submit, build_prompts
from runtime.settings import Settings
settings = Settings.load()
prompts = build_prompts(points=["1:{x:.0f},{y:.0f}"])
first = submit({str(video)!r}, prompts, settings=settings, job_id="twice-1")
second = submit({str(video)!r}, prompts, settings=settings, job_id="twice-2")
print(first.job_id, second.job_id)
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=worker_env(settings), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["twice-1", "twice-2"], done.stderr
