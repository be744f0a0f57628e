"""Unit tier: the metrics endpoint (runtime/metrics.py): /metrics in the Prometheus text format from the
registry it is given, /healthz and /readyz from its probes (200 or 503, one line), 127.0.0.1 by default,
port 0 picks a free port, and close() releases it."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.metrics import MetricsError, MetricsServer
from tests.prom import get, samples


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    jobs = Counter("vseg_jobs", "Jobs ended", ["outcome"], registry=reg)
    jobs.labels("completed").inc(3)
    jobs.labels("failed").inc()
    Gauge("vseg_sessions_active", "Sessions", registry=reg).set(1)
    Histogram("vseg_frame_seconds", "Per frame", buckets=(0.1, 1.0), registry=reg).observe(0.5)
    return reg


def test_metrics_are_served_in_the_prometheus_text_format() -> None:
    with MetricsServer(registry()) as server:
        assert server.host == "127.0.0.1" and server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        status, content_type, body = get(f"{server.url}/metrics")
        assert status == 200 and content_type.startswith("text/plain") and "version=" in content_type
        got = samples(body)
        assert got['vseg_jobs_total{outcome="completed"}'] == 3 and got['vseg_jobs_total{outcome="failed"}'] == 1
        assert got["vseg_sessions_active"] == 1
        assert got['vseg_frame_seconds_bucket{le="1.0"}'] == 1 and got['vseg_frame_seconds_bucket{le="0.1"}'] == 0
        assert get(f"{server.url}/metrics?x=1")[0] == 200
        assert get(f"{server.url}/nope")[0] == 404


def test_probes_answer_200_or_503_with_a_one_line_reason() -> None:
    state = {"ready": False}

    def ready() -> tuple[bool, str]:
        return state["ready"], "model loaded" if state["ready"] else "loading the model\n(tiny)"

    def broken() -> tuple[bool, str]:
        raise ConnectionError("Redis\nis down")

    with MetricsServer(CollectorRegistry(), ready=ready, health=broken) as server:
        assert get(f"{server.url}/readyz") == (503, "text/plain; charset=utf-8", "loading the model (tiny)\n")
        state["ready"] = True
        assert get(f"{server.url}/readyz")[0::2] == (200, "ok: model loaded\n")
        assert get(f"{server.url}/healthz")[0::2] == (503, "ConnectionError: Redis is down\n")
        head = urllib.request.Request(f"{server.url}/readyz", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as reply:
            assert reply.status == 200 and reply.read() == b""
    with MetricsServer(CollectorRegistry()) as server:  # no probes: both ok
        assert get(f"{server.url}/healthz")[0::2] == (200, "ok: ok\n") and get(f"{server.url}/readyz")[0] == 200


def test_a_taken_port_is_a_one_line_error_and_close_releases_the_port() -> None:
    server = MetricsServer(CollectorRegistry()).start()
    port = server.port
    with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port} .*VSEG_METRICS_PORT"):
        MetricsServer(CollectorRegistry(), port=port).start()
    server.close()
    server.close()  # idempotent
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again
    again = MetricsServer(CollectorRegistry(), port=port).start()
    try:
        assert again.port == port and get(f"{again.url}/healthz")[0] == 200
    finally:
        again.close()


def test_it_binds_where_it_is_told() -> None:
    with MetricsServer(CollectorRegistry(), host="0.0.0.0") as server:
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    with pytest.raises(RuntimeError, match="not started"):
        _ = MetricsServer(CollectorRegistry()).port
