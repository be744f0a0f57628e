"""SAM 3 text tracking speed: our TextTracker, frame by frame, against transformers' own whole-video loop.

Three runs over the same frames, with the same weights, for each object count N (issue 30):

- library: what a user of transformers writes (tests/test_sam3_text.py's reference): `init_video_session(video=...)`
  with every frame (resized and normalised on the inference device, the library's default), `add_text_prompt`,
  `propagate_in_video_iterator`, `postprocess_outputs`, each frame's masks and scores copied to the host;
- ours, file: `TextTracker(num_frames=F)`, one `step` a frame (the frame resized on the CPU, as the worker
  does), memory pruned, the last frame flushing what the hot start holds back;
- ours, live: the same with `num_frames=None` (unbounded) and `finish()` at the end.

Each run is timed from the frames on the host to the last frame's masks on the host; s/frame is that over F.
Rounds are interleaved (the order rotates) after one untimed warm-up run of each kind on --warmup frames;
medians over rounds, and the median of each round's ratio (ours frames/s over the library's).

How exactly N instances are tracked: random weights detect the same near-whole-frame mask with every query,
whatever the image, so the count is set, not found. A forward hook on the detector makes its first N queries
certain and the rest absent (N detections a frame, as a scene with N players would give), the tracker's
`max_num_objects` is N, non-maximum suppression is off (the N masks are near-identical), and the hot start's
removals (a track unmatched or duplicated for 8 frames) are off: what random masks would otherwise remove.
Each run checks the count it saw on every frame (`tracked`: the objects the model ran its tracker on;
`shown`: those `postprocess_outputs` returned). With real weights (--checkpoint) only `max_num_objects` is
set: the count is what the model finds, up to N, and is printed, not enforced.

Results are compared: ids, masks and scores of every frame of ours against the library's, in the first round;
on the CPU they are bit-identical (tests/test_sam3_text.py). The live run is compared only on clips of 16
frames or more: under 16 the library normalises object pointers' time by the clip's length, a live job as a
long video does (worker/model/sam3/bounded.py; in bf16 that flips a few pixels). On CUDA the library resizes
the frames on the GPU, ours on the CPU: ours is also compared with an untimed library run fed frames resized
on the CPU, to tell resizing from tracking; the report says how many mask pixels differ, if any.

    .venv/bin/python bench/bench_sam3.py [--device cpu|cuda] [--model tiny|full] [--checkpoint DIR]
        [--size 1920x1080] [--objects 1,4,16] [--frames 16] [--warmup 2] [--rounds 3] [--video PATH]
        [--dtype auto|float32|bfloat16] [--budget-s S] [--threads N] [--json OUT]

--model full is SAM 3's real architecture (transformers' default Sam3VideoConfig, about 860 M parameters)
with random weights: about 71 s a frame on a 2-core CPU, so a GPU's; --dtype auto is bfloat16 on CUDA
(the whole model and session in bf16, as `load_sam3(dtype=)` gives), float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

if TYPE_CHECKING:  # imported where used: preflight() first says what is missing, in one line
    from transformers import Sam3VideoModel

    from worker.model.sam3.build import Sam3

KINDS = ("library", "ours file", "ours live")
PHRASE = "player"
NEVER = 10**9  # a hot-start threshold no clip reaches: that removal is off
CERTAIN, ABSENT = 20.0, -20.0  # the forced query logits: sigmoid 1.0 and 2e-9
COMPARABLE = 16  # a live job times object pointers as a video of >= 16 frames does (bounded.py): shorter
                 # clips are normalised by their own length in the library, so a live run's masks may differ
CPU_RESIZED = "library, frames resized on the CPU"  # CUDA only: the library as ours feeds the model
TRANSFORMERS = "5.25"  # worker/model/sam3 leans on this version's session internals (pyproject.toml pins it)
# What the GPU machine's image lacks for this script (it has transformers 5.17, huggingface_hub 1.x, no open_clip):
# pure-Python wheels to carry, fetched with bench/gpu_checks.sh's `pip download` line.
WHEELS = ("transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 "
          "open_clip_torch==3.3.0")


@dataclass
class Run:
    """One timed run over the clip: wall seconds, and per frame what was tracked and shown."""

    kind: str
    seconds: float
    frames: int
    tracked: list[int]  # objects the model tracked on each frame
    shown: list[int]  # objects the frame's postprocessed result holds
    gpu_peak_mib: float | None
    results: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


@dataclass
class Figures:
    """One object count's medians and checks, as printed and written to --json."""

    objects: int
    tracked: list[int]  # fewest and most objects tracked on any frame of any run
    shown: list[int]
    s_per_frame: dict[str, float]
    fps: dict[str, float]
    ratio: dict[str, float]  # ours frames/s over the library's, median of the rounds' ratios
    rounds: dict[str, list[float]]  # every round's frames/s
    equal: dict[str, bool | None]  # "ours file" etc.: ids, masks, scores == the library's on every frame;
    differing_pixels: dict[str, int]  # None: not comparable (a live run over fewer than COMPARABLE frames)
    gpu_peak_mib: dict[str, float] = field(default_factory=dict)


def preflight() -> None:
    """Fail in one line, saying what to carry, where transformers or open_clip's BPE file is not what the
    tracker needs (the GPU machine's image holds another transformers and no open_clip)."""
    import importlib.util

    carry = f"install or carry the wheels {WHEELS} (bench/gpu_checks.sh's header says how)"
    try:
        import transformers
    except ImportError as e:  # transformers checks huggingface_hub's version when imported
        raise SystemExit(f"bench_sam3 cannot import transformers ({e}): {carry}") from e
    if not transformers.__version__.startswith(TRANSFORMERS):
        raise SystemExit(f"bench_sam3 needs transformers {TRANSFORMERS}.*, but got {transformers.__version__} "
                         f"at {Path(transformers.__file__).parent}: {carry}")
    if importlib.util.find_spec("open_clip") is None:
        raise SystemExit(f"bench_sam3 needs open_clip's BPE file (SAM 3's vocabulary): {carry}")


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, but got {text!r}") from e
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, but got {text!r}")
    return width, height


def synthetic_clip(num_frames: int, width: int, height: int) -> np.ndarray:
    """Coloured discs and boxes moving over a textured field (RGB uint8, F x H x W x 3): the same every run."""
    rng = np.random.default_rng(0)
    field_ = cv2.resize(rng.integers(40, 90, (9, 16, 3), dtype=np.uint8), (width, height))
    colours = rng.integers(80, 256, (16, 3)).tolist()
    scale = min(width, height)
    video = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = field_.copy()
        for k, colour in enumerate(colours):
            cx = int((0.1 + 0.8 * ((k * 0.37 + t * 0.013 * (1 + k % 3)) % 1.0)) * width)
            cy = int((0.15 + 0.7 * ((k * 0.61 + t * 0.007 * (1 + k % 2)) % 1.0)) * height)
            r = max(2, int(scale * (0.03 + 0.01 * (k % 4))))
            if k % 2:
                cv2.circle(frame, (cx, cy), r, colour, -1)
            else:
                cv2.rectangle(frame, (cx - r, cy - 2 * r), (cx + r, cy + 2 * r), colour, -1)
        video[t] = frame
    return video


def video_clip(path: Path, num_frames: int, width: int, height: int) -> np.ndarray:
    """The first `num_frames` frames of `path` (PyAV; looped when shorter), resized to width x height."""
    import av

    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            rgb: np.ndarray = frame.to_ndarray(format="rgb24")
            if rgb.shape[:2] != (height, width):
                rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
            frames.append(rgb)
            if len(frames) == num_frames:
                break
    if not frames:
        raise SystemExit(f"no video frames in {path}")
    return np.stack([frames[k % len(frames)] for k in range(num_frames)])


def load_model(kind: str, checkpoint: Path | None, device: str, dtype: torch.dtype) -> Sam3:
    """A Sam3 (worker/model/sam3/build.py): the real weights, the tiny random model, or SAM 3's full
    architecture with random weights built straight on `device`."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from worker.model.sam3.build import Sam3, disable_kernel_download, load_sam3, load_tiny, make_processor
    from worker.model.sam3.tiny import make_it_see

    if checkpoint is not None:
        return load_sam3(checkpoint, device=device, dtype=dtype)
    if kind == "tiny":
        sam3 = load_tiny(seed=0, device=device)
        if dtype != torch.float32:
            torch.nn.Module.to(sam3.model, dtype)
            sam3 = Sam3(model=sam3.model, processor=sam3.processor, name=sam3.name, random_weights=True,
                        device=device, dtype=dtype)
        return sam3
    disable_kernel_download()
    torch.manual_seed(0)
    with torch.device(device):
        model = Sam3VideoModel(Sam3VideoConfig())
    model = cast("Sam3VideoModel", torch.nn.Module.to(model, dtype).eval())
    make_it_see(model)
    return Sam3(model=model, processor=make_processor(model), name="sam3-full-random", random_weights=True,
                device=device, dtype=dtype)


class ObjectCount:
    """Sets how many instances the model tracks (the module docstring says how and why); one per model."""

    def __init__(self, sam3: Sam3) -> None:
        self.model = sam3.model
        self.forced = sam3.random_weights
        self.n = 1
        detector: Any = self.model.config.detector_config  # a Sam3Config
        self.queries = int(detector.detr_decoder_config.num_queries)
        if self.forced:
            self.model.det_nms_thresh = 0.0
            self.model.hotstart_unmatch_thresh = NEVER
            self.model.hotstart_dup_thresh = NEVER
            self.model.detector_model.register_forward_hook(self._force)

    def set(self, n: int) -> None:
        if self.forced and n > self.queries:
            raise SystemExit(f"--objects {n}: this model's detector has {self.queries} queries")
        self.n = n
        self.model.max_num_objects = n

    def _force(self, _module: torch.nn.Module, _args: Any, output: Any) -> Any:
        """The detector's output with its first n queries certain and the others absent."""
        logits = torch.full_like(output.pred_logits, ABSENT)
        logits[:, : self.n] = CERTAIN
        output.pred_logits = logits
        return output


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def start_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def read_peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def run_library(sam3: Sam3, video: np.ndarray, keep: bool, processing_device: str | None = None) -> Run:
    """transformers' own loop over the whole clip (frames given up front; resized on the inference device,
    the library's default, unless `processing_device` says otherwise)."""
    processor, model, device = sam3.processor, sam3.model, sam3.device
    sync(device)
    start_peak(device)
    t0 = time.perf_counter()
    session = processor.init_video_session(video=video, inference_device=device, dtype=sam3.dtype,
                                           processing_device=processing_device)
    processor.add_text_prompt(session, [PHRASE])
    tracked, shown, results = [], [], []
    with torch.inference_mode():
        for out in model.propagate_in_video_iterator(inference_session=session):
            post = processor.postprocess_outputs(session, out)
            ids = tuple(int(i) for i in post["object_ids"].tolist())
            masks, scores = post["masks"].cpu().numpy(), post["scores"].float().cpu().numpy()
            tracked.append(len(out.obj_id_to_mask))
            shown.append(len(ids))
            if keep:
                results.append((ids, masks, scores))
    seconds = time.perf_counter() - t0
    peak = read_peak(device)
    session.reset_state()
    return Run("library", seconds, len(video), tracked, shown, peak, results)


def run_ours(sam3: Sam3, video: np.ndarray, live: bool, keep: bool) -> Run:
    """Our TextTracker, one frame at a time (a file job, or a live one when `live`)."""
    from worker.model.sam3.tracker import TextFrame, TextTracker

    device = sam3.device
    height, width = video.shape[1:3]
    sync(device)
    start_peak(device)
    t0 = time.perf_counter()
    tracker = TextTracker(sam3, [PHRASE], width=width, height=height, num_frames=None if live else len(video))
    tracked, shown, results = [], [], []

    def take(frames: list[TextFrame]) -> None:
        for f in frames:
            shown.append(len(f.obj_ids))
            if keep:
                results.append((f.obj_ids, f.masks, f.scores))

    for frame in video:
        released = tracker.step(frame)
        tracked.append(len(tracker.session.obj_ids))
        take(released)
    take(tracker.finish())
    seconds = time.perf_counter() - t0
    peak = read_peak(device)
    tracker.close()
    return Run("ours live" if live else "ours file", seconds, len(video), tracked, shown, peak, results)


def differing_pixels(ours: Run, library: Run) -> tuple[bool, int]:
    """Whether ours equals the library frame for frame (ids, masks, scores), and how many mask pixels differ
    (every pixel of a frame whose ids differ counts)."""
    equal = len(ours.results) == len(library.results)
    pixels = 0
    for (ids, masks, scores), (ref_ids, ref_masks, ref_scores) in zip(ours.results, library.results):
        if ids != ref_ids or masks.shape != ref_masks.shape:
            equal = False
            pixels += max(masks.size, ref_masks.size)
            continue
        diff = int(np.count_nonzero(masks != ref_masks))
        equal = equal and diff == 0 and np.array_equal(scores, ref_scores)
        pixels += diff
    return equal, pixels


def rotated(kinds: tuple[str, ...], k: int) -> list[str]:
    """The run order of round k: rotated, so that no kind always runs first or after another."""
    return [kinds[(i + k) % len(kinds)] for i in range(len(kinds))]


def one_run(kind: str, sam3: Sam3, video: np.ndarray, keep: bool) -> Run:
    if kind == "library":
        return run_library(sam3, video, keep)
    return run_ours(sam3, video, live=kind == "ours live", keep=keep)


def compare(sam3: Sam3, runs: dict[str, Run], video: np.ndarray) -> dict[str, tuple[bool | None, int]]:
    """Ours (both runs) against the library's run of the same round; on CUDA also against the library fed
    as ours feeds the model (frames resized on the CPU: an untimed run), to tell resizing from tracking."""
    live_ok = len(video) >= COMPARABLE
    checks: dict[str, tuple[bool | None, int]] = {}
    references = {"": runs["library"]}
    if sam3.device.startswith("cuda"):
        references[" / " + CPU_RESIZED] = run_library(sam3, video, keep=True, processing_device="cpu")
    for suffix, reference in references.items():
        for kind in KINDS[1:]:
            equal, pixels = differing_pixels(runs[kind], reference)
            checks[kind + suffix] = (equal if kind == "ours file" or live_ok else None, pixels)
    return checks


def summarise(n: int, rounds: list[dict[str, Run]], checks: dict[str, tuple[bool | None, int]]) -> Figures:
    """Medians over the rounds, every round's frames/s, the counts seen, the equality checks."""
    runs = [run for r in rounds for run in r.values()]
    tracked = [v for run in runs for v in run.tracked]
    shown = [v for run in runs for v in run.shown]
    peaks = {kind: max(r[kind].gpu_peak_mib or 0.0 for r in rounds) for kind in KINDS}
    return Figures(
        objects=n, tracked=[min(tracked), max(tracked)], shown=[min(shown), max(shown)],
        s_per_frame={kind: statistics.median(1 / r[kind].fps for r in rounds) for kind in KINDS},
        fps={kind: statistics.median(r[kind].fps for r in rounds) for kind in KINDS},
        ratio={kind: statistics.median(r[kind].fps / r["library"].fps for r in rounds) for kind in KINDS[1:]},
        rounds={kind: [round(r[kind].fps, 4) for r in rounds] for kind in KINDS},
        equal={name: check[0] for name, check in checks.items()},
        differing_pixels={name: check[1] for name, check in checks.items()},
        gpu_peak_mib=peaks if rounds[0]["library"].gpu_peak_mib is not None else {},
    )


def span(low_high: list[int]) -> str:
    """[1, 4] -> '1-4'."""
    return f"{low_high[0]}-{low_high[1]}"


def print_table(figures: list[Figures]) -> None:
    """The side-by-side table: one line per object count."""
    print(f"{'objects':>7} {'tracked':>7} {'shown':>5} | {'library':>16} {'ours file':>16} {'ours live':>16} | "
          f"{'file/lib':>8} {'live/lib':>8} | GPU peak MiB (library, file, live)")
    for f in figures:
        cells = " ".join(f"{f.fps[k]:.2f} ({f.s_per_frame[k]:.3f} s)".rjust(16) for k in KINDS)
        peaks = ", ".join(f"{f.gpu_peak_mib[k]:.0f}" for k in KINDS) if f.gpu_peak_mib else "-"
        print(f"{f.objects:>7} {span(f.tracked):>7} {span(f.shown):>5} | {cells} | "
              f"{f.ratio['ours file']:8.3f} {f.ratio['ours live']:8.3f} | {peaks}")
    print("(frames/s, median of the rounds, with s/frame; ratios: ours frames/s / the library's, median of the "
          "rounds' ratios; tracked, shown: fewest-most objects on any frame of any run; GPU peak: the weights included)")


def equality_line(figures: list[Figures]) -> str:
    """One line: whether ours equals the library, per check, and what differs where it does not."""
    parts = []
    for name in figures[0].equal:
        verdicts = [f.equal[name] for f in figures]
        if all(v is None for v in verdicts):
            parts.append(f"{name}: not compared (a clip under {COMPARABLE} frames: the library times object "
                         "pointers by the clip's length, a live job as a long video)")
        elif all(verdicts):
            parts.append(f"{name}: equal")
        else:
            parts.append(f"{name}: differs (" + ", ".join(f"N={f.objects} {f.differing_pixels[name]} pixels"
                                                         for f in figures) + ")")
    return "ours against the library (ids, masks, scores, every frame): " + "; ".join(parts)


def check_counts(figures: Figures, forced: bool) -> list[str]:
    """What is wrong with the counts: exactly N tracked on every frame where the count was forced, at most
    N where the model finds them."""
    n = figures.objects
    if forced and figures.tracked != [n, n]:
        return [f"N={n}: tracked {figures.tracked[0]}-{figures.tracked[1]} objects, not exactly {n}"]
    if figures.tracked[1] > n:
        return [f"N={n}: tracked up to {figures.tracked[1]} objects"]
    return []


def measure(sam3: Sam3, video: np.ndarray, counts: list[int], rounds: int, warmup: int, budget_s: float,
            on_figures: Callable[[list[Figures], int], None]) -> list[Figures]:
    """Warm up, then interleaved rounds until `rounds` are done or the next would pass `budget_s`;
    `on_figures` gets the figures so far after every count of every round."""
    control = ObjectCount(sam3)
    started = time.monotonic()
    for n in counts:
        control.set(n)
        for kind in KINDS:
            one_run(kind, sam3, video[:warmup], keep=False)
    print(f"warmed up ({warmup} frames a run kind and count) in {time.monotonic() - started:.1f} s", flush=True)
    per_count: dict[int, list[dict[str, Run]]] = {n: [] for n in counts}
    checks: dict[int, dict[str, tuple[bool | None, int]]] = {}
    figures: list[Figures] = []
    for k in range(rounds):
        round_started = time.monotonic()
        for n in counts:
            control.set(n)
            runs = {kind: one_run(kind, sam3, video, keep=k == 0) for kind in rotated(KINDS, k)}
            if k == 0:
                checks[n] = compare(sam3, runs, video)
                for run in runs.values():
                    run.results.clear()
            per_count[n].append(runs)
            library = runs["library"].fps
            print(f"round {k + 1}, N={n}: frames/s " + ", ".join(
                f"{kind} {runs[kind].fps:.2f}" + ("" if kind == "library" else f" ({runs[kind].fps / library:.3f})")
                for kind in KINDS) + f"; tracked {runs['library'].tracked[-1]}", flush=True)
            figures = [summarise(c, per_count[c], checks[c]) for c in counts if per_count[c]]
            on_figures(figures, k + 1)
        took = time.monotonic() - round_started
        if k + 1 < rounds and time.monotonic() - started + took > budget_s:
            print(f"stopping after {k + 1} rounds: another ({took:.0f} s) would pass the {budget_s:.0f} s budget")
            break
    return figures


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--model", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--checkpoint", type=Path, help="a facebook/sam3 folder: real weights (load_sam3)")
    ap.add_argument("--size", type=parse_size, default=(1920, 1080), help="WIDTHxHEIGHT of the frames")
    ap.add_argument("--objects", default="1,4,16", help="comma-separated instance counts")
    ap.add_argument("--frames", type=int, default=COMPARABLE)
    ap.add_argument("--warmup", type=int, default=2, help="frames of the untimed warm-up run of each kind")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--video", type=Path, help="decode the first --frames frames of this clip (else synthetic)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no round that would end past this")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the figures here (after every count of every round)")
    args = ap.parse_args()
    args.counts = [int(v) for v in args.objects.split(",") if v]
    if not args.counts or min(args.counts) < 1 or args.frames < 1 or args.warmup < 1 or args.rounds < 1:
        raise SystemExit("--objects, --frames, --warmup and --rounds must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA here")
    return args


def describe(args: argparse.Namespace, sam3: Sam3, load_s: float) -> dict[str, Any]:
    """What ran where (printed, and the JSON's header)."""
    import transformers

    params = sum(p.numel() for p in sam3.model.parameters()) / 1e6
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    width, height = args.size
    header = {
        "machine": machine() + gpu, "torch": torch.__version__, "transformers": transformers.__version__,
        "model": sam3.name, "params_m": round(params, 1), "random_weights": sam3.random_weights,
        "device": args.device, "dtype": str(sam3.dtype).removeprefix("torch."), "size": f"{width}x{height}",
        "frames": args.frames, "warmup_frames": args.warmup, "clip": str(args.video or "synthetic"),
        "phrase": PHRASE, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"machine: {header['machine']}, torch {header['torch']}, transformers {header['transformers']}")
    print(f"model: {sam3.name} ({params:.0f} M parameters, {'random' if sam3.random_weights else 'real'} weights), "
          f"{header['dtype']} on {args.device}, loaded in {load_s:.1f} s; clip: {header['clip']} at {width}x{height}, "
          f"{args.frames} frames, phrase {PHRASE!r}; objects {args.counts}; up to {args.rounds} interleaved rounds, "
          "medians", flush=True)
    print("runs: library = init_video_session(video) + add_text_prompt + propagate_in_video_iterator + "
          "postprocess_outputs; ours file / ours live = TextTracker.step per frame (num_frames F / None + finish); "
          "each timed from frames on the host to the last masks on the host", flush=True)
    return header


def main() -> None:
    args = parse_args()
    preflight()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "hitting max_num_objects" on every frame: that is the point here
    logging.getLogger("worker.model.sam3.build").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if cuda else torch.float32)
    width, height = args.size
    video = (video_clip(args.video, args.frames, width, height) if args.video
             else synthetic_clip(args.frames, width, height))
    t0 = time.monotonic()
    sam3 = load_model(args.model, args.checkpoint, args.device, dtype)
    header = describe(args, sam3, time.monotonic() - t0)

    def write(figures: list[Figures], done: int) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**header, "rounds": done, "results": [asdict(f) for f in figures]},
                                            indent=1))

    figures = measure(sam3, video, args.counts, args.rounds, args.warmup, args.budget_s, write)
    print_table(figures)
    print(equality_line(figures))
    problems = [p for f in figures for p in check_counts(f, sam3.random_weights)]
    if problems:
        raise SystemExit("object counts off: " + "; ".join(problems))


if __name__ == "__main__":
    main()
