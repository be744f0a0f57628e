"""Zone and line events POSTed to a webhook (`python -m producer alerts --webhook URL`), on a thread of the
alerts process.

The sender reads `vseg:alerts` through a consumer group of its own (`<group>-webhook`) and POSTs each event,
one at a time and in order, as the AlertEvent's JSON object, with the headers Content-Type:
application/json, X-Vseg-Event-Key (the idempotency key: a receiver drops a key it has seen) and, when
webhook_secret (VSEG_WEBHOOK_SECRET) is set, X-Vseg-Signature: sha256=<hex HMAC-SHA256 of the exact body with
the secret>. A receiver checks it as:

    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    hmac.compare_digest(expected, request.headers["X-Vseg-Signature"])

Failures: a connection error, a timeout (webhook_timeout_s), a 5xx, 408 or 429 is retried with exponential
backoff (retry_backoff_s, doubling, at most 60 s; a Retry-After header is honoured); any other answer but a
2xx (400, 401, 404, a redirect) is given up at once; after webhook_max_attempts POSTs it is given up too. A
given-up event is logged with its key and counted (vseg_webhook_deliveries_total{outcome="given_up"}). An
entry is acknowledged once delivered or given up, so a sender stopped (SIGTERM) or killed mid-retry sends
the unsent ones when it starts again.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import redis

from runtime.faults import is_redis_full
from runtime.settings import Settings
from schemas import alerts
from schemas.alerts import AlertEvent
from schemas.errors import ConfigError, SchemaError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 3600.0
RETRYABLE_STATUS = frozenset({408, 429})
CONSUMER = "sender"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_url(url: str, secret: str) -> str:
    """The webhook URL, or ConfigError; warns loudly about unsigned events sent in the clear to another host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--webhook must be an http:// or https:// URL with a host, but got {url!r}")
    local = parts.hostname in LOCAL_HOSTS or parts.hostname.startswith("127.")
    if not secret and parts.scheme == "http" and not local:
        log.warning("WEBHOOK EVENTS ARE SENT UNSIGNED AND UNENCRYPTED to %s: anyone on the way can read or forge "
                    "them; set VSEG_WEBHOOK_SECRET (the receiver checks X-Vseg-Signature) and use https://",
                    parts.hostname)
    elif not secret:
        log.info("webhook events to %s are unsigned (VSEG_WEBHOOK_SECRET is not set)", parts.hostname)
    return url


def signature(secret: str, body: bytes) -> str:
    """The X-Vseg-Signature header's value: sha256=<hex HMAC-SHA256 of `body`>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (given up, naming the status), never followed: a POST would become a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookSender:
    """Delivers the events of `vseg:alerts` to `url` (see the module doc). `run(stop)` until `stop` is set."""

    def __init__(self, client: redis.Redis, settings: Settings, url: str, *, group: str,
                 on_outcome: Callable[[str], None] = lambda outcome: None) -> None:
        self.client, self.settings, self.url, self.group = client, settings, url, group
        self.on_outcome = on_outcome
        self.stream = settings.keys.alerts
        self.read_from = "0"  # this consumer's pending entries first: those a stop or a crash left unsent
        self._opener = urllib.request.build_opener(_NoRedirects)

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="$", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="webhook", daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        backoff_s = 0.1
        while not stop.is_set():
            try:
                self.ensure_group()
                while not stop.is_set():
                    self._round(stop)
                    backoff_s = 0.1
            except redis.ResponseError as e:
                if not is_redis_full(e) and "NOGROUP" not in str(e):
                    raise
                log.warning("webhook: %s; reading %s again in %.1f s", e, self.stream, backoff_s)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("webhook: Redis unavailable (%s); retrying in %.1f s", e, backoff_s)
            self.read_from = "0"
            stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    def _round(self, stop: threading.Event) -> None:
        block = None if self.read_from != ">" else min(self.settings.block_ms, 1000)
        reply = self.client.xreadgroup(self.group, CONSUMER, {self.stream: self.read_from}, count=16, block=block)
        entries = [(i.decode() if isinstance(i, bytes) else str(i), f) for i, f in _entries(reply)]
        if self.read_from != ">":
            self.read_from = entries[-1][0] if entries else ">"
        for entry_id, fields in entries:
            if not fields:
                log.warning("webhook: alert %s was trimmed from %s before it was sent", entry_id, self.stream)
            else:
                try:
                    event = alerts.decode(fields)
                except SchemaError as e:
                    log.error("webhook: skipping undecodable alert %s: %s", entry_id, e)
                else:
                    if self.deliver(event, stop) is None:
                        return  # stopped mid-retry: left pending, sent after a restart
            self.client.xack(self.stream, self.group, entry_id)

    def deliver(self, event: AlertEvent, stop: threading.Event | None = None) -> str | None:
        """POST `event` until it is delivered or given up: "delivered", "given_up", or None if `stop` was set."""
        stop = stop or threading.Event()
        body = alerts.to_json(event)
        headers = {"Content-Type": "application/json", "X-Vseg-Event-Key": event.key,
                   "User-Agent": "vseg-alerts/1"}
        if self.settings.webhook_secret:
            headers["X-Vseg-Signature"] = signature(self.settings.webhook_secret, body)
        backoff_s, attempts = self.settings.retry_backoff_s, self.settings.webhook_max_attempts
        for attempt in range(1, attempts + 1):
            status, said, wait_s = self._post(body, headers)
            if status is not None and 200 <= status < 300:
                self.on_outcome("delivered")
                log.debug("webhook: delivered %s (HTTP %d, attempt %d)", event.key, status, attempt)
                return "delivered"
            if status is not None and status < 500 and status not in RETRYABLE_STATUS:
                log.error("webhook: gave up event %s at once: %s (a 4xx other than 408 and 429 is not retried: check "
                          "the URL and what the receiver expects)", event.key, said)
                break
            if attempt == attempts:
                log.error("webhook: gave up event %s after %d attempts (webhook_max_attempts); last: %s", event.key,
                          attempts, said)
                break
            delay_s = backoff_s if wait_s is None else min(max(backoff_s, wait_s), MAX_RETRY_AFTER_S)
            log.warning("webhook: event %s not delivered (%s); attempt %d of %d in %.2f s", event.key, said,
                        attempt + 1, attempts, delay_s)
            self.on_outcome("retried")
            if stop.wait(delay_s):
                return None
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
        self.on_outcome("given_up")
        return "given_up"

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int | None, str, float | None]:
        """One POST: (HTTP status or None for no answer, what happened, the Retry-After in seconds)."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.settings.webhook_timeout_s) as response:
                response.read(65536)
                return int(response.status), f"HTTP {response.status}", None
        except urllib.error.HTTPError as e:
            with e:
                return int(e.code), f"HTTP {e.code} {e.reason}", retry_after_s(cast(Any, e.headers).get("Retry-After"))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            return None, f"no answer from {urlsplit(self.url).netloc} ({reason})", None


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's entries of its one stream: (id, fields; None or empty when trimmed away)."""
    return list(cast(list[tuple[Any, list[tuple[Any, Any]]]], reply)[0][1]) if reply else []
