"""Unit tier: structured logs. VSEG_LOG_FORMAT=json gives one JSON object a line, and every record made
inside a job's log context (in its thread, or a thread started with ContextThread) carries job_id,
attempt and worker; none outside it."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.logs import (
    ContextThread,
    JobFields,
    JsonFormatter,
    in_current_context,
    job_log_context,
    job_log_fields,
    start_in_context,
)
from runtime.settings import Settings
from schemas.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(JobFields())
    logger = logging.getLogger("test.jsonlog")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def records(stream: io.StringIO) -> list[dict[str, object]]:
    lines = stream.getvalue().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is one whole JSON object
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def test_records_are_one_json_object_a_line_with_the_job_fields_only_inside_the_context(
        json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    log.info("before any job")
    with job_log_context(worker="w-1"):
        log.info("idle, waiting for a job")
        with job_log_context(job_id="job-7", attempt=2):
            log.warning("frame %d\nspans two lines", 3)
            try:
                raise RuntimeError("boom\nsecond line")
            except RuntimeError:
                log.exception("it failed")
            assert job_log_fields() == {"worker": "w-1", "job_id": "job-7", "attempt": 2}
        log.info("job over")
    log.info("after")

    out = records(stream)
    assert [r["message"] for r in out] == ["before any job", "idle, waiting for a job", "frame 3\nspans two lines",
                                           "it failed", "job over", "after"]
    assert len(stream.getvalue().splitlines()) == 6  # a message or a traceback with newlines is still one line
    for r in out:
        assert {"ts", "level", "logger", "message"} <= set(r) and r["logger"] == "test.jsonlog"
        assert str(r["ts"]).endswith("Z") and "T" in str(r["ts"])
    assert "job_id" not in out[0] and "worker" not in out[0] and "job_id" not in out[5] and "worker" not in out[5]
    assert out[1]["worker"] == "w-1" and "job_id" not in out[1] and "job_id" not in out[4]
    for r in out[2:4]:
        assert (r["job_id"], r["attempt"], r["worker"]) == ("job-7", 2, "w-1")
    assert out[2]["level"] == "WARNING" and out[3]["level"] == "ERROR"
    assert "RuntimeError: boom" in str(out[3]["exc_info"]) and "Traceback" in str(out[3]["exc_info"])
    assert "exc_info" not in out[2]


def test_threads_started_in_the_context_carry_the_job_fields_and_plain_threads_do_not(
        json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    with job_log_context(job_id="job-8", attempt=1, worker="w-2"):
        sink = ContextThread(target=lambda: log.info("from the result sink"), name="sink")
        sink.start()
        sink.join()
        start_in_context(log.info, "from the lease heartbeat", name="lease").join()
        plain = threading.Thread(target=lambda: log.info("from a plain thread"))
        plain.start()
        plain.join()
        with ThreadPoolExecutor(2) as pool:
            pool.submit(in_current_context(log.info), "from a pool task").result()
            pool.submit(log.info, "from an unbound pool task").result()
        later = ContextThread(target=lambda: log.info("started after the context"))
    later.start()  # the context is the one start() is called in
    later.join()

    by_message = {r["message"]: r for r in records(stream)}
    for message in ("from the result sink", "from the lease heartbeat", "from a pool task"):
        assert (by_message[message].get("job_id"), by_message[message].get("attempt"),
                by_message[message].get("worker")) == ("job-8", 1, "w-2"), message
    for message in ("from a plain thread", "from an unbound pool task", "started after the context"):
        assert "job_id" not in by_message[message] and "worker" not in by_message[message], message


def test_a_thread_inherits_the_fields_but_its_own_context_stays_its_own(
        json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    seen: list[dict[str, object]] = []

    def inner() -> None:
        with job_log_context(attempt=5):
            seen.append(job_log_fields())

    with job_log_context(job_id="job-9", attempt=1):
        start_in_context(inner).join()
        log.info("parent")
    assert seen == [{"job_id": "job-9", "attempt": 5}]
    assert records(stream)[0]["attempt"] == 1


def test_explicit_extra_wins_and_reserved_names_are_refused(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    with job_log_context(job_id="job-1"):
        log.info("other job", extra={"job_id": "job-2"})
    assert records(stream)[0]["job_id"] == "job-2"
    with pytest.raises(ValueError, match="LogRecord"), job_log_context(message="x"):
        pass


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


CONFIGURED = """
import logging
from runtime.logs import configure_logging, job_log_context, start_in_context
configure_logging()
log = logging.getLogger("worker.job")
log.info("starting")
with job_log_context(job_id="abc", attempt=1, worker="host-1"):
    log.info("job started")
    start_in_context(log.warning, "from the sink thread").join()
log.info("done")
"""


def test_configure_logging_follows_vseg_log_format() -> None:
    out = run_python(CONFIGURED, {"VSEG_LOG_FORMAT": "json", "VSEG_LOG_LEVEL": "INFO"})
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [r["message"] for r in lines] == ["starting", "job started", "from the sink thread", "done"]
    assert all((r["job_id"], r["attempt"], r["worker"]) == ("abc", 1, "host-1") for r in lines[1:3])
    assert "job_id" not in lines[0] and "job_id" not in lines[3]

    text = run_python(CONFIGURED, {"VSEG_LOG_FORMAT": "text"})
    assert text.returncode == 0 and len(text.stderr.splitlines()) == 4
    assert " INFO    worker.job: job started" in text.stderr and not text.stderr.lstrip().startswith("{")


def test_the_producer_cli_logs_its_one_error_line_as_json_with_the_job_id() -> None:
    """Redis down (nothing listens on port 1): still one line on stderr, a JSON object naming the job."""
    out = subprocess.run([sys.executable, "-m", "producer", "status", "job-42"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "VSEG_LOG_FORMAT": "json",
                                                     "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 1 and not out.stdout
    (line,) = out.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["logger"] == "producer" and record["job_id"] == "job-42"
    assert "cannot reach Redis" in str(record["message"])


def test_a_bad_log_format_is_a_one_line_config_error() -> None:
    out = subprocess.run([sys.executable, "-m", "producer", "stats"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "VSEG_LOG_FORMAT": "yaml"})
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "log_format (VSEG_LOG_FORMAT) must be text or json, but got 'yaml'" in out.stderr


@pytest.mark.parametrize("env, match", [
    ({"VSEG_LOG_FORMAT": "JSONL"}, "must be text or json"),
    ({"VSEG_METRICS_PORT": "65536"}, r"metrics_port \(VSEG_METRICS_PORT\) must be 0..65535"),
    ({"VSEG_METRICS_PORT": "-1"}, "must be 0..65535"),
    ({"VSEG_METRICS_PORT": "http"}, "VSEG_METRICS_PORT"),
])
def test_bad_observability_settings(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.load(env, config_path=None)


def test_observability_settings_defaults_and_environment() -> None:
    s = Settings.load({})
    assert (s.metrics_port, s.metrics_host, s.log_format) == (0, "127.0.0.1", "text")
    s = Settings.load({"VSEG_METRICS_PORT": "9100", "VSEG_METRICS_HOST": "0.0.0.0", "VSEG_LOG_FORMAT": "json"},
                      config_path=None)
    assert (s.metrics_port, s.metrics_host, s.log_format) == (9100, "0.0.0.0", "json")
