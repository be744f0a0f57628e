"""The one settings object: its defaults (here, and only here), a deployment's configs/service.yaml, then the
environment, read once.

Precedence: command-line flag > environment variable > configs/service.yaml > the defaults below. The YAML
holds only what a deployment changes (it ships empty): a key restating a default would hide a later change of
that default (tests/test_schemas.py refuses one).
Build it once at the edge (`Settings.load()`) and pass it down; nothing else reads os.environ.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.errors import ConfigError
from schemas.names import DEFAULT_PREFIX, Keys

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
SERVICE_YAML = CONFIGS_DIR / "service.yaml"

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

# field name -> environment variable
ENV_VARS: dict[str, str] = {
    "redis_url": "REDIS_URL",
    "redis_cluster": "VSEG_REDIS_CLUSTER",
    "storage_root": "STORAGE_ROOT",
    "key_prefix": "VSEG_KEY_PREFIX",
    "model_preset": "VSEG_MODEL",
    "segmenter": "VSEG_SEGMENTER",
    "checkpoint": "VSEG_CHECKPOINT",
    "checkpoint_dir": "VSEG_CHECKPOINT_DIR",
    "image_size": "VSEG_IMAGE_SIZE",
    "device": "VSEG_DEVICE",
    "encoder_batch": "VSEG_ENCODER_BATCH",
    "model_process": "VSEG_MODEL_PROCESS",
    "concurrency": "VSEG_CONCURRENCY",
    "session_batch": "VSEG_SESSION_BATCH",
    "cuda_graphs": "VSEG_CUDA_GRAPHS",
    "jpeg_quality": "VSEG_JPEG_QUALITY",
    "decode_threads": "VSEG_DECODE_THREADS",
    "keep_frames": "VSEG_KEEP_FRAMES",
    "resume": "VSEG_RESUME",
    "render_preset": "VSEG_RENDER_PRESET",
    "render_threads": "VSEG_RENDER_THREADS",
    "block_ms": "VSEG_BLOCK_MS",
    "socket_timeout_s": "VSEG_SOCKET_TIMEOUT_S",
    "results_ttl_s": "VSEG_RESULTS_TTL_S",
    "progress_every": "VSEG_PROGRESS_EVERY",
    "lease_s": "VSEG_LEASE_S",
    "housekeeping_s": "VSEG_HOUSEKEEPING_S",
    "stall_s": "VSEG_STALL_S",
    "producer_ttl_s": "VSEG_PRODUCER_TTL_S",
    "max_attempts": "VSEG_MAX_ATTEMPTS",
    "retry_backoff_s": "VSEG_RETRY_BACKOFF_S",
    "grace_s": "VSEG_GRACE_S",
    "max_frames": "VSEG_MAX_FRAMES",
    "max_pixels": "VSEG_MAX_PIXELS",
    "max_objects": "VSEG_MAX_OBJECTS",
    "max_prompts": "VSEG_MAX_PROMPTS",
    "metrics_port": "VSEG_METRICS_PORT",
    "metrics_host": "VSEG_METRICS_HOST",
    "log_format": "VSEG_LOG_FORMAT",
    "max_latency_s": "VSEG_MAX_LATENCY_S",
    "source_outage_s": "VSEG_SOURCE_OUTAGE_S",
    "source_open_timeout_s": "VSEG_SOURCE_OPEN_TIMEOUT_S",
    "source_read_timeout_s": "VSEG_SOURCE_READ_TIMEOUT_S",
    "source_watchdog_s": "VSEG_SOURCE_WATCHDOG_S",
    "rtsp_transport": "VSEG_RTSP_TRANSPORT",
    "live_results_maxlen": "VSEG_LIVE_RESULTS_MAXLEN",
    "live_frames_maxlen": "VSEG_LIVE_FRAMES_MAXLEN",
    "live_buffer_frames": "VSEG_LIVE_BUFFER_FRAMES",
    "live_segment_s": "VSEG_LIVE_SEGMENT_S",
    "live_playlist_size": "VSEG_LIVE_PLAYLIST_SIZE",
    "live_preview_height": "VSEG_LIVE_PREVIEW_HEIGHT",
    "live_max_cond_frames": "VSEG_LIVE_MAX_COND_FRAMES",
    "proposer": "VSEG_PROPOSER",
    "auto_points_per_side": "VSEG_AUTO_POINTS_PER_SIDE",
    "auto_points_per_batch": "VSEG_AUTO_POINTS_PER_BATCH",
    "auto_pred_iou_thresh": "VSEG_AUTO_PRED_IOU_THRESH",
    "auto_stability_score_thresh": "VSEG_AUTO_STABILITY_SCORE_THRESH",
    "auto_min_mask_region_area": "VSEG_AUTO_MIN_MASK_REGION_AREA",
    "auto_new_iou": "VSEG_AUTO_NEW_IOU",
    "auto_score_threshold": "VSEG_AUTO_SCORE_THRESHOLD",
    "auto_confirm_frames": "VSEG_AUTO_CONFIRM_FRAMES",
    "auto_lost_frames": "VSEG_AUTO_LOST_FRAMES",
    "labeller": "VSEG_LABELLER",
    "label_model": "VSEG_LABEL_MODEL",
    "label_pretrained": "VSEG_LABEL_PRETRAINED",
    "label_every": "VSEG_LABEL_EVERY",
    "reid_window_s": "VSEG_REID_WINDOW_S",
    "reid_threshold": "VSEG_REID_THRESHOLD",
    "zone_min_overlap": "VSEG_ZONE_MIN_OVERLAP",
    "zone_hysteresis": "VSEG_ZONE_HYSTERESIS",
    "zone_confirm_frames": "VSEG_ZONE_CONFIRM_FRAMES",
    "line_margin_px": "VSEG_LINE_MARGIN_PX",
    "dwell_s": "VSEG_DWELL_S",
    "webhook_secret": "VSEG_WEBHOOK_SECRET",
    "webhook_timeout_s": "VSEG_WEBHOOK_TIMEOUT_S",
    "webhook_max_attempts": "VSEG_WEBHOOK_MAX_ATTEMPTS",
    "ui_token": "VSEG_UI_TOKEN",
    "ui_host": "VSEG_UI_HOST",
}

LOG_FORMATS = ("text", "json")
MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"
    redis_cluster: str = "off"  # on: REDIS_URL names any node of a Redis Cluster (runtime/connection.py)
    storage_root: Path = Path("storage")
    key_prefix: str = DEFAULT_PREFIX
    model_preset: str = "tiny"
    segmenter: str = ""  # "module:callable" building another Segmenter from the Settings (tests); "": SAM 2
    checkpoint: str | None = None  # a .pt path, "random" (smoke tests only), or None: the preset's file
    checkpoint_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "vseg" / "checkpoints")
    image_size: int | None = None  # None: the model's own (1024)
    device: str = "auto"  # auto, cuda, cuda:N, cpu
    encoder_batch: int = 2  # frames per image-encoder pass (already-loaded frames ahead; 1: one at a time)
    model_process: str = "auto"  # the model in a child process: auto (on CUDA only), on, off
    concurrency: int = 0  # jobs one worker holds at once (worker/service/capacity.py); 0: from the device
    session_batch: int = 1  # jobs' steps in one pass on a shared model (frames and objects batched); 1: each its own
    cuda_graphs: str = "on"  # on CUDA, replay SAM 2's per-frame modules from CUDA graphs: on, off
    jpeg_quality: int = 95
    decode_threads: int = 0  # producer's FFmpeg decoder threads; 0: one on 2 cores or fewer, else FFmpeg's choice
    keep_frames: str = "off"  # on: a job's JPEG frames stay after it ends; off: removed (runtime/cleanup.py)
    resume: str = "on"  # on: a reclaimed job resumes after its last published frame; off: it runs again from 0
    render_preset: str = "auto"  # libx264 preset of the MP4; auto: ultrafast beside a CPU model, else superfast
    render_threads: int = 0  # x264 threads; 0: one when the model runs on the CPU (it needs the cores), else auto
    block_ms: int = 2000  # XREAD/XREADGROUP BLOCK; always well under socket_timeout_s
    socket_timeout_s: float = 30.0
    results_ttl_s: int = 7 * 24 * 3600  # result streams expire this long after their job ends
    progress_every: int = 10  # frames between progress events on vseg:events
    lease_s: float = 30.0  # a worker's claim on a job; renewed every lease_s / 3 while the job makes progress
    housekeeping_s: float = 30.0  # an idle worker's housekeeping: dead consumers removed, the events stream trimmed
    stall_s: float = 300.0  # no progress this long: abandoned by its worker (reclaimable); also the longest frame wait
    producer_ttl_s: float = 10.0  # a streaming producer's liveness key; refreshed every producer_ttl_s / 3
    max_attempts: int = 3  # runs of one job (crashes and transient errors) before it is dead-lettered
    retry_backoff_s: float = 1.0  # first wait before retrying a transient error; doubles per attempt
    grace_s: float = 20.0  # on SIGTERM: time to finish the current job before handing it back
    max_frames: int = 20_000  # per-job limits, checked at submit and again at the worker
    max_pixels: int = 3840 * 2160
    max_objects: int = 32
    max_prompts: int = 256
    metrics_port: int = 0  # the worker's /metrics, /healthz, /readyz HTTP port; 0: not served
    metrics_host: str = "127.0.0.1"  # the address it binds to (0.0.0.0: every interface, e.g. in a container)
    log_format: str = "text"  # text: one readable line a record; json: one JSON object a line (runtime/logs.py)
    # Live jobs (cameras, broadcasts, --live): worker/sources/live.py, producer/live_source.py
    max_latency_s: float = 2.0  # a live producer writes a frame every half of this until its worker sets the pace
    source_outage_s: float = 60.0  # a source down (reconnecting) longer than this fails its job
    source_open_timeout_s: float = 10.0  # connecting to a live source
    source_read_timeout_s: float = 5.0  # one read that gets nothing for this long fails (and reconnects)
    source_watchdog_s: float = 10.0  # no frame for this long from a connected source: it is stalled, reconnect
    rtsp_transport: str = "tcp"  # RTSP over tcp (default: no lost packets) or udp
    live_results_maxlen: int = 10_000  # a live job's result stream is trimmed to about this many entries
    live_frames_maxlen: int = 10_000  # and its frames stream
    live_buffer_frames: int = 8  # a live producer's JPEGs no worker has taken yet, at most (producer/live_buffer.py)
    live_segment_s: float = 2.0  # seconds of video per HLS segment of a live job's render
    live_playlist_size: int = 6  # segments in the rolling HLS playlist (older ones are deleted)
    live_preview_height: int = 480  # a live job's preview for the viewer (every captured frame), lines; 0: none
    live_max_cond_frames: int = 8  # prompted (conditioning) frames memory attention reads in a live session
    # Automatic prompts (--auto): SAM 2's mask generator (worker/model/proposals.py), the guide's values
    proposer: str = ""  # "module:callable" building another MaskProposer from the Settings; "": SAM 2's generator
    auto_points_per_side: int = 16  # grid of points_per_side^2 points (the guide's 16 "for speed": bench_auto.py)
    auto_points_per_batch: int = 32  # points through the model at once (its memory; the guide: 32 against OOM)
    auto_pred_iou_thresh: float = 0.7  # drop masks the model rates below this
    auto_stability_score_thresh: float = 0.92  # drop unstable masks
    auto_min_mask_region_area: int = 100  # remove fragments smaller than this (pixels); also the least new object
    auto_new_iou: float = 0.3  # a proposed mask overlapping every tracked object less than this is a new object
    auto_score_threshold: float = 0.5  # object score at which an automatic object counts as present
    auto_confirm_frames: int = 3  # present on this many processed frames before it shows
    auto_lost_frames: int = 15  # absent on this many processed frames in a row: ended (lost)
    # Labels (--labels): worker/model/labels.py
    labeller: str = ""  # "module:callable" building another Labeller from (Settings, labels); "": CLIP
    label_model: str = "ViT-B-32"  # open_clip model name
    label_pretrained: str = "laion2b_s34b_b79k"  # open_clip weights (from the Hugging Face Hub); random: tests only
    label_every: int = 30  # processed frames between two labellings of an object
    # Identities (worker/model/sam3/identities.py): a text object lost and seen again gets its old id back
    reid_window_s: float = 10.0  # seconds of video a lost object is remembered; 0: no re-identification
    reid_threshold: float = 0.8  # cosine similarity of embeddings at which a new instance is a lost object again
    # Zones and events (producer/alerts.py): judged on each object's mask, frame by frame
    zone_min_overlap: float = 0.5  # an object is in a zone once at least this fraction of its mask is inside
    zone_hysteresis: float = 0.5  # and out again once the fraction falls below zone_min_overlap * (1 - this)
    zone_confirm_frames: int = 2  # an enter, leave or crossing counts once it has held this many processed frames
    line_margin_px: float = 4.0  # a mask's centre this close to a line is on neither side (no flicker on the line)
    dwell_s: float = 10.0  # in a zone this long (video time): one `dwell` event per stay
    webhook_secret: str = ""  # HMAC-SHA256 key signing each webhook body (X-Vseg-Signature); "": unsigned
    webhook_timeout_s: float = 5.0  # one webhook POST
    webhook_max_attempts: int = 8  # POSTs of one event before it is given up (logged, counted); backoff doubles
    # The web viewer (producer/ui): no token needed on 127.0.0.1; on any other address every request needs it
    ui_token: str = ""
    ui_host: str = "127.0.0.1"  # address the viewer binds to (producer serve --http-port, python -m producer ui)

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be 1..100, but got {self.jpeg_quality}")
        if not 1 <= self.encoder_batch <= 64:
            raise ConfigError(f"encoder_batch must be 1..64 (frames per image-encoder pass), but got {self.encoder_batch}")
        if self.segmenter and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.segmenter):
            raise ConfigError(f"segmenter must be module.path:callable (or empty for SAM 2), but got {self.segmenter!r}")
        if self.redis_cluster not in ("on", "off"):
            raise ConfigError(f"redis_cluster (VSEG_REDIS_CLUSTER) must be on or off, but got {self.redis_cluster!r}")
        if self.model_process not in ("auto", "on", "off"):
            raise ConfigError(f"model_process must be auto, on or off, but got {self.model_process!r}")
        if not 1 <= self.session_batch <= 64:
            raise ConfigError(f"session_batch (VSEG_SESSION_BATCH) must be 1..64 jobs' steps in one pass (1: "
                              f"each job's own), but got {self.session_batch}")
        if not 0 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError(f"concurrency (VSEG_CONCURRENCY) must be 0..{MAX_CONCURRENCY} jobs at once (0: picked from "
                              f"the device), but got {self.concurrency}")
        if self.cuda_graphs not in ("on", "off"):
            raise ConfigError(f"cuda_graphs must be on or off, but got {self.cuda_graphs!r}")
        if self.keep_frames not in ("on", "off"):
            raise ConfigError(f"keep_frames must be on or off, but got {self.keep_frames!r}")
        if self.resume not in ("on", "off"):
            raise ConfigError(f"resume (VSEG_RESUME) must be on or off, but got {self.resume!r}")
        if self.render_preset != "auto" and self.render_preset not in X264_PRESETS:
            raise ConfigError(f"render_preset must be auto or one of {', '.join(X264_PRESETS)}, but got "
                              f"{self.render_preset!r}")
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads must be >= 0 (0: automatic), but got {self.decode_threads}")
        if self.render_threads < 0:
            raise ConfigError(f"render_threads must be >= 0 (0: automatic), but got {self.render_threads}")
        if self.block_ms <= 0 or self.block_ms / 1000 >= self.socket_timeout_s:
            raise ConfigError(
                f"block_ms ({self.block_ms}) must be positive and shorter than socket_timeout_s "
                f"({self.socket_timeout_s}) or blocking reads time out"
            )
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 16):
            raise ConfigError(f"image_size must be a positive multiple of 16, but got {self.image_size}")
        for name in ("results_ttl_s", "progress_every", "lease_s", "housekeeping_s", "stall_s", "producer_ttl_s", "max_attempts", "grace_s", "max_frames",
                     "max_pixels", "max_objects", "max_prompts"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({ENV_VARS[name]}) must be positive, but got {getattr(self, name)}")
        if self.retry_backoff_s < 0:
            raise ConfigError(f"retry_backoff_s must be >= 0, but got {self.retry_backoff_s}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port (VSEG_METRICS_PORT) must be 0..65535 (0: no metrics endpoint), but got "
                              f"{self.metrics_port}")
        if not self.metrics_host.strip():
            raise ConfigError("metrics_host (VSEG_METRICS_HOST) must be an address to bind to (127.0.0.1, 0.0.0.0, ...)")
        for name in ("max_latency_s", "source_outage_s", "source_open_timeout_s", "source_read_timeout_s",
                     "source_watchdog_s", "live_results_maxlen", "live_frames_maxlen", "live_segment_s",
                     "live_playlist_size", "live_max_cond_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({ENV_VARS[name]}) must be positive, but got {getattr(self, name)}")
        for name in ("auto_points_per_side", "auto_points_per_batch", "auto_confirm_frames", "auto_lost_frames",
                     "label_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({ENV_VARS[name]}) must be positive, but got {getattr(self, name)}")
        for name in ("auto_pred_iou_thresh", "auto_stability_score_thresh", "auto_new_iou", "auto_score_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} ({ENV_VARS[name]}) must be in 0..1, but got {getattr(self, name)}")
        for name in ("proposer", "labeller"):
            if getattr(self, name) and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", getattr(self, name)):
                raise ConfigError(f"{name} ({ENV_VARS[name]}) must be module.path:callable, but got "
                                  f"{getattr(self, name)!r}")
        if self.live_preview_height < 0 or self.live_preview_height % 2:
            raise ConfigError(f"live_preview_height (VSEG_LIVE_PREVIEW_HEIGHT) must be an even number of lines >= 0 "
                              f"(0: no preview), but got {self.live_preview_height}")
        if not 2 <= self.live_buffer_frames <= 10_000:
            raise ConfigError(f"live_buffer_frames (VSEG_LIVE_BUFFER_FRAMES) must be 2..10000 frames, but got "
                              f"{self.live_buffer_frames}")
        if self.live_segment_s < 1:
            raise ConfigError(f"live_segment_s (VSEG_LIVE_SEGMENT_S) must be at least 1 s (HLS target durations are "
                              f"whole seconds), but got {self.live_segment_s}")
        if self.rtsp_transport not in ("tcp", "udp"):
            raise ConfigError(f"rtsp_transport (VSEG_RTSP_TRANSPORT) must be tcp or udp, but got {self.rtsp_transport!r}")
        if not 0 < self.zone_min_overlap <= 1 or not 0 <= self.zone_hysteresis < 1:
            raise ConfigError(f"zone_min_overlap (VSEG_ZONE_MIN_OVERLAP) must be in (0, 1] and zone_hysteresis "
                              f"(VSEG_ZONE_HYSTERESIS) in [0, 1), but got {self.zone_min_overlap} and "
                              f"{self.zone_hysteresis}")
        for name in ("zone_confirm_frames", "dwell_s", "webhook_timeout_s", "webhook_max_attempts"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({ENV_VARS[name]}) must be positive, but got {getattr(self, name)}")
        if self.reid_window_s < 0 or not -1 <= self.reid_threshold <= 1:
            raise ConfigError(f"reid_window_s (VSEG_REID_WINDOW_S) must be >= 0 and reid_threshold "
                              f"(VSEG_REID_THRESHOLD) in [-1, 1], but got {self.reid_window_s} and {self.reid_threshold}")
        if self.line_margin_px < 0:
            raise ConfigError(f"line_margin_px (VSEG_LINE_MARGIN_PX) must be >= 0, but got {self.line_margin_px}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format (VSEG_LOG_FORMAT) must be text or json, but got {self.log_format!r}")

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, config_path: Path | None = SERVICE_YAML, **overrides: Any
    ) -> Settings:
        """Settings from `config_path` (YAML), then `environ` (default os.environ), then non-None `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if config_path is not None and config_path.exists():
            loaded = yaml.safe_load(config_path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{config_path} must hold a map of settings, but holds {type(loaded).__name__}")
            values.update(loaded)
        for name, var in ENV_VARS.items():
            if environ.get(var, "") != "":
                values[name] = environ[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls._coerce(values)

    @classmethod
    def _coerce(cls, values: dict[str, Any]) -> Settings:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(fields)}")
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            kind = str(fields[name].type)
            try:
                if raw is None:
                    kwargs[name] = None
                elif "Path" in kind:
                    kwargs[name] = Path(os.path.expanduser(str(raw)))
                elif kind.startswith("int"):
                    kwargs[name] = int(raw)
                elif kind.startswith("float"):
                    kwargs[name] = float(raw)
                elif isinstance(raw, bool):  # YAML reads a bare on/off as a boolean
                    kwargs[name] = "on" if raw else "off"
                else:
                    kwargs[name] = str(raw)
            except ValueError as e:
                var = ENV_VARS.get(name, name)
                raise ConfigError(f"setting {name} ({var}) must be {kind}, but got {raw!r}") from e
        return cls(**kwargs)
