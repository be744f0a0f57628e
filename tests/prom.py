"""Test helpers for the metrics endpoints: plain HTTP GETs, the Prometheus text parsed into {sample: value},
and a real Prometheus server (Debian's `prometheus` package) scraping given targets every second."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def samples(text: str) -> dict[str, float]:
    """Every sample of a /metrics text: name{label="v",...} (labels sorted) -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prometheus(targets: dict[str, list[str]], tmp_path: Path, *, interval_s: int = 1) -> Iterator[str]:
    """A real Prometheus scraping `targets` (job name -> host:port list) every `interval_s`; yields its URL."""
    assert PROMETHEUS, "the prometheus binary is not installed"
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: {json.dumps(hosts)}\n"
                   for job, hosts in targets.items())
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: {interval_s}s\n  scrape_timeout: {interval_s}s\n"
                      f"scrape_configs:\n{jobs}")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(base_url: str, expr: str) -> list[dict[str, Any]]:
    """The instant-query result of `expr` ([] until Prometheus has it, or while it is still starting)."""
    try:
        status, _, body = get(f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=2)
    except OSError:
        return []
    if status != 200:
        return []
    data = json.loads(body)
    return list(data["data"]["result"]) if data.get("status") == "success" else []


def wait_for(base_url: str, expr: str, deadline_s: float, log: Path | None = None) -> list[dict[str, Any]]:
    """Poll `expr` until it has a result, or fail after `deadline_s` (with Prometheus's log)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = query(base_url, expr)
        if result:
            return result
        time.sleep(0.25)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"Prometheus had no {expr} within {deadline_s} s; its log:\n{tail}")
