"""The viewer's HTTP app (Starlette): its routes, and every refusal as JSON {"error": one line} with a 4xx.

    GET  /                             the page of cameras and jobs (static/index.html)
    GET  /jobs/{id}                    a job's page (static/job.html)
    GET  /login                        the token form (it posts to /login); /login?token=T signs in (auth.py)
    GET  /api/overview                 cameras and recent jobs; /api/overview/stream: the same as SSE, on change
    GET  /api/jobs/{id}                the job: state, size, fps, zones, figures, its picture's URLs, hash fields
    GET  /api/jobs/{id}/stream         SSE: its results, alerts, figures (?after=R[/A] or Last-Event-ID; ?tail=N)
    GET  /api/jobs/{id}/video          a file job's source video (Range requests: seeking)
    GET  /api/jobs/{id}/render         a file job's MP4 with the masks drawn (Range)
    GET  /api/jobs/{id}/frames/{n}.jpg a frame while it exists; n `latest`: a live job's newest (X-Frame-Idx)
    GET  /media/{path}                 a live job's preview (HLS) under STORAGE_ROOT
    POST /api/jobs/{id}/prompt         {x, y, obj_id, frame, positive}: a point on a new or existing object
    POST /api/jobs/{id}/remove         {obj_id}
    PUT  /api/jobs/{id}/zones          {zones: [{name, points}], lines: [{name, points}]}
    GET  /static/...                   the page's files (hls.js vendored: static/vendor/README.md)

Statuses: 400 bad input (a malformed id or body, a point outside the frame, a bad zone), 401/403 the token
(auth.py), 404 an unknown job or object or a file that is gone, 409 a job that has ended, 415 a body that is
not JSON, 422 a prompt the worker refused, 503 Redis down or full. Handlers that call Redis with the sync
client are plain functions (Starlette runs them on its thread pool); the event streams use an asyncio
client, opened and closed with the app (its lifespan).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from producer.running_prompts import JobEndedError, PromptRefused, UnknownObjectError
from producer.ui import actions, media
from producer.ui.actions import CameraConfig, Point
from producer.ui.auth import Auth, Guard, error, login
from producer.ui.data import job_info, overview, read_job
from producer.ui.entries import Cursor
from producer.ui.streams import OverviewFeed, job_events, overview_events
from runtime.connection import connect_async, quick_client
from runtime.faults import redis_fault
from runtime.settings import Settings
from schemas.errors import ConfigError, InfrastructureError, InputError, UnknownJobError, VsegError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownJobError, 404), (UnknownObjectError, 404), (media.MediaGone, 404), (JobEndedError, 409),
    (PromptRefused, 422), (InputError, 400), (ConfigError, 400), (InfrastructureError, 503))


def status_of(e: BaseException) -> int:
    return next((status for kind, status in STATUS if isinstance(e, kind)), 500)


async def _vseg_error(request: Request, e: Exception) -> Response:
    status = status_of(e)
    if status == 500:
        log.error("%s %s: %s", request.method, request.url.path, e)
    return error(status, str(e).replace("\n", "; "))


async def _redis_error(request: Request, e: Exception) -> Response:
    settings: Settings = request.app.state.settings
    fault = redis_fault(e, settings.redis_url)
    return error(503 if fault is not None else 500, str(fault or f"Redis refused a command: {e}"))


def _state(request: Request) -> Any:
    return request.app.state


def _page(name: str) -> Callable[[Request], Response]:
    def page(request: Request) -> Response:
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
    return page


def api_overview(request: Request) -> Response:
    return JSONResponse(overview(_state(request).client, _state(request).settings))


def api_job(request: Request) -> Response:
    state = _state(request)
    view = read_job(state.client, state.settings, request.path_params["job_id"])
    doc = job_info(view, media.media_urls(view, state.settings), camera_config=state.cameras is not None)
    return JSONResponse(doc, headers={"Cache-Control": "no-store"})


def api_video(request: Request) -> Response:
    view = read_job(_state(request).client, _state(request).settings, request.path_params["job_id"])
    path = media.source_video(view)
    if path is None:
        raise media.MediaGone(f"job {view.job_id} has no source video to show: a live job, or its file "
                              f"({view.fields.get('source_path') or 'not recorded'}) is no longer there")
    return FileResponse(path)


def api_render(request: Request) -> Response:
    state = _state(request)
    view = read_job(state.client, state.settings, request.path_params["job_id"])
    path = media.render_video(view, state.settings)
    if path is None:
        raise media.MediaGone(f"job {view.job_id} has no render to show (yet): it is written when a file job "
                              f"completes, unless submitted with --no-render")
    return FileResponse(path, media_type="video/mp4")


def api_frame(request: Request) -> Response:
    state = _state(request)
    view = read_job(state.client, state.settings, request.path_params["job_id"])
    name = request.path_params["name"]
    if name == "latest":
        newest = media.newest_frame(view, state.settings)
        if newest is None:
            raise media.MediaGone(f"job {view.job_id} has no frame on disk now")
        return FileResponse(newest[1], media_type="image/jpeg",
                            headers={"X-Frame-Idx": str(newest[0]), "Cache-Control": "no-store"})
    if not name.isdigit():
        raise InputError(f"a frame is /frames/<index>.jpg (or latest.jpg), not {name!r}.jpg")
    path = media.frame_path(view, state.settings, int(name))
    if path is None:
        raise media.MediaGone(f"frame {int(name)} of job {view.job_id} is not on disk: frames are removed once "
                              f"processed (a live job) or once the job ends (unless VSEG_KEEP_FRAMES=on)")
    return FileResponse(path, media_type="image/jpeg")


def media_file(request: Request) -> Response:
    path = media.media_path(_state(request).settings, request.path_params["path"])
    kind = media.HLS_TYPES[path.suffix.lower()]
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})


async def _json(request: Request) -> object:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise InputError(f"the request's body is over {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InputError(f"the request's body is not valid JSON ({e})") from None


def _write(action: Callable[..., dict[str, Any]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        state = _state(request)
        body = await _json(request)
        doc = await run_in_threadpool(action, state, request.path_params["job_id"], body)
        return JSONResponse(doc)
    return endpoint


def _prompt(state: Any, job_id: str, body: object) -> dict[str, Any]:
    return actions.send_point(state.client, state.settings, job_id, Point.parse(body), state.reply_wait_s)


def _remove(state: Any, job_id: str, body: object) -> dict[str, Any]:
    return actions.remove(state.client, state.settings, job_id, body, state.reply_wait_s)


def _zones(state: Any, job_id: str, body: object) -> dict[str, Any]:
    return actions.save_zones(state.client, state.settings, job_id, body, state.cameras)


async def job_stream(request: Request) -> Response:
    state = _state(request)
    job_id = request.path_params["job_id"]
    await run_in_threadpool(read_job, state.client, state.settings, job_id)  # 404 now, not as an event
    after = request.headers.get("last-event-id") or request.query_params.get("after")
    tail = request.query_params.get("tail")
    if tail is not None and (not tail.isdigit() or int(tail) == 0):
        raise InputError(f"tail must be a number of entries > 0, but got {tail!r}")
    cursor = Cursor.parse(after) if after else None
    return StreamingResponse(job_events(state.aredis, state.settings, job_id, cursor, int(tail) if tail else None,
                                        state.stopping), media_type="text/event-stream", headers=SSE_HEADERS)


async def overview_stream(request: Request) -> Response:
    state = _state(request)
    return StreamingResponse(overview_events(state.feed, state.settings, state.stopping),
                             media_type="text/event-stream", headers=SSE_HEADERS)


def build_app(settings: Settings, *, auth: Auth, cameras: CameraConfig | None = None,
              stopping: threading.Event | None = None, reply_wait_s: float = actions.REPLY_WAIT_S,
              client: redis.Redis | None = None) -> Starlette:
    """The viewer's app. `stopping`: set to end its event streams (the server is closing)."""
    client = client or quick_client(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.aredis = connect_async(settings)
        try:
            yield
        finally:
            await app.state.aredis.aclose()
            client.close()

    job = "/api/jobs/{job_id}"
    routes = [
        Route("/", _page("index.html")), Route("/jobs/{job_id}", _page("job.html")),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/api/overview", api_overview), Route("/api/overview/stream", overview_stream),
        Route(job, api_job), Route(f"{job}/stream", job_stream), Route(f"{job}/video", api_video),
        Route(f"{job}/render", api_render), Route(job + "/frames/{name}.jpg", api_frame),
        Route(f"{job}/prompt", _write(_prompt), methods=["POST"]),
        Route(f"{job}/remove", _write(_remove), methods=["POST"]),
        Route(f"{job}/zones", _write(_zones), methods=["PUT"]),
        Route("/media/{path:path}", media_file), Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, auth=auth)], lifespan=lifespan,
                    exception_handlers={VsegError: _vseg_error, redis.RedisError: _redis_error,
                                        FileNotFoundError: _gone, HTTPException: _http_error})
    app.state.settings, app.state.client, app.state.cameras, app.state.auth = settings, client, cameras, auth
    app.state.stopping, app.state.reply_wait_s = stopping or threading.Event(), reply_wait_s
    app.state.feed = OverviewFeed(client, settings)
    return app


async def _gone(request: Request, e: Exception) -> Response:
    return error(404, f"{request.url.path} is not there (any more): a live job's preview keeps its last segments only")


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")
