"""`python -m producer prompt` and `remove`: commands for a running or queued job (producer/running_prompts.py
does the work: checks, the control stream, the worker's reply)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from producer.auto_args import words
from runtime.connection import quick_client
from runtime.settings import Settings
from schemas.errors import InputError


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, but got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, but got {text}")
    return value


def obj_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"an object id is an integer >= 0, but got {text!r}")
    return int(text)


def add_prompt_parser(sub: Any) -> None:
    pr = sub.add_parser("prompt", help="add objects to a running or queued job, or correct them, from a frame on")
    pr.add_argument("job_id")
    pr.add_argument("--point", action="append", default=[], metavar="OBJ:X,Y[:LABEL][@FRAME|@now]",
                    help="a point on object OBJ (label 1 foreground, 0 background; frame default 0; @now: as --now); "
                         "repeatable")
    pr.add_argument("--box", action="append", default=[], metavar="OBJ:X0,Y0,X1,Y1[@FRAME|@now]",
                    help="a box around object OBJ; repeatable")
    pr.add_argument("--prompts", type=Path, dest="prompts_file", metavar="FILE.json", help="JSON file of prompts (as for submit)")
    pr.add_argument("--now", action="store_true",
                    help="apply the prompts at the next frame the worker processes (no frame may be named)")
    pr.add_argument("--text", type=words, default=(), metavar='"A, B, ..."',
                    help="a job with text: look for every instance of these phrases too, from the next frame on")
    pr.add_argument("--wait", type=seconds, default=10.0, dest="wait_s", metavar="S",
                    help="wait this long for the worker's reply (default 10; 0: do not wait)")


def add_remove_parser(sub: Any) -> None:
    rm = sub.add_parser("remove", help="stop tracking an object of a running or queued job, from the next frame")
    rm.add_argument("job_id")
    rm.add_argument("obj_id", type=obj_id, metavar="OBJ")
    rm.add_argument("--wait", type=seconds, default=10.0, dest="wait_s", metavar="S",
                    help="wait this long for the worker's reply (default 10; 0: do not wait)")



def run_prompt(args: argparse.Namespace, settings: Settings) -> int:
    """Print what the worker did (a line per object), or that the prompts were sent; exit 1 if it refused all."""
    from producer.running_prompts import add_prompts, add_text, cli_prompts

    if args.text and (args.point or args.box or args.prompts_file or args.now):
        raise InputError("--text takes no --point, --box, --prompts or --now: phrases apply from the next frame on")
    prompts, now = ([], False) if args.text else cli_prompts(points=args.point, boxes=args.box,
                                                             json_file=args.prompts_file, now=args.now)
    client = quick_client(settings)
    try:
        if args.text:
            reply = add_text(args.job_id, args.text, settings=settings, wait_s=args.wait_s, client=client)
        else:
            reply = add_prompts(args.job_id, prompts, settings=settings, now=now, wait_s=args.wait_s, client=client)
    finally:
        client.close()
    reply.raise_if_refused()
    print(reply.describe())
    return 0


def run_remove(args: argparse.Namespace, settings: Settings) -> int:
    from producer.running_prompts import remove_object

    client = quick_client(settings)
    try:
        reply = remove_object(args.job_id, args.obj_id, settings=settings, wait_s=args.wait_s, client=client)
    finally:
        client.close()
    reply.raise_if_refused()
    print(reply.describe())
    return 0
