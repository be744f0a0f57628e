"""One exception tree for the whole service.

    VsegError                       base of everything we raise on purpose
    ├── ConfigError (ValueError)    bad settings, unknown preset
    │   ├── CheckpointError         checkpoint missing or unreadable (names the path and how to get it)
    │   └── LabellerUnavailable     the worker's CLIP weights cannot load: its --labels jobs fail at once
    │                               (also a PermanentError; one short line: what is wrong, what to set)
    ├── PermanentError              retrying cannot help: fail the job at once
    │   ├── InputError (ValueError) the user's input is wrong
    │   │   ├── VideoError          missing, corrupt or non-video file, zero frames
    │   │   ├── PromptError         malformed prompt, prompt outside the frame or video
    │   │   │   └── ZoneError       malformed zone or line, or one outside the frame
    │   │   ├── StorageError        path outside STORAGE_ROOT, frame directory missing or incomplete
    │   │   └── JobIdError          job id with characters that are unsafe in keys and paths
    │   ├── SchemaError (ValueError) a wire message that does not decode: poison, dead-letter it
    │   └── LayoutError             Redis holds keys in another key layout (names what to run)
    ├── RetryableError              transient (Redis blip, CUDA out of memory): retry with backoff
    │   └── InfrastructureError     Redis or the disk is at fault, not the job: the operator's to fix
    │       ├── RedisUnavailable    Redis cannot be reached (names the URL and what to check)
    │       ├── RedisFull           Redis is at maxmemory with noeviction (says what to change)
    │       └── DiskFull (OSError)  no space left (ENOSPC) or quota exceeded (EDQUOT) under STORAGE_ROOT
    ├── WorkerBroken                the worker's own machinery failed (lease thread, model process):
    │                               it exits non-zero so that its supervisor restarts it
    ├── UnknownJobError (LookupError) no such job id (never submitted, or its results expired)
    └── JobFailed                   a watched job ended failed, dead or cancelled (carries the error)
"""

from __future__ import annotations


class VsegError(Exception):
    """Base class of every error this service raises on purpose."""


class ConfigError(VsegError, ValueError):
    """A setting, preset or command-line option is invalid."""


class CheckpointError(ConfigError):
    """A model checkpoint is missing or cannot be loaded."""


class PermanentError(VsegError):
    """An error that retrying cannot fix: the job fails at once."""


class LabellerUnavailable(ConfigError, PermanentError):
    """This worker's labeller cannot load (CLIP weights neither in its cache nor reachable, an unknown tag):
    a job with labels fails at once, never retried, with one short line saying what to fetch or set."""


class InputError(PermanentError, ValueError):
    """The user's input (video, prompts, paths) is wrong."""


class VideoError(InputError):
    """The video is missing, corrupt, not a video, or has no frames."""


class SourceUnavailable(VsegError):
    """A live source (camera, stream, capture device) that cannot be opened, refuses us for good (404, 401,
    an unknown protocol), or was lost for longer than allowed: the operator's to fix or wait out, not a
    wrong command line. `python -m producer submit` exits 3 (EXIT_SOURCE) with it."""


class PromptError(InputError):
    """A prompt is malformed or lies outside the video."""


class ZoneError(PromptError):
    """A zone (polygon) or line is malformed, or lies outside the video's displayed frame."""


class StorageError(InputError):
    """A path escapes STORAGE_ROOT, or a frame directory is missing or incomplete."""


class JobIdError(InputError):
    """A job id is empty, too long, or has characters unsafe in Redis keys and paths."""


class SchemaError(PermanentError, ValueError):
    """A wire message is malformed or has an unsupported schema version."""


class LayoutError(PermanentError):
    """Redis holds jobs in a key layout this version does not use (runtime/layout.py): migrate or drain them."""


class RetryableError(VsegError):
    """A transient failure: the job may succeed if retried later."""


class InfrastructureError(RetryableError):
    """Redis or the disk is at fault, not the job: retried with backoff; the message says what to fix."""


class RedisUnavailable(InfrastructureError):
    """Redis does not answer (refused, unreachable, hung past the socket timeout)."""


class RedisFull(InfrastructureError):
    """Redis refuses writes: used memory is at maxmemory and the policy is noeviction."""


class DiskFull(InfrastructureError, OSError):
    """No space left (ENOSPC) or disk quota exceeded (EDQUOT) where the service writes."""


class WorkerBroken(VsegError):
    """A worker's own machinery failed (its lease thread died, its model process cannot be restarted,
    its model thread is wedged): it hands its job back and exits non-zero for its supervisor."""


class UnknownJobError(VsegError, LookupError):
    """No job with this id was ever submitted (or its results have expired)."""


class JobFailed(VsegError):
    """A watched job ended in the `failed` state."""

    def __init__(self, job_id: str, error: str, error_type: str = "") -> None:
        super().__init__(f"job {job_id} failed: {error_type + ': ' if error_type else ''}{error}")
        self.job_id = job_id
        self.error = error
        self.error_type = error_type
