"""Fixtures shared by the test tiers.

`predictor`: SAM 2.1 tiny with random weights (seed 0) on the CPU at image size 256, one per test module
(the e2e tier's model: tests compare our driver with it bit for bit).

Integration tests get a real redis-server that the tests start on a free port (never the shared one
on 6379), flushed before each test, plus a Settings object pointing at it and at a temporary
STORAGE_ROOT. No worker subprocess (tests/workers.py) outlives the test that started it.

`video` (one per test module) and `prompt` are the test module's disc clip (tests/videos.py) and a point
on its disc on frame 0, both made from the module's constants N (frames) and SIZE (w, h).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.local_redis import RedisServer
from runtime.settings import Settings
from schemas.prompts import ObjectPrompt


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test() -> Iterator[None]:
    """Workers a test started and left running (an assertion failed before its `finally`) are killed, so
    that they do not claim the next test's jobs or load the machine for the rest of the run."""
    yield
    from tests.workers import kill_leftovers

    left = kill_leftovers()
    if left:
        import logging

        logging.getLogger("tests").warning("killed workers the test left running: %s", ", ".join(left))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    root = tmp_path / "storage"
    root.mkdir()
    return root


@pytest.fixture
def settings(redis_server: RedisServer, storage_root: Path, tmp_path: Path) -> Settings:
    return Settings.load(
        environ={}, redis_url=redis_server.url, storage_root=storage_root, checkpoint_dir=tmp_path / "ckpt",
        block_ms=200, progress_every=5,
        live_preview_height=0,  # the viewer's preview of live jobs: on where a test asks (tests/test_preview.py)
    )


@pytest.fixture(scope="module")
def predictor() -> object:
    import torch

    from worker.model.sam2.checkpoints import build_predictor, get_preset

    torch.manual_seed(0)
    return build_predictor(get_preset("tiny"), None, device="cpu", image_size=256)


def _clip_constants(request: pytest.FixtureRequest) -> tuple[int, tuple[int, int]]:
    module = request.module
    missing = [name for name in ("N", "SIZE") if not hasattr(module, name)]
    if missing:
        pytest.fail(f"{module.__name__} uses the `{request.fixturename}` fixture (tests/conftest.py) but does "
                    f"not define {' and '.join(missing)}: set N = <frames> and SIZE = (<width>, <height>) at "
                    "module level", pytrace=False)
    return module.N, module.SIZE


@pytest.fixture(scope="module")
def video(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test module's clip, made once per module with `make_video` from its module-level constants:
    N (frames) and SIZE ((w, h)), both required, FPS (default 10) and DRAW (default None: `make_video`'s
    `draw`, e.g. `DRAW = draw_entering_square(N, SIZE)`). A module with another clip defines its own
    `video` fixture, which overrides this one."""
    from tests.videos import make_video

    n, size = _clip_constants(request)
    return make_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=n, size_wh=size,
                      fps=getattr(request.module, "FPS", 10), draw=getattr(request.module, "DRAW", None))


@pytest.fixture
def prompt(request: pytest.FixtureRequest) -> list[ObjectPrompt]:
    """One foreground point (object 1) on the disc of the module's `video` on frame 0: the disc's centre
    (`disc_center(0, N, SIZE)`), from the module's N and SIZE."""
    from tests.videos import disc_prompt

    n, size = _clip_constants(request)
    return [disc_prompt(1, 0, n, size)]
