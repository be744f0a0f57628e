"""`python -m producer serve --cameras cameras.yaml`: a daemon that keeps one standing live job per camera.

Each enabled camera (producer/cameras.py) runs on its own thread (producer/camera_runner.py `CameraRunner`)
as live jobs `<camera>-<n>`, replaced with backoff when one ends for any reason but a stop.

Several daemons may serve one file. A camera runs on the daemon holding its lease (producer/cameras.py `Leases`:
SET NX PX, renewed every lease/3 by compare-and-set); a daemon whose renewal is refused, or fails for 2/3 of a lease,
stops the camera at once; each daemon takes, every tick, the enabled cameras nobody holds, so those of a
daemon killed are taken over within a lease (after their last job has ended: its liveness key expires).

SIGHUP re-reads the file: added cameras start, removed ones stop gracefully and free their lease, changed
ones restart, the others run on; a bad file is logged and changes nothing. A camera whose zones or lines
alone changed runs on: its running job's `zones` are replaced (the events consumer judges by them from then).
SIGTERM and SIGINT stop every camera gracefully (the end marker: its job completes), wait up to grace_s, free
the leases and exit 0.

`--http-port P` serves the web viewer (producer/ui) from the daemon; its "save zones" on a camera's job
writes them into the cameras file (producer/camera_file.py) and re-reads it, as SIGHUP does.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from producer.camera_file import save_camera_zones
from producer.camera_runner import CameraRunner
from producer.cameras import Camera, CameraKeys, Leases, load_cameras
from producer.fleet_status import CameraStatus, StatusPublisher, serve_metrics
from producer.zones import ZoneSet
from runtime.connection import connect
from runtime.logs import configure_logging, run_cli
from runtime.settings import Settings
from schemas.errors import ConfigError, VsegError

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 10.0

class Fleet:
    """The daemon: the file's cameras, the leases held, a runner per held camera (see the module doc)."""

    def __init__(self, path: Path, settings: Settings, environ: Mapping[str, str], *,
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        if not 0 < lease_s < float("inf"):
            raise ConfigError(f"--lease-s must be a number of seconds > 0, but got {lease_s}")
        self.path, self.settings, self.environ, self.lease_s = path, settings, environ, lease_s
        self.keys = CameraKeys(settings.key_prefix)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.cameras = self._load()
        self.client = connect(settings)  # the cameras' jobs and the state publisher
        timeout_s = max(0.5, min(settings.socket_timeout_s, lease_s / 4))
        self.leases = Leases(connect(settings, retries=1, socket_timeout_s=timeout_s, connect_timeout_s=timeout_s,
                                     health_check_interval_s=0), self.keys, self.owner, lease_s)
        self.held: dict[str, float] = {}  # camera -> monotonic time its lease was last taken or renewed
        self.runners: dict[str, CameraRunner] = {}
        self.retiring: list[CameraRunner] = []  # stopped, not yet ended
        self.statuses: dict[str, CameraStatus] = {}
        self.tick_s = lease_s / 3
        self.stopping, self.reload_requested, self.wake = threading.Event(), threading.Event(), threading.Event()
        self.stop_why = "stopped"
        self.reload_why = "SIGHUP"  # why the next reload happens (SIGHUP, or the viewer's save)
        self.ticked_at = self.redis_ok_at = time.monotonic()
        self.publisher = StatusPublisher(self.client, self.keys, settings, self.owner, self.view, max(3 * lease_s, 5))

    def view(self) -> list[tuple[Camera, CameraStatus | None]]:
        return [(camera, self.statuses.get(name)) for name, camera in self.cameras.items()]

    def request_reload(self, why: str = "SIGHUP") -> None:
        self.reload_why = why
        self.reload_requested.set()
        self.wake.set()  # the loop's wait ends at once

    def request_stop(self, why: str) -> None:
        self.stop_why = why
        self.stopping.set()
        self.wake.set()

    def save_zones(self, camera: str, zones: ZoneSet) -> None:
        """The viewer's save (producer/ui's CameraConfig): into the cameras file, then re-read as on SIGHUP."""
        save_camera_zones(self.path, camera, zones, self.settings, self.environ)
        log.info("camera %s: zones and lines saved into %s by the viewer", camera, self.path)
        self.request_reload("the viewer saved zones")

    def run(self, http_port: int | None = None) -> int:
        server = serve_metrics(self.settings, self.view, self.health, self.ready)
        ui = None
        if http_port:  # None or 0: no viewer
            from producer.ui.server import start_ui

            ui = start_ui(self.settings, self.settings.ui_host, http_port, cameras=self)
            log.info("web viewer on %s", ui.url)
        self.publisher.start()
        enabled = sum(c.enabled for c in self.cameras.values())
        log.info("serving %d camera(s) (%d enabled) from %s as %s, lease %g s", len(self.cameras), enabled,
                 self.path, self.owner, self.lease_s)
        try:
            while not self.stopping.is_set():
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
                self.tick()
                self.wake.wait(self.tick_s)
                self.wake.clear()
        finally:
            if ui is not None:
                ui.close()
            self._shutdown()
            if server is not None:
                server.close()
        return 0

    def tick(self) -> None:
        """Renew the leases held, free those of cameras gone, take the free ones."""
        self.ticked_at = time.monotonic()
        self._renew()
        self._reap()
        if not self.stopping.is_set():
            self._acquire()

    def reload(self) -> None:
        """SIGHUP: the file again; a bad one changes nothing."""
        try:
            new = self._load()
        except ConfigError as e:
            log.error("cameras file not reloaded, the %d camera(s) run on unchanged: %s", len(self.runners), e)
            return
        old = self.cameras
        same = sum(1 for name in new if old.get(name) == new[name])
        log.info("cameras file %s re-read (%s): %d camera(s) unchanged, %d added, removed or changed", self.path,
                 self.reload_why, same, len(set(old) | set(new)) - same)
        for name in sorted(set(old) | set(new)):
            if old.get(name) == new.get(name):
                if name in self.runners and old[name].zones != new[name].zones:
                    try:
                        self.runners[name].update_zones(new[name])
                    except redis.RedisError as e:
                        log.warning("camera %s: its job's new zones could not be written (%s); its next job "
                                    "has them", name, e)
                continue
            what = ("added" if name not in old else "removed" if name not in new else
                    "disabled" if not new[name].enabled else "changed")
            log.info("camera %s: %s in %s", name, what, self.path)
            runner = self.runners.pop(name, None)
            if runner is not None:
                runner.request_stop(f"{what} in the cameras file")
                self.retiring.append(runner)
        self.cameras = new

    def _load(self) -> dict[str, Camera]:
        return load_cameras(self.path, self.settings, self.environ)

    def _renew(self) -> None:
        for name in list(self.held):
            asked = time.monotonic()
            try:
                renewed = self.leases.renew(name)
            except redis.RedisError as e:
                if asked - self.held[name] >= self.lease_s * 2 / 3:
                    self._lost(name, f"its lease could not be renewed for {asked - self.held[name]:.1f} s ({e})")
                continue
            self.redis_ok_at = asked
            if renewed:
                self.held[name] = asked
            else:
                self._lost(name, "its lease expired and another daemon may hold it")

    def _lost(self, name: str, why: str) -> None:
        log.error("camera %s: %s: stopping it at once", name, why)
        del self.held[name]
        self.statuses.pop(name, None)
        runner = self.runners.pop(name, None)
        if runner is not None:
            runner.request_stop("lease lost")
            self.retiring.append(runner)

    def _reap(self) -> None:
        """Forget the runners that have ended; free the leases of held cameras that are removed or disabled
        once nothing of theirs runs."""
        self.retiring = [r for r in self.retiring if r.alive()]
        running = {r.camera.name for r in self.retiring} | set(self.runners)
        for name in list(self.held):
            camera = self.cameras.get(name)
            if (camera is None or not camera.enabled) and name not in running:
                self._release(name)
                self.statuses.pop(name, None)
                if camera is None:
                    self.publisher.forget(name)

    def _release(self, name: str) -> None:
        self.held.pop(name, None)
        try:
            self.leases.release(name)
        except redis.RedisError as e:  # it expires within a lease anyway
            log.warning("camera %s: could not free its lease (%s); it expires within %g s", name, e, self.lease_s)

    def _acquire(self) -> None:
        asked = time.monotonic()
        try:
            for name, camera in self.cameras.items():
                if not camera.enabled or name in self.runners:
                    continue
                if name not in self.held:
                    if not self.leases.acquire(name):
                        continue
                    self.held[name] = asked
                    log.info("camera %s: taken (its lease is this daemon's, %s)", name, self.owner)
                status = self.statuses.setdefault(name, CameraStatus(name))
                after = [r for r in self.retiring if r.camera.name == name]
                self.runners[name] = CameraRunner(camera, self.settings, self.client, status, after).start()
            self.leases.client.ping()
            self.redis_ok_at = asked
        except redis.RedisError as e:
            log.warning("cannot take cameras' leases (%s); trying again in %.1f s", e, self.tick_s)

    def _shutdown(self) -> None:
        log.info("stopping every camera (%s)", self.stop_why)
        for runner in [*self.runners.values(), *self.retiring]:
            runner.request_stop(self.stop_why)
        self.retiring.extend(self.runners.values())
        self.runners.clear()
        deadline = time.monotonic() + self.settings.grace_s
        while any(r.alive() for r in self.retiring) and time.monotonic() < deadline:
            self._renew()  # held until their ingest has ended
            for runner in self.retiring:
                runner.thread.join(min(self.tick_s, max(0.0, deadline - time.monotonic())) / max(1, len(self.retiring)))
        late = sorted({r.camera.name for r in self.retiring if r.alive()})
        if late:
            log.warning("camera(s) %s did not stop within grace_s (%g s): their jobs fail when their liveness keys "
                        "expire", ", ".join(late), self.settings.grace_s)
        self.publisher.close()
        freed = sorted(self.held)
        for name in freed:
            self._release(name)
        log.info("stopped; camera(s) freed: %s", ", ".join(freed) or "none")

    def health(self) -> tuple[bool, str]:
        ok = time.monotonic() - self.ticked_at < 3 * self.tick_s + 5
        return ok, f"{len(self.runners)} camera(s) run here" if ok else "the daemon's loop is stuck"

    def ready(self) -> tuple[bool, str]:
        since = time.monotonic() - self.redis_ok_at
        return since < self.lease_s, (f"Redis answers, {len(self.held)} lease(s) held" if since < self.lease_s else
                                      f"Redis has not answered for {since:.0f} s")


def add_serve_parser(subparsers: Any) -> None:
    """`serve`: the camera fleet daemon."""
    s = subparsers.add_parser("serve", help="run every camera of a cameras.yaml as a standing live job (SIGHUP "
                                            "re-reads the file, SIGTERM stops them gracefully)")
    s.add_argument("--cameras", type=Path, required=True, metavar="FILE", help="the cameras file (cameras.yaml)")
    s.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S, metavar="S",
                   help=f"a camera's lease: a daemon that dies frees its cameras within it (default {DEFAULT_LEASE_S:g})")
    s.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve per-camera metrics, /healthz and /readyz on PORT (default VSEG_METRICS_PORT; 0: none)")
    s.add_argument("--http-port", type=int, metavar="PORT",
                   help="serve the web viewer on PORT (cameras, jobs, click-to-track, zones; address VSEG_UI_HOST, "
                        "default 127.0.0.1; any other needs VSEG_UI_TOKEN; 0: none)")


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the daemon until SIGTERM or SIGINT (exit 0); SIGHUP re-reads the file."""
    if args.metrics_port is not None:
        settings = dataclasses.replace(settings, metrics_port=args.metrics_port)
    fleet = Fleet(args.cameras, settings, os.environ, lease_s=args.lease_s)

    def stop(signum: int, _frame: object) -> None:
        fleet.request_stop(f"{signal.Signals(signum).name} received")

    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: lambda *_: fleet.request_reload()}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        return fleet.run(args.http_port)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m producer.fleet serve|cameras ...`, the same commands as `python -m producer serve|cameras`."""
    from producer.fleet_status import add_cameras_parser, run_cameras

    parser = argparse.ArgumentParser(prog="python -m producer.fleet", description="The camera fleet")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_cameras_parser(sub)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)

    def command() -> int:
        settings = Settings.load()
        configure_logging(args.verbose, settings.log_format)
        return run_serve(args, settings) if args.command == "serve" else run_cameras(args, settings)

    return run_cli(command, log, handled=(VsegError, redis.RedisError))


if __name__ == "__main__":
    sys.exit(main())
