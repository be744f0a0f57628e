"""Unit tier: the monitoring files parse and agree with each other and with the code: configs/prometheus.yml
(also `promtool check config` where promtool is installed), the Grafana dashboard and its provisioning,
and docker-compose.yml's prometheus, grafana and stats services and the worker's metrics port."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.stats import GAUGES
from tests.prom import PROMTOOL

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DASHBOARD = CONFIGS / "grafana" / "dashboards" / "vseg.json"
# the worker's metrics (README's metrics table) and the queue exporter's
WORKER_METRICS = {"vseg_jobs_total", "vseg_frames_total", "vseg_objects_active", "vseg_frame_seconds",
                  "vseg_first_result_seconds", "vseg_latency_seconds", "vseg_reclaims_total", "vseg_leases_lost_total",
                  "vseg_redis_errors_total", "vseg_sessions_active", "vseg_gpu_memory_bytes", "vseg_model_info"}
QUEUE_METRICS = set(GAUGES) | {"vseg_queue_up", "vseg_queue_consumer_pending"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", ())]


def test_prometheus_config_scrapes_every_worker_and_the_queue_exporter() -> None:
    config = yaml.safe_load((CONFIGS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["vseg-worker"]["dns_sd_configs"] == [{"names": ["worker", "worker-sam3"], "type": "A", "port": 9100,
                                                      "refresh_interval": "15s"}]
    assert jobs["vseg-queue"]["static_configs"] == [{"targets": ["stats:9101"]}]
    assert jobs["vseg-ingest"]["dns_sd_configs"] == [{"names": ["ingest"], "type": "A", "port": 9102,
                                                      "refresh_interval": "15s"}]
    assert jobs["vseg-alerts"]["dns_sd_configs"] == [{"names": ["alerts"], "type": "A", "port": 9103,
                                                      "refresh_interval": "15s"}]
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    sam3 = services["worker-sam3"]  # the text jobs' workers: their own service, scraped as workers
    assert sam3["command"][-2:] == ["--model", "sam3"] and sam3["environment"]["VSEG_METRICS_PORT"] == 9100
    ingest, alerts = services["ingest"], services["alerts"]
    assert "9102" in ingest["command"] and ingest["command"][:4] == ["python", "-m", "producer", "serve"]
    assert "9103" in alerts["command"] and alerts["command"][:4] == ["python", "-m", "producer", "alerts"]


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool on PATH (apt-get install prometheus)")
def test_promtool_accepts_the_config_and_every_dashboard_query(tmp_path: Path) -> None:
    out = subprocess.run([str(PROMTOOL), "check", "config", str(CONFIGS / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # each panel's query, with Grafana's $__rate_interval filled in, as a recording rule: promtool parses it
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "1m")} for i, e in enumerate(exprs())]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    out = subprocess.run([str(PROMTOOL), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_has_throughput_lag_latency_and_failure_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"] and len({p["id"] for p in panels}) == len(panels)
    assert {p["title"] for p in panels if p["type"] == "row"} >= {"Throughput", "Queue and lag", "Latency", "Failures"}
    text = "\n".join(exprs())
    for needed in ("rate(vseg_frames_total", "vseg_jobs_total", "vseg_queue_lag", "vseg_queue_oldest_pending_seconds",
                   "vseg_frame_seconds_bucket", "vseg_first_result_seconds_bucket", "vseg_latency_seconds_bucket",
                   'vseg_jobs_total{outcome=~"failed|dead"}', "vseg_leases_lost_total", "vseg_redis_errors_total"):
        assert needed in text, needed
    assert text.count("histogram_quantile(") >= 9
    named = set(re.findall(r"\bvseg_[a-z_]+", text))
    known = QUEUE_METRICS | WORKER_METRICS | {f"{m}_bucket" for m in WORKER_METRICS}
    assert named <= known, f"the dashboard queries metrics nobody exports: {sorted(named - known)}"

    datasource = yaml.safe_load((CONFIGS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == source["uid"], p["title"]
            assert all(t["datasource"]["uid"] == source["uid"] for t in p["targets"]), p["title"]


def test_compose_runs_prometheus_grafana_and_the_stats_exporter() -> None:
    services = compose()["services"]
    worker_env = services["worker"]["environment"]
    assert (str(worker_env["VSEG_METRICS_PORT"]), worker_env["VSEG_METRICS_HOST"]) == ("9100", "0.0.0.0")
    assert services["stats"]["command"] == ["python", "-m", "producer", "stats", "--serve", "9101", "--host", "0.0.0.0"]
    assert "./configs/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert mounts == {"./configs/grafana/provisioning": "/etc/grafana/provisioning",
                      "./configs/grafana/dashboards": "/etc/grafana/dashboards"}
    provider = yaml.safe_load((CONFIGS / "grafana" / "provisioning" / "dashboards" / "vseg.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/" + DASHBOARD.name
    for service in services.values():
        for volume in service.get("volumes", ()):
            if volume.startswith("./configs"):
                assert (ROOT / volume.split(":")[0]).exists(), volume
