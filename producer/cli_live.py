"""The command line's live jobs: `submit SOURCE` for a camera or stream (credentials by reference, SIGTERM
ending the job as `stop` does), and a live job's lines in `status`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from producer.auto_args import auto_options
from runtime.settings import Settings
from schemas.errors import InputError, VsegError
from schemas.names import TERMINAL_STATES
from schemas.prompts import ObjectPrompt

log = logging.getLogger("producer")


def submit_live_job(args: argparse.Namespace, prompts: list[ObjectPrompt], settings: Settings) -> int:
    """A live job: the id is printed as soon as it is enqueued; this keeps ingesting until the job ends."""
    from producer.live_submit import submit_live

    unsupported = [flag for flag, given in (("--watch", args.watch is not None), ("--no-stream", not args.stream),
                                            ("--max-frames", args.max_frames is not None), ("--stride", args.stride != 1),
                                            ("--start", args.start_s is not None), ("--end", args.end_s is not None))
                   if given]
    if unsupported:
        raise InputError(f"{', '.join(unsupported)} cannot be used with a live job: it is ingested as it comes (follow "
                         "it with python -m producer watch JOB --out DIR from another shell)")
    source = _with_credentials(args)
    stop = threading.Event()
    signalled: list[str] = []

    def on_sigterm(signum: int, _frame: object) -> None:  # docker stop, systemd: end the job as `stop` does
        signalled.append(signal.Signals(signum).name)
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    enqueued: list[str] = []

    def announce(job_id: str) -> None:
        enqueued.append(job_id)
        print(job_id, flush=True)

    try:
        submit_live(source, prompts, settings=settings, job_id=args.job_id, duration_s=args.duration_s,
                    realtime=args.live, render=args.render, auto=auto_options(args), labels=args.labels, text=args.text,
                    on_enqueued=announce, stop=stop, zones=args.zones, stop_reason=lambda: f"{signalled[0]}: stopping the job"
                    if signalled else "stopped")
    except VsegError:
        if signalled and not enqueued:  # stopped while the source was opening: nothing was submitted
            log.warning("%s before the job was enqueued: nothing was submitted", signalled[0])
            return 128 + signal.SIGTERM
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _with_credentials(args: argparse.Namespace) -> str:
    """The source URL with `--username` and the password from `--password-env`/`--password-file` put in (here
    only: logs, Redis and `ps` never see it). A password typed into the URL itself works, with a warning."""
    from producer.source_urls import has_password, redacted, with_credentials

    if args.password_env and args.password_file:
        raise InputError("give --password-env or --password-file, not both")
    if (args.password_env or args.password_file) and not args.username:
        raise InputError("a password needs --username")
    if not args.username:
        if has_password(args.video):
            log.warning("the password in %s is visible to every user of this machine (ps); give it with "
                        "--username and --password-env VAR or --password-file FILE instead", redacted(args.video))
        return str(args.video)
    password = ""
    if args.password_env:
        password = os.environ.get(args.password_env, "")
        if not password:
            raise InputError(f"--password-env {args.password_env}: that environment variable is not set or empty")
    elif args.password_file:
        try:
            password = args.password_file.read_text().splitlines()[0] if args.password_file.stat().st_size else ""
        except OSError as e:
            raise InputError(f"--password-file {args.password_file}: cannot read it ({e.strerror})") from e
        if not password:
            raise InputError(f"--password-file {args.password_file} is empty")
    return with_credentials(args.video, args.username, password)


def live_status_lines(state: dict[str, str]) -> list[str]:
    """A live job's figures for `status`: frames processed of those announced, what keeping up cost, latency,
    and the source as it is now (down since when, as soon as an outage begins)."""
    def count(name: str) -> int:
        try:
            return int(float(state.get(name) or 0))
        except ValueError:
            return 0

    done, skipped, dropped = count("frames_done"), count("dropped"), count("dropped_at_ingest")
    ended = state.get("state") in {s.value for s in TERMINAL_STATES}
    announced = f"{count('num_frames'):,}" if ended else "so far"
    lines = [f"live: processed {done - skipped:,} of {done:,} frames published ({announced} announced); "
             f"{skipped:,} skipped to keep up, {dropped:,} dropped at ingest"]
    p50, p95 = state.get("latency_p50_s"), state.get("latency_p95_s")
    lines.append(f"latency: p50 {float(p50):.2f} s, p95 {float(p95):.2f} s" if p50 and p95 else
                 "latency: none yet (no frame processed)")
    outages, down_s = count("source_outages"), float(state.get("source_down_s") or 0)
    since = state.get("source_down_since")
    now = (f"down since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(since)))} "
           f"({time.time() - float(since):.0f} s)" if state.get("source_state") == "down" and since else
           state.get("source_state") or "?")
    lines.append(f"source state: {now}; down {outages} time(s) in all, {down_s:.1f} s"
                 + ("; stop requested" if state.get("stop") == "1" else ""))
    return lines


