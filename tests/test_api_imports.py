"""The Python API imported exactly as `producer/__init__.py`'s docstring and the README show it: every name is
what it says (a function or class, never a submodule of the same name), in a fresh interpreter, whatever was
imported before it (the command line, every submodule), and `submit` works twice in one process."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.settings import Settings
from schemas import messages
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


def readme_python(section: str, block: int = 0) -> str:
    """The `block`-th ```python block of the README section titled `section`."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"\n## {section}\n"):]
    body = body[:body.find("\n## ", 1)]
    blocks = body.split("```python\n")[1:]
    return blocks[block][:blocks[block].index("\n```")]


README_URL = "redis://localhost:6379/0"


def run_twice_beside_match_mp4(code: str, settings: Settings, tmp_path: Path,
                               num_frames: int) -> subprocess.CompletedProcess[str]:
    """A README example, only its Redis URL swapped for the test's, run twice in one interpreter from a folder
    holding a 640x480 `match.mp4` of `num_frames` frames, against a worker; it must exit 0."""
    from tests.workers import WorkerProcess, stop_all

    make_video(tmp_path / "match.mp4", num_frames=num_frames, size_wh=(640, 480), fps=10)
    program = "\n".join([f"exec({code.replace(README_URL, settings.redis_url)!r})"] * 2)
    worker = WorkerProcess(settings, "w-readme", tmp_path, delay_s=0.0)
    try:
        done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                              timeout=180, env={**worker_env(settings), "PYTHONPATH": str(ROOT)})
    finally:
        stop_all(worker)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.integration
def test_the_readmes_python_quickstart_runs_as_shown_twice(settings: Settings, tmp_path: Path) -> None:
    """The quickstart's code, with only its Redis URL swapped for the test's, run twice in one interpreter
    from a folder holding `match.mp4`, against a worker."""
    code = readme_python("Python quickstart")
    assert code.count("\n") <= 10 and README_URL in code
    done = run_twice_beside_match_mp4(code, settings, tmp_path, num_frames=8)
    lines = done.stdout.splitlines()
    assert sum(line.startswith("Completed(") for line in lines) == 2, done.stdout[-2000:]
    assert sum(line.startswith("0 1 ") for line in lines) == 2  # frame 0, object 1, printed by each run


@pytest.mark.integration
def test_the_readmes_consumer_quickstart_prints_each_jobs_end_once(settings: Settings, tmp_path: Path) -> None:
    from producer import Client
    from tests.workers import LoggedProcess, WorkerProcess, stop_all, wait_for

    code = readme_python("Consumer quickstart").replace(README_URL, settings.redis_url)
    consumer = LoggedProcess([sys.executable, "-c", code], {**worker_env(settings), "PYTHONPATH": str(ROOT)},
                             tmp_path, "consumer")
    video = make_video(tmp_path / "v.mp4", num_frames=6, size_wh=SIZE, fps=10)
    worker = WorkerProcess(settings, "w-consumer", tmp_path, delay_s=0.0)
    try:
        with Client(settings) as client:
            wait_for(lambda: client.redis.exists(settings.keys.events), 30, "the consumer's group")
            jobs = [client.submit(video, [disc_prompt(1, 0, 6, SIZE)]) for _ in range(2)]
            for job in jobs:
                job.wait(timeout_s=60)
            client.redis.xadd(settings.keys.events, cast(Any, messages.encode(job.wait())))  # a duplicate copy
            wait_for(lambda: all(f"{j.id} completed" in consumer.log() for j in jobs), 30, "both ends printed")
            time.sleep(1.0)
    finally:
        consumer.kill()
        stop_all(worker)
    ends = [line for line in consumer.log().splitlines() if " completed " in line]
    assert sorted(line.split()[0] for line in ends) == sorted(j.id for j in jobs), consumer.log()


@pytest.mark.integration
def test_the_readmes_async_example_runs_as_shown_twice(settings: Settings, tmp_path: Path) -> None:
    code = readme_python("Consumer quickstart", block=1)
    assert "AsyncClient" in code and README_URL in code
    done = run_twice_beside_match_mp4(code, settings, tmp_path, num_frames=6)
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["6", "6"], done.stdout
    assert done.stdout.count("Completed(") == 2
