"""The webhook sender (producer/webhook.py) against a real Redis and a local HTTP server: a receiver that fails
twice (500) then answers gets the event delivered once, each POST signed (HMAC-SHA256 of the exact body), with
backoff between them; a 400 is given up at once, too many failures after webhook_max_attempts, both
acknowledged; Retry-After is honoured; a sender stopped mid-retry sends the unsent events when it starts again;
the URL is checked and an unsigned one in the clear is a loud warning."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from producer.webhook import WebhookSender, check_url, retry_after_s
from runtime.settings import Settings
from schemas import alerts
from schemas.alerts import AlertEvent
from schemas.errors import ConfigError
from tests.workers import wait_for

SECRET = "s3cret"


class Receiver:
    """A local HTTP server answering each POST with the next of `answers` (status, extra headers; the last
    repeats), recording each request and when it came."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]) -> None:
        self.answers = answers
        self.got: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append((time.monotonic(), dict(self.headers), body))
                status, headers = receiver.answers[min(len(receiver.got), len(receiver.answers)) - 1]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, webhook_secret=SECRET, retry_backoff_s=0.05, webhook_max_attempts=4,
                               webhook_timeout_s=2.0)


def event(n: int = 1) -> AlertEvent:
    return AlertEvent(key=f"j1:{n}:1:zone_enter:door", type="zone_enter", job_id="j1", obj_id=1, zone="door",
                      frame_idx=n, t_s=n / 10, at=1.0, overlap=0.75)


def publish(client: redis.Redis, settings: Settings, *events: AlertEvent) -> None:
    for e in events:
        client.xadd(settings.keys.alerts, cast(Any, alerts.encode(e)))


def outcomes() -> tuple[list[str], Any]:
    got: list[str] = []
    return got, got.append


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(answers: list[tuple[int, dict[str, str]]]) -> Receiver:
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def sending(sender: WebhookSender) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    sender.ensure_group()
    return stop, sender.start(stop)


def pending(client: redis.Redis, settings: Settings, group: str) -> int:
    return int(cast(dict[str, Any], client.xpending(settings.keys.alerts, group))["pending"])


@pytest.mark.integration
def test_two_500s_then_a_200_delivers_once_signed_with_backoff(hook_settings: Settings, redis_client: redis.Redis,
                                                               receiver_factory: Any) -> None:
    receiver = receiver_factory([(500, {}), (500, {}), (200, {})])
    said, on_outcome = outcomes()
    sender = WebhookSender(redis_client, hook_settings, receiver.url, group="hook", on_outcome=on_outcome)
    stop, thread = sending(sender)
    publish(redis_client, hook_settings, event(1))
    wait_for(lambda: "delivered" in said, 10, "the delivery")
    stop.set()
    thread.join(5)
    assert said == ["retried", "retried", "delivered"] and len(receiver.got) == 3
    bodies = {body for _t, _h, body in receiver.got}
    assert len(bodies) == 1, "every attempt sends the same bytes"
    (body,) = bodies
    assert json.loads(body) == json.loads(alerts.to_json(event(1))) and json.loads(body)["overlap"] == 0.75
    for _t, headers, _b in receiver.got:
        assert headers["X-Vseg-Signature"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Vseg-Event-Key"] == "j1:1:1:zone_enter:door"
        assert headers["Content-Type"] == "application/json"
    gaps = [b[0] - a[0] for a, b in zip(receiver.got, receiver.got[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, f"backoff doubles from retry_backoff_s: {gaps}"
    assert pending(redis_client, hook_settings, "hook") == 0


@pytest.mark.integration
def test_a_400_is_given_up_at_once_and_the_next_event_goes_on(hook_settings: Settings, redis_client: redis.Redis,
                                                               receiver_factory: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    receiver = receiver_factory([(400, {}), (200, {})])
    said, on_outcome = outcomes()
    sender = WebhookSender(redis_client, hook_settings, receiver.url, group="hook", on_outcome=on_outcome)
    stop, thread = sending(sender)
    with caplog.at_level(logging.ERROR, "producer.webhook"):
        publish(redis_client, hook_settings, event(1), event(2))
        wait_for(lambda: len(said) == 2, 10, "both events")
    stop.set()
    thread.join(5)
    assert said == ["given_up", "delivered"] and len(receiver.got) == 2
    assert "gave up event j1:1:1:zone_enter:door at once: HTTP 400" in caplog.text
    assert pending(redis_client, hook_settings, "hook") == 0


@pytest.mark.integration
def test_failing_past_max_attempts_is_given_up_and_acknowledged(hook_settings: Settings, redis_client: redis.Redis,
                                                                 receiver_factory: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    receiver = receiver_factory([(503, {})])
    said, on_outcome = outcomes()
    sender = WebhookSender(redis_client, hook_settings, receiver.url, group="hook", on_outcome=on_outcome)
    stop, thread = sending(sender)
    with caplog.at_level(logging.ERROR, "producer.webhook"):
        publish(redis_client, hook_settings, event(1))
        wait_for(lambda: "given_up" in said, 10, "the give-up")
    stop.set()
    thread.join(5)
    assert said == ["retried"] * 3 + ["given_up"] and len(receiver.got) == 4
    assert "gave up event j1:1:1:zone_enter:door after 4 attempts" in caplog.text
    assert pending(redis_client, hook_settings, "hook") == 0


@pytest.mark.integration
def test_retry_after_is_honoured_and_no_answer_is_retried(hook_settings: Settings, redis_client: redis.Redis,
                                                          receiver_factory: Any) -> None:
    receiver = receiver_factory([(429, {"Retry-After": "1"}), (200, {})])
    said, on_outcome = outcomes()
    sender = WebhookSender(redis_client, hook_settings, receiver.url, group="hook", on_outcome=on_outcome)
    assert sender.deliver(event(1)) == "delivered"
    assert receiver.got[1][0] - receiver.got[0][0] >= 1.0
    nobody = WebhookSender(redis_client, dataclasses.replace(hook_settings, webhook_max_attempts=2),
                           "http://127.0.0.1:9/hook", group="hook", on_outcome=on_outcome)
    said.clear()
    assert nobody.deliver(event(2)) == "given_up" and said == ["retried", "given_up"]


@pytest.mark.integration
def test_a_sender_stopped_mid_retry_sends_the_unsent_when_it_starts_again(hook_settings: Settings,
                                                                          redis_client: redis.Redis,
                                                                          receiver_factory: Any) -> None:
    down = receiver_factory([(500, {})])
    said, on_outcome = outcomes()
    patient = dataclasses.replace(hook_settings, retry_backoff_s=5.0)
    first = WebhookSender(redis_client, patient, down.url, group="hook", on_outcome=on_outcome)
    stop, thread = sending(first)
    publish(redis_client, hook_settings, event(1), event(2))
    wait_for(lambda: said == ["retried"], 10, "a first failure")
    stop.set()  # SIGTERM while it waits to retry: nothing acknowledged
    thread.join(5)
    assert not thread.is_alive() and pending(redis_client, hook_settings, "hook") == 1
    publish(redis_client, hook_settings, event(3))  # while no sender runs
    up = receiver_factory([(200, {})])
    said.clear()
    second = WebhookSender(redis_client, hook_settings, up.url, group="hook", on_outcome=on_outcome)
    stop, thread = sending(second)
    wait_for(lambda: len(said) == 3, 10, "the unsent events")
    stop.set()
    thread.join(5)
    assert [json.loads(body)["frame_idx"] for _t, _h, body in up.got] == [1, 2, 3]
    assert pending(redis_client, hook_settings, "hook") == 0


def test_the_url_is_checked_and_unsigned_events_in_the_clear_are_a_loud_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    for bad in ("ftp://host/x", "hooks.example.com/x", "http:///x"):
        with pytest.raises(ConfigError, match="--webhook must be an http:// or https:// URL"):
            check_url(bad, "")
    with caplog.at_level(logging.WARNING, "producer.webhook"):
        check_url("http://127.0.0.1:8080/x", "")
        check_url("http://hooks.example.com/x", "secret")
        check_url("https://hooks.example.com/x", "")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        check_url("http://hooks.example.com/x", "")
    assert "UNSIGNED AND UNENCRYPTED to hooks.example.com" in caplog.text


def test_retry_after_as_seconds_or_a_date() -> None:
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= (retry_after_s(in_a_minute) or 0) <= 61
