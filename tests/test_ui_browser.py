"""The web viewer in a real browser, as a person uses it: Debian's `chromium`, headless, driven by Selenium
through `chromedriver` (both from the system: no browser is ever downloaded; skipped, with the reason, where
either or selenium is missing).

- a live job (a file played as a camera, with its preview HLS) plays in the page through hls.js, its masks
  matched to the picture by capture time; a click on a still object adds it, and its mask is drawn;
- a running file job: a click on the frame shown adds an object there (the worker propagates it back over
  the frames it had done, as `update` entries) and its mask is drawn on the next frames as the video plays;
- a zone and a line drawn with the mouse and saved land in the job's hash; the events consumer (started
  after the job: it adopts the running job) judges the square entering the zone, and the page lists it;
- the page decodes COCO RLE exactly as pycocotools does;
- a screenshot of a job's page (always in the test's tmp folder; into docs/viewer.png, shown in the README,
  with VSEG_UPDATE_SCREENSHOT=1).

`window.vseg` (static/job.js) tells what was painted last (the result frame, the objects whose masks were
drawn); the canvas's pixels are read back too, where a mask must be."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
import redis

from producer.alerts import AlertsService
from producer.control import request_cancel, request_stop
from producer.live_submit import submit_live
from producer.submission import submit
from producer.ui.server import UiServer, start_ui
from producer.zones import ZoneSet, parse_zones
from runtime.settings import Settings
from schemas.prompts import ObjectPrompt
from schemas.rle import encode_mask
from tests.videos import disc_center, disc_prompt, make_video
from tests.workers import ROOT, start_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
W, H = 320, 240
SIDE = 50
MASK_ALPHA = 130  # static/overlay.js
PALETTE = {1: (0, 64, 255), 2: (255, 0, 255)}  # static/overlay.js: worker/output/draw.py's colours, as RGB
SCREENSHOT = ROOT / "docs" / "viewer.png"


def square_at(frame_idx: int, num_frames: int, moving: bool) -> tuple[int, int]:
    """Top-left corner of the blue square: still in the top right, or moving down the right side."""
    if not moving:
        return 240, 20
    return 240, int(10 + (H - SIDE - 20) * frame_idx / (num_frames - 1))


def clip(path: Path, num_frames: int, fps: int, *, moving: bool) -> Path:
    def draw(k: int, img: np.ndarray) -> None:
        x, y = square_at(k, num_frames, moving)
        cv2.rectangle(img, (x, y), (x + SIDE, y + SIDE), (255, 0, 0), -1)  # BGR: blue

    return make_video(path, num_frames=num_frames, size_wh=(W, H), fps=fps, draw=draw)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,800", "--hide-scrollbars",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def ui(settings: Settings) -> Iterator[UiServer]:
    with start_ui(settings, "127.0.0.1", 0) as server:
        yield server



def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def wait_js(driver: Any, condition: str, timeout_s: float, what: str) -> Any:
    """Poll a JS expression until it is truthy; its value. On timeout: what the page logged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = js(driver, f"try {{ return ({condition}); }} catch (e) {{ return null; }}")
        if value:
            return value
        time.sleep(0.1)
    logs = [e["message"] for e in driver.get_log("browser")]
    state = js(driver, "return JSON.stringify({url: location.href, painted: window.vseg && vseg.painted,"
                       " player: window.vseg && vseg.player(), notice: document.getElementById('notice')?.textContent,"
                       " error: document.getElementById('error')?.textContent, body: document.body.innerText.slice(0, 300)})")
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; page: {state}; log: {logs[-10:]}")


def click_at(driver: Any, x: float, y: float) -> None:
    """A mouse click on the picture at frame pixel (x, y)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "overlay")
    width, height = js(driver, "const b = arguments[0].getBoundingClientRect(); return [b.width, b.height]", canvas)
    ActionChains(driver).move_to_element_with_offset(canvas, x * width / W - width / 2,
                                                     y * height / H - height / 2).click().perform()


def pixel(driver: Any, x: float, y: float) -> list[int]:
    """The overlay canvas's RGBA at frame pixel (x, y): the masks only (the video is another element)."""
    return list(js(driver, "return Array.from(document.getElementById('overlay').getContext('2d')"
                           ".getImageData(arguments[0], arguments[1], 1, 1).data)", int(x), int(y)))


def assert_mask_colour(rgba: list[int], obj_id: int) -> None:
    r, g, b = PALETTE[obj_id]
    assert rgba[3] == MASK_ALPHA and max(abs(rgba[0] - r), abs(rgba[1] - g), abs(rgba[2] - b)) <= 3, (rgba, obj_id)


def open_job(driver: Any, ui: UiServer, job_id: str) -> None:
    driver.get(f"{ui.url}/jobs/{job_id}")
    wait_js(driver, "window.vseg && vseg.ready", 10, "the page to start")


def test_a_live_job_plays_its_preview_and_a_click_adds_an_object(browser: Any, ui: UiServer, settings: Settings,
                                                                  redis_client: redis.Redis, tmp_path: Path) -> None:
    n, fps = 600, 15  # 40 s of camera: far more than the test needs, stopped at its end
    settings = dataclasses.replace(settings, live_segment_s=1.0, max_latency_s=0.5, producer_ttl_s=3.0,
                                   live_preview_height=480)
    video = clip(tmp_path / "camera.mp4", n, fps, moving=False)
    producer = threading.Thread(target=lambda: submit_live(video, [disc_prompt(1, 0, n, (W, H))], settings=settings,
                                                           job_id="cam", realtime=True), daemon=True)
    producer.start()
    wait_for(lambda: redis_client.exists(settings.keys.job("cam")), 20, "the live job enqueued")
    worker = start_worker(settings, redis_client, delay_s=0.02, name="ui-worker")
    try:
        open_job(browser, ui, "cam")
        assert js(browser, "return vseg.player()") == "preview"
        painted = wait_js(browser, "vseg.painted && vseg.painted.obj_ids.includes(1) && vseg.painted", 20,
                          "the disc's mask over the playing preview")
        shown = js(browser, "return vseg.result(arguments[0])", painted["frame_idx"])
        # the result frame drawn is the one captured when the picture shown was (the preview's PROGRAM-DATE-TIME)
        assert abs(shown["captured_at"] - painted["shown"]["time"]) < 2 / fps, (shown, painted)
        x, y = square_at(0, n, moving=False)
        click_at(browser, x + SIDE / 2, y + SIDE / 2)  # a new object: @now, the still blue square
        wait_js(browser, "document.querySelector('#objects li[data-obj=\"2\"]')", 10, "object 2 in the list")
        wait_js(browser, "vseg.painted.obj_ids.includes(2)", 20, "object 2's mask drawn on the frames after it")
        assert "object 2 added from frame" in browser.find_element("id", "notice").text
        browser.execute_script("vseg.pause()")
        time.sleep(0.3)
        assert 2 in js(browser, "return vseg.painted.obj_ids")
        assert_mask_colour(pixel(browser, x + SIDE / 2, y + SIDE / 2), 2)
        assert pixel(browser, 5, 5)[3] == 0  # the grey background: nothing drawn
        assert "added" in browser.find_element("css selector", '#objects li[data-obj="2"] .state').text
        js(browser, "vseg.play()")
        browser.find_element("css selector", '#objects li[data-obj="2"] button.remove').click()
        wait_js(browser, "document.querySelector('#objects li[data-obj=\"2\"] .state').textContent"
                         ".startsWith('removed')", 10, "object 2 removed, in the list")
        wait_js(browser, "vseg.painted.obj_ids.includes(1) && !vseg.painted.obj_ids.includes(2)", 20,
                "object 2's mask no longer drawn")
        refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused, refused  # hls.js (blob: media and worker) plays within the page's policy
    finally:
        request_stop("cam", settings=settings, client=redis_client)
        producer.join(20)
        worker.join(30)


def running_file_job(settings: Settings, client: redis.Redis, tmp_path: Path, *, n: int, delay_s: float,
                     prompts: list[ObjectPrompt] | None = None, zones: ZoneSet | None = None,
                     job_id: str = "clip") -> tuple[str, threading.Thread]:
    video = clip(tmp_path / "clip.mp4", n, 10, moving=True)
    submit(video, prompts or [disc_prompt(1, 0, n, (W, H))], settings=settings, job_id=job_id, client=client,
           zones=zones)
    return job_id, start_worker(settings, client, delay_s, name="ui-worker")


def end(job_id: str, worker: threading.Thread, settings: Settings, client: redis.Redis) -> None:
    request_cancel(job_id, settings=settings, client=client)
    worker.join(30)


def test_a_click_on_a_file_jobs_frame_adds_an_object_drawn_on_the_next_frames(
        browser: Any, ui: UiServer, settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    n = 200
    job, worker = running_file_job(settings, redis_client, tmp_path, n=n, delay_s=0.06)
    try:
        open_job(browser, ui, job)
        assert js(browser, "return vseg.player()") == "source"
        wait_js(browser, "vseg.painted && vseg.painted.frame_idx === 0 && vseg.painted.obj_ids.includes(1)", 10,
                "frame 0 with the disc's mask")
        x, y = square_at(0, n, moving=True)
        click_at(browser, x + SIDE / 2, y + SIDE / 2)  # on frame 0, already segmented by now
        wait_js(browser, "document.querySelector('#objects li[data-obj=\"2\"]')", 10, "object 2 in the list")
        # the worker's `update` entries draw it on the frame clicked too
        wait_js(browser, "vseg.painted.frame_idx === 0 && vseg.painted.obj_ids.includes(2)", 10, "object 2 on frame 0")
        js(browser, "vseg.play()")
        painted = wait_js(browser, "vseg.painted.frame_idx >= 15 && vseg.painted.obj_ids.includes(2) && vseg.painted",
                          20, "object 2's mask on the next frames")
        js(browser, "vseg.pause()")
        time.sleep(0.3)
        painted = js(browser, "return vseg.painted")
        k = painted["frame_idx"]
        assert painted["obj_ids"] == [1, 2] and painted["shown"]["idx"] == k
        sx, sy = square_at(k, n, moving=True)
        assert_mask_colour(pixel(browser, sx + SIDE / 2, sy + SIDE / 2), 2)  # where the square is on frame k
        dx, dy = disc_center(k, n, (W, H))
        assert_mask_colour(pixel(browser, dx, dy), 1)
    finally:
        end(job, worker, settings, redis_client)


def test_a_zone_and_a_line_drawn_and_saved_then_an_alert_listed(browser: Any, ui: UiServer, settings: Settings,
                                                                redis_client: redis.Redis, tmp_path: Path) -> None:
    n = 300
    x, y = square_at(0, n, moving=True)  # the blue square, moving down into the zone drawn below
    job, worker = running_file_job(settings, redis_client, tmp_path, n=n, delay_s=0.1,
                                   prompts=[ObjectPrompt(1, 0, ((x + SIDE / 2, y + SIDE / 2),), (1,))])
    alerts, stop = AlertsService(settings), threading.Event()  # the events consumer, started after the job
    consumer = threading.Thread(target=alerts.run, args=(stop,), daemon=True)
    consumer.start()
    try:
        browser.get(f"{ui.url}/")  # the page of cameras and jobs, then the job's own
        link = wait_js(browser, f"document.querySelector('#jobs tr[data-job=\"{job}\"] a')", 10, "the job listed")
        wait_js(browser, f"document.querySelector('#jobs tr[data-job=\"{job}\"]').textContent.includes('running')", 10,
                "the job's state, live")
        link.click()
        wait_js(browser, "window.vseg && vseg.ready", 10, "the job's page")
        browser.find_element("css selector", '[data-mode="zone"]').click()
        browser.find_element("id", "shape-name").send_keys("door")
        corners = [(150, 60), (300, 60), (300, 200), (150, 200)]
        for cx, cy in corners:
            click_at(browser, cx, cy)
        browser.find_element("id", "finish-shape").click()
        browser.find_element("id", "shape-name").clear()
        browser.find_element("css selector", '[data-mode="line"]').click()
        click_at(browser, 100, 10)
        click_at(browser, 100, 230)  # a line is two clicks: done
        wait_js(browser, "document.querySelector('#zones li[data-name=\"line-1\"]')", 5, "the line in the list")
        browser.find_element("id", "save-zones").click()
        wait_for(lambda: redis_client.hget(settings.keys.job(job), "zones"), 10, "the zones saved")
        saved = ZoneSet.from_json(redis_client.hget(settings.keys.job(job), "zones"))
        assert [z.name for z in saved.zones] == ["door"] and [ln.name for ln in saved.lines] == ["line-1"]
        assert np.allclose(saved.zones[0].points, corners, atol=1.5), saved
        assert np.allclose([saved.lines[0].a, saved.lines[0].b], [(100, 10), (100, 230)], atol=1.5)
        wait_js(browser, "document.getElementById('notice').textContent.includes('saved 1 zone(s) and 1 line(s)')", 5,
                "the save's reply shown")
        item = wait_js(browser, "[...document.querySelectorAll('#alerts li')].find(li => "
                                "li.textContent.includes('object 1 entered door'))", 30, "the enter event listed")
        key = item.get_attribute("data-key")
        assert key.startswith(f"{job}:") and key.endswith(":1:zone_enter:door"), key
        assert any(f[b"key"].decode() == key for _, f in redis_client.xrange(settings.keys.job_alerts(job)))
    finally:
        stop.set()
        consumer.join(10)
        end(job, worker, settings, redis_client)


def test_with_a_token_the_page_asks_for_it_once_then_everything_works(browser: Any, settings: Settings,
                                                                      redis_client: redis.Redis, video_file: Path) -> None:
    """Bound to every interface, the viewer needs VSEG_UI_TOKEN: the page sends a person to the sign-in form, and
    once signed in (a cookie) the page, its API calls, its event stream and its writes all carry it."""
    settings = dataclasses.replace(settings, ui_token="a-long-random-token")
    submit(video_file, [disc_prompt(1, 0, 40, (W, H))], settings=settings, job_id="guarded", client=redis_client)
    with start_ui(settings, "0.0.0.0", 0) as ui:
        browser.get(f"http://127.0.0.1:{ui.port}/jobs/guarded")
        wait_js(browser, "document.querySelector('input[name=token]')", 5, "the sign-in form")
        browser.find_element("css selector", "input[name=token]").send_keys("a-long-random-token\n")
        wait_js(browser, "window.vseg && vseg.ready", 10, "the job's page after signing in")
        assert browser.current_url.endswith("/jobs/guarded")
        history = js(browser, "return performance.getEntriesByType('navigation').map((e) => e.name)")
        assert not any("a-long-random-token" in url for url in history)  # posted, not in a URL
        wait_js(browser, "document.getElementById('figures').textContent.includes('queued')", 10, "the event stream")
        browser.find_element("css selector", '[data-mode="line"]').click()
        click_at(browser, 10, 10)
        click_at(browser, 10, 100)
        browser.find_element("id", "save-zones").click()
        wait_for(lambda: redis_client.hget(settings.keys.job("guarded"), "zones"), 10, "the zones saved with the cookie")
        browser.delete_all_cookies()


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    return clip(tmp_path / "small.mp4", 40, 10, moving=True)


def test_the_pages_rle_decoder_matches_pycocotools(browser: Any, ui: UiServer) -> None:
    browser.get(f"{ui.url}/")
    rng = np.random.default_rng(0)
    masks = [np.zeros((7, 5), bool), np.ones((7, 5), bool), rng.random((31, 17)) > 0.5,
             np.pad(np.ones((400, 700), bool), ((200, 120), (300, 280)))]  # runs of many characters
    masks[2][0, 0] = True
    for mask in masks:
        rle = encode_mask(mask)
        decoded = browser.execute_async_script(
            "const [rle, done] = arguments;"
            "import('/static/rle.js').then((m) => done(Array.from(m.decodeMask(rle)).join('')));",
            {"size": rle["size"], "counts": rle["counts"].decode()})
        got = np.frombuffer(decoded.encode(), np.uint8).reshape(mask.shape) - ord("0")
        assert (got.astype(bool) == mask).all(), mask.shape


def test_a_screenshot_of_a_jobs_page(browser: Any, ui: UiServer, settings: Settings, redis_client: redis.Redis,
                                     tmp_path: Path) -> None:
    n = 120
    x, y = square_at(0, n, moving=True)
    prompts = [disc_prompt(1, 0, n, (W, H)), ObjectPrompt.point(2, x + SIDE / 2, y + SIDE / 2)]
    zones = parse_zones(["door:170,40,310,40,310,200,170,200"], ["gate:120,5,120,235"])
    job, worker = running_file_job(settings, redis_client, tmp_path, n=n, delay_s=0.0, prompts=prompts, zones=zones)
    worker.join(60)
    for frame_idx, kind, extra in ((38, "line_cross", {"zone": "gate", "direction": "in"}),
                                   (61, "zone_enter", {"zone": "door", "overlap": 0.62}),
                                   (82, "dwell", {"zone": "door", "dwell_s": 2.1})):
        key = f"{job}:{frame_idx}:1:{kind}:{extra['zone']}"
        event = {"v": 1, "key": key, "type": kind, "job_id": job, "obj_id": 1, "frame_idx": frame_idx,
                 "t_s": frame_idx / 10, "at": time.time() - (n - frame_idx) / 10, **extra}
        redis_client.xadd(settings.keys.job_alerts(job), {"type": kind, "key": key, "data": msgpack.packb(event)})
    browser.set_window_size(1280, 900)  # room for the alerts
    open_job(browser, ui, job)
    wait_js(browser, "document.querySelectorAll('#alerts li.alert').length === 3", 10, "the alerts")
    js(browser, "vseg.seek(70)")
    wait_js(browser, "vseg.painted.frame_idx === 70 && vseg.painted.obj_ids.length === 2", 10, "frame 70's masks")
    time.sleep(0.3)
    shot = tmp_path / "viewer.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("VSEG_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    browser.set_window_size(1280, 800)
    state = json.loads(js(browser, "return JSON.stringify(vseg.objects())"))
    assert [o["obj_id"] for o in state] == [1, 2]

