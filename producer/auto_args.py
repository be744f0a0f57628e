"""The command line's options for automatic prompts and labels (`submit --auto ... --labels ...`), parsed
into the job's AutoOptions."""

from __future__ import annotations

import argparse

from schemas.errors import InputError
from schemas.messages import AutoOptions


def add_auto_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--auto", action="store_true",
                   help="find objects automatically: SAM 2's mask generator on keyframes adds what no object covers")
    s.add_argument("--auto-every", type=every, default=None, metavar="N|Ss",
                   help="keyframes every N processed frames (default 30), or every S seconds with Ss (e.g. 2s)")
    s.add_argument("--auto-max-objects", type=int, default=8, metavar="N", help="automatic objects alive at once")
    s.add_argument("--auto-min-area", type=int, default=0, metavar="PX",
                   help="least pixels of a new automatic object (default VSEG_AUTO_MIN_MASK_REGION_AREA, 100)")
    s.add_argument("--roi", type=box, metavar="X0,Y0,X1,Y1", help="only automatic objects centred in this zone")
    s.add_argument("--labels", type=words, default=(), metavar="A,B,...",
                   help="label every object with one of these (zero-shot, CLIP), e.g. person,car,ball")
    s.add_argument("--auto-keep", type=words, default=(), metavar="A,B,...",
                   help="keep only automatic objects labelled one of these (needs --labels)")
    s.add_argument("--text", type=words, default=(), metavar='"A, B, ..."',
                   help='track every instance of each phrase, e.g. "player, ball" (SAM 3: a worker started with '
                        '--model sam3 takes the job)')


def every(text: str) -> tuple[int, float]:
    """--auto-every: N processed frames, or Ss seconds."""
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if seconds > 0:
                return 0, seconds
        elif int(text) > 0:
            return int(text), 0.0
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a number of frames (30) or of seconds (2s), above 0, but got {text!r}")


def box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be X0,Y0,X1,Y1 in pixels, but got {text!r}") from None
    return x0, y0, x1, y1


def words(text: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in text.split(","))
    if not all(words):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list such as person,car, but got {text!r}")
    return words


def auto_options(args: argparse.Namespace) -> AutoOptions | None:
    """The job's automatic prompts, or None (and an error for --auto-* options without --auto)."""
    given = [flag for flag, on in (("--auto-every", args.auto_every is not None), ("--roi", args.roi is not None),
                                   ("--auto-keep", bool(args.auto_keep)), ("--auto-min-area", args.auto_min_area != 0),
                                   ("--auto-max-objects", args.auto_max_objects != 8)) if on]
    if not args.auto:
        if given:
            raise InputError(f"{', '.join(given)} only apply with --auto")
        return None
    if args.auto_max_objects < 1 or args.auto_min_area < 0:
        raise InputError("--auto-max-objects must be at least 1 and --auto-min-area at least 0")
    frames, seconds = args.auto_every or (30, 0.0)
    return AutoOptions(every_frames=frames, every_s=seconds, max_objects=args.auto_max_objects,
                       min_area=args.auto_min_area, roi=args.roi, keep=tuple(args.auto_keep))
