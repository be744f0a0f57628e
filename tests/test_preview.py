"""A live job's preview (producer/preview.py): every captured frame as rolling HLS, each segment's
PROGRAM-DATE-TIME the capture time of its first frame (the viewer matches result frames by it), bounded,
upright, and never a cost to the job: a failure stops the preview, not the job."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path

import av
import numpy as np
import pytest
import redis

from producer.live_submit import submit_live
from producer.orientation import Orientation
from producer.preview import PreviewWriter, preview_size
from runtime.settings import Settings
from tests.videos import disc_prompt
from tests.workers import wait_for

FPS = 30
N = 60
SIZE = (96, 64)


def frame(k: int, w: int = 64, h: int = 48) -> av.VideoFrame:
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (k * 3) % 256
    return av.VideoFrame.from_ndarray(image, format="bgr24")


def stamps(playlist: Path) -> list[tuple[float, str]]:
    text = playlist.read_text()
    dates = re.findall(r"#EXT-X-PROGRAM-DATE-TIME:(\S+)\n#EXTINF:[\d.]+,\n(\S+)", text)
    return [(datetime.fromisoformat(d.replace("Z", "+00:00")).timestamp(), name) for d, name in dates]


def test_segments_carry_the_capture_time_of_their_first_frame(tmp_path: Path) -> None:
    writer = PreviewWriter(tmp_path, width=64, height=48, orientation=Orientation(), segment_s=1.0, window=3, fps=10)
    t0 = 1_780_000_000.25
    captured = [t0 + k * 0.1 for k in range(25)] + [t0 + 2.5 + 3.0 + k * 0.1 for k in range(15)]  # a 3 s gap
    for k, at in enumerate(captured):
        writer.write(frame(k), at)
    writer.close()
    listed = stamps(tmp_path / "index.m3u8")
    assert len(listed) == 3  # the window: older segments deleted
    assert sorted(p.name for p in tmp_path.glob("*.ts")) == sorted(name for _, name in listed)
    firsts = [captured[0]]
    for at in captured[1:]:
        if at - firsts[-1] >= 1.0:
            firsts.append(at)
    assert [round(s, 3) for s, _ in listed] == [round(s, 3) for s in firsts[-3:]]
    text = (tmp_path / "index.m3u8").read_text()
    assert text.rstrip().endswith("#EXT-X-ENDLIST") and "#EXT-X-MEDIA-SEQUENCE:" in text
    with av.open(str(tmp_path / "index.m3u8")) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == sum(1 for at in captured if at >= firsts[-3])
    assert (decoded[0].width, decoded[0].height) == (64, 48)


def test_the_preview_is_upright_and_scaled(tmp_path: Path) -> None:
    assert preview_size(1920, 1080, 480) == (854, 480) and preview_size(96, 64, 480) == (96, 64)
    turned = Orientation(transpose=True, flip_cols=True)  # stored 64x48, shown 48x64
    writer = PreviewWriter(tmp_path, width=48, height=64, orientation=turned, max_height=32, segment_s=1.0, fps=10)
    for k in range(12):
        writer.write(frame(k), 100.0 + k * 0.1)
    writer.close()
    with av.open(str(tmp_path / "index.m3u8")) as container:
        first = next(container.decode(video=0)).to_ndarray(format="gray")
    assert first.shape == (32, 24)


def test_a_failure_stops_the_preview_not_the_caller(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = PreviewWriter(tmp_path / "p", width=64, height=48, orientation=Orientation(), segment_s=1.0, fps=10)
    writer.write(frame(0), 1.0)
    shutil.rmtree(tmp_path / "p")
    (tmp_path / "p").write_text("")  # the folder is gone, a file in its place: no segment can be written
    for k in range(1, 25):
        writer.write(frame(k), 1.0 + k * 0.1)
    writer.close()
    assert writer.failed and "live preview" in caplog.text and "the job goes on" in caplog.text


@pytest.mark.integration
def test_a_live_job_has_a_preview_of_every_captured_frame(video: Path, settings: Settings,
                                                           redis_client: redis.Redis) -> None:
    live = dataclasses.replace(settings, live_segment_s=1.0, live_playlist_size=10, max_latency_s=0.5,
                               live_preview_height=480)
    done = threading.Event()

    def ingest() -> None:
        submit_live(video, [disc_prompt(1, 0, N, SIZE)], settings=live, job_id="cam-1", realtime=True)
        done.set()

    threading.Thread(target=ingest, daemon=True).start()
    wait_for(done.is_set, 30, "the ingest of the 2 s clip")  # no worker: the buffer drops, the preview does not
    rel = redis_client.hget(live.keys.job("cam-1"), "preview")
    assert rel == b"jobs/cam-1/preview/index.m3u8"
    playlist = live.storage_root / rel.decode()
    with av.open(str(playlist)) as container:
        assert sum(1 for _ in container.decode(video=0)) == N
    assert int(redis_client.hget(live.keys.job("cam-1"), "dropped_at_ingest") or 0) > 0
    assert stamps(playlist)[0][0] == pytest.approx(time.time() - 2, abs=5)
