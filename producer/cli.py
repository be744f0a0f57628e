"""`python -m producer {submit,extract,watch,status,cancel,stop,prompt,remove,stats,migrate,serve,cameras,alerts,ui}`:
the client side on the command line (`serve`: the camera fleet daemon, producer/fleet.py; `alerts`: the zone
events, producer/alerts.py; `ui`: the web viewer alone, producer/ui).

Every error a user can cause or meet ends in one line on stderr and a non-zero exit (`runtime.logs.run_cli`):
bad input (2: a bad flag, file, video, prompt or job id), an unknown job (1: the id is well-formed, Redis
has no such job), Redis unreachable, hung or out of memory (1, naming the URL without its password and what
to do).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path

import redis
from redis.exceptions import LockError

from producer.auto_args import add_auto_arguments, auto_options
from producer.cli_prompts import seconds as _seconds
from runtime.connection import quick_client
from runtime.faults import redact_url, redis_fault
from runtime.layout import cluster_node_error
from runtime.logs import configure_logging, job_log_context, run_cli
from runtime.settings import Settings
from schemas.errors import InputError, RedisUnavailable, VsegError

log = logging.getLogger("producer")
# the commands of other modules: the command -> (its module, the function adding its parser, its run(args, settings))
RUNNERS = {"serve": ("producer.fleet", "add_serve_parser", "run_serve"),  # the camera fleet daemon
           "cameras": ("producer.fleet_status", "add_cameras_parser", "run_cameras"),  # the fleet's table
           "alerts": ("producer.alerts", "add_alerts_parser", "run_alerts"),  # the events consumer
           "ui": ("producer.ui.server", "add_ui_parser", "run_ui"),  # the web viewer alone
           "prompt": ("producer.cli_prompts", "add_prompt_parser", "run_prompt"),  # a running job's commands
           "remove": ("producer.cli_prompts", "add_remove_parser", "run_remove")}


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-frames", type=int, help="keep at most this many frames")
    p.add_argument("--stride", type=int, default=1, help="keep every Nth frame (default 1)")
    p.add_argument("--start", type=float, dest="start_s", help="start at this many seconds")
    p.add_argument("--end", type=float, dest="end_s", help="stop before this many seconds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m producer", description="Submit videos and follow their results")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="decode a video (or ingest a live source), enqueue a segmentation job, print "
                                      "its id")
    s.add_argument("video", metavar="SOURCE",
                   help="a video file, or a live source: rtsp://, rtsps://, rtmp://, http(s):// (HLS .m3u8, MPEG-TS), "
                        "tcp://, udp://, srt:// or a capture device /dev/videoN (a live job: python -m producer stop "
                        "ends it)")
    s.add_argument("--live", action="store_true",
                   help="a live job from a file, played at its own rate (demos and tests); URLs and devices are live")
    s.add_argument("--username", help="a live source's user name, put into its URL in this process only")
    s.add_argument("--password-env", metavar="VAR", help="the environment variable holding that user's password "
                   "(never on the command line, where `ps` shows it)")
    s.add_argument("--password-file", type=Path, metavar="FILE", help="or a file holding it (its first line)")
    s.add_argument("--duration", type=_positive_seconds, dest="duration_s", metavar="S",
                   help="a live job: end it after S seconds of frames (S > 0)")
    add_auto_arguments(s)
    s.add_argument("--point", action="append", default=[], metavar="OBJ:X,Y[:LABEL][@FRAME]",
                   help="a point on object OBJ (label 1 foreground, 0 background; frame default 0); repeatable")
    s.add_argument("--box", action="append", default=[], metavar="OBJ:X0,Y0,X1,Y1[@FRAME]",
                   help="a box around object OBJ; repeatable")
    s.add_argument("--prompts", type=Path, dest="prompts_file", help="JSON file of prompts (see producer/prompts.py)")
    s.add_argument("--zone", action="append", default=[], metavar="NAME:X,Y,X,Y,X,Y[,...]",
                   help="a zone (a polygon of 3 points or more, displayed pixels) whose enters, leaves and dwells "
                        "`python -m producer alerts` reports; repeatable")
    s.add_argument("--line", action="append", default=[], metavar="NAME:X0,Y0,X1,Y1",
                   help="a line whose crossings (in: from its left to its right, looking from X0,Y0 to X1,Y1) it "
                        "reports; repeatable")
    s.add_argument("--job-id", help="choose the job id; submitting the same id twice gives one job")
    s.add_argument("--watch", type=Path, metavar="DIR", help="then follow the job and write DIR/masks.json")
    s.add_argument("--no-render", dest="render", action="store_false",
                   help="masks only: the worker draws no MP4 (less work, faster on a CPU worker)")
    s.add_argument("--no-resume", dest="resume", action="store_false",
                   help="after a worker crash, run the job again from frame 0 (the exact masks of an uninterrupted "
                        "run) instead of going on after its last published frame")
    s.add_argument("--no-stream", dest="stream", action="store_false",
                   help="decode the whole video before enqueueing (default: enqueue once the prompted frames "
                        "are decoded and stream the rest to the worker)")
    _add_decode_options(s)

    e = sub.add_parser("extract", help="only decode VIDEO into DIR/00000.jpg, 00001.jpg, ...")
    e.add_argument("video", type=Path)
    e.add_argument("out_dir", type=Path)
    e.add_argument("--quality", type=int, help="JPEG quality 1-100 (default VSEG_JPEG_QUALITY or 95)")
    _add_decode_options(e)

    st = sub.add_parser("status", help="show a job's state, attempt, progress and last error")
    st.add_argument("job_id")
    c = sub.add_parser("cancel", help="cancel a job: it stops within a few frames and is not retried")
    c.add_argument("job_id")
    sp = sub.add_parser("stop", help="end a live job gracefully: its last frames are published, the render "
                                     "finished, then it completes")
    sp.add_argument("job_id")

    w = sub.add_parser("watch", help="follow a job's results, write DIR/masks.json, print the MP4's path")
    w.add_argument("job_id")
    w.add_argument("--out", type=Path, required=True, dest="out_dir")
    w.add_argument("--timeout", type=float, dest="timeout_s", help="give up after this many seconds without news")

    m = sub.add_parser("migrate", help="rename the jobs of a Redis in the old key layout to this version's (single "
                                       "Redis only; stop the previous version's workers and producers first)")
    m.add_argument("--force", action="store_true", help="even while workers' health keys exist")

    q = sub.add_parser("stats", help="print the queue's figures: waiting, pending, lag, oldest pending age, dead letters")
    q.add_argument("--serve", type=_port, metavar="PORT",
                   help="instead, serve them as Prometheus metrics on PORT (/metrics, /healthz, /readyz) until stopped")
    q.add_argument("--host", help="address to serve on (default metrics_host, VSEG_METRICS_HOST: 127.0.0.1)")
    for module, add_parser, _ in RUNNERS.values():
        getattr(importlib.import_module(module), add_parser)(sub)
    return p


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be 0..65535 (0: any free one), but got {port}")
    return port


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be > 0, but got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one command; its errors go through `runtime.logs.run_cli` (one line, exit 1, or 2 for bad input)."""
    args = build_parser().parse_args(argv)  # argparse's own errors: its usage line, exit 2
    configure_logging(args.verbose)
    settings: Settings | None = None

    def command() -> int:
        nonlocal settings
        if args.command == "extract":
            return _extract(args)
        settings = Settings.load()
        configure_logging(args.verbose, settings.log_format)  # configs/service.yaml may set it too
        if args.command == "submit":
            return _submit(args, settings)
        if args.command == "status":
            return _status(args.job_id, settings)
        if args.command == "cancel":
            return _cancel(args.job_id, settings)
        if args.command == "stop":
            return _stop(args.job_id, settings)
        if args.command == "stats":
            return _stats(args, settings)
        if args.command in RUNNERS:  # serve, cameras, alerts, ui
            module, _, runner = RUNNERS[args.command]
            return int(getattr(importlib.import_module(module), runner)(args, settings))
        if args.command == "migrate":
            return _migrate(args.force, settings)
        return _watch(args.job_id, args.out_dir, settings, args.timeout_s)

    def translate(error: Exception) -> Exception:  # one the library did not classify (e.g. raised while cleaning up)
        if isinstance(error, redis.RedisError):
            return redis_error(error, settings.redis_url if settings is not None else "REDIS_URL")
        return error

    # TimeoutError: watch --timeout, no news for that long (exit 1)
    with job_log_context(job_id=getattr(args, "job_id", None)):  # status, cancel, watch: their records name the job
        return run_cli(command, log, handled=(VsegError, redis.RedisError, TimeoutError), translate=translate)


def redis_error(error: redis.RedisError, url: str) -> VsegError:
    """A Redis error as a one-line VsegError that names the URL (its password hidden) and what to do:
    RedisUnavailable (down, hung, wrong credentials) or RedisFull (maxmemory with noeviction)."""
    if isinstance(error, redis.AuthenticationError):  # a ConnectionError to redis-py, but REDIS_URL's to fix
        return RedisUnavailable(f"Redis at {redact_url(url)} refused the credentials ({error}): check the user and "
                                f"password in REDIS_URL")
    if isinstance(error, redis.exceptions.MovedError):  # a plain client on a cluster node
        return cluster_node_error(redact_url(url))
    fault = redis_fault(error, url)
    if fault is not None:
        return fault
    if isinstance(error, LockError):  # waited out another submit of the same job id
        return VsegError(str(error))
    return VsegError(f"Redis at {redact_url(url)} refused a command: {error}")


def check_redis(settings: Settings) -> None:
    """PING Redis with a quick client: RedisUnavailable (one line) before anything else is done."""
    client = quick_client(settings)
    try:
        client.ping()
    except redis.RedisError as e:
        raise redis_error(e, settings.redis_url) from e
    finally:
        client.close()


def _extract(args: argparse.Namespace) -> int:
    from producer.decode import extract_frames

    settings = Settings.load(jpeg_quality=args.quality)
    info = extract_frames(args.video, args.out_dir, max_frames=args.max_frames, stride=args.stride,
                          start_s=args.start_s, end_s=args.end_s, jpeg_quality=settings.jpeg_quality,
                          decode_threads=settings.decode_threads, progress=True)
    print(f"{info.num_frames} frames {info.width}x{info.height} at {info.fps:.3f} fps -> {args.out_dir}")
    return 0


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from producer.live_source import check_source, is_live_source
    from producer.prompts import build_prompts
    from producer.submission import submit
    from producer.zones import parse_zones

    args.video = check_source(args.video)  # an unsupported scheme (ftp://): one line; RTSP:// is rtsp://
    prompts = build_prompts(points=args.point, boxes=args.box, json_file=args.prompts_file)
    args.zones = parse_zones(args.zone, args.line)
    check_redis(settings)  # Redis down: say so at once, before any decoding
    if args.live or is_live_source(args.video):
        from producer.cli_live import submit_live_job

        return submit_live_job(args, prompts, settings)
    if args.duration_s is not None:
        raise InputError("--duration is for live jobs: add --live to play a file as a live source")
    if args.username or args.password_env or args.password_file:
        raise InputError("--username, --password-env and --password-file are for live sources (URLs)")
    result = submit(Path(args.video), prompts, settings=settings, job_id=args.job_id, max_frames=args.max_frames,
                    stride=args.stride, start_s=args.start_s, end_s=args.end_s, progress=True,
                    stream=args.stream, render=args.render, resume=args.resume, auto=auto_options(args),
                    labels=args.labels, zones=args.zones, text=args.text)
    print(result.job_id, flush=True)
    if args.watch is not None:
        return _watch(result.job_id, args.watch, settings, None, to_stderr=True)
    return 0


def _stop(job_id: str, settings: Settings) -> int:
    from producer.control import request_stop

    print(request_stop(job_id, settings=settings, client=quick_client(settings)))
    return 0


def _status(job_id: str, settings: Settings) -> int:
    from producer.control import status

    state = status(job_id, settings=settings, client=quick_client(settings))
    print(f"job {job_id}: {state.get('state', '?')}")
    print(f"  attempt: {state.get('attempt', '0')}")
    if state.get("live") != "1":
        print(f"  progress: {state.get('frames_done', '0')}/{state.get('num_frames', '?')} frames")
    for key in ("worker", "error", "render_path", "source", "lane"):
        if state.get(key):
            print(f"  {key}: {state[key]}")
    if state.get("auto_keyframes"):  # --auto: what the keyframes found (the worker's log has why, keyframe by keyframe)
        print(f"  auto: {state['auto_keyframes']} keyframe(s), {state.get('auto_proposed', '0')} masks proposed, "
              f"{state.get('auto_added', '0')} became objects")
    if state.get("live") == "1":
        from producer.cli_live import live_status_lines

        for line in live_status_lines(state):
            print(f"  {line}")
    return 0


def _cancel(job_id: str, settings: Settings) -> int:
    """Exit 0 whatever the job's state: cancelling is idempotent, and a job already ended is said so."""
    from producer.control import request_cancel

    print(request_cancel(job_id, settings=settings, client=quick_client(settings)).describe())
    return 0


def _migrate(force: bool, settings: Settings) -> int:
    """Print every key moved (old -> new) and a summary; exit 1 if a key was left (its new name was taken)."""
    from producer.migrate import migrate
    from runtime.layout import describe

    client = quick_client(settings)
    try:
        done = migrate(client, settings.keys, force=force)
        print(done.describe(describe(client)))
    finally:
        client.close()
    return 1 if done.conflicts else 0


def _watch(job_id: str, out_dir: Path, settings: Settings, timeout_s: float | None, *, to_stderr: bool = False) -> int:
    """`watch`: the masks' and the render's paths on stdout (`submit --watch`: on stderr, so that stdout holds
    the job id alone and `JOB=$(python -m producer submit ... --watch DIR)` works)."""
    from producer.watching import watch

    check_redis(settings)  # down from the start: one line (later outages are waited out)
    result = watch(job_id, out_dir, settings=settings, progress=True, timeout_s=timeout_s)
    if result.random_weights:
        log.warning("these masks come from RANDOM WEIGHTS (smoke test): they are meaningless")
    out = sys.stderr if to_stderr else sys.stdout
    print(f"masks: {result.masks_json}", file=out)
    print(f"video: {result.render_path}" if result.render_path else "video: none (submitted with --no-render)",
          file=out)
    return 0


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    """Print the queue's figures once, or (--serve) export them until SIGTERM (exit 0) or Ctrl-C (130)."""
    from producer.stats import collect_stats, format_stats, serve_stats

    if args.serve is None:
        client = quick_client(settings)
        try:
            for keys in settings.keys.all_lanes():  # the first lane always; another once it has a stream
                if keys.lane and not client.exists(keys.jobs):
                    continue
                print(format_stats(collect_stats(client, keys), keys, settings.redis_url))
        finally:
            client.close()
        return 0
    server = serve_stats(settings, args.host or settings.metrics_host, args.serve)
    print(f"serving queue metrics on {server.url}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
