"""Prometheus metrics, opt-in: ``serve --metrics HOST:PORT`` and the gateway's ``/metrics``.

Each process keeps its own registry (never the global one, which libraries share), fed from
the structured events the server already emits for its log, so metrics, the JSON log and the
live view count the same things. No label holds a peer id: peers come and go by thousands,
and every label value is a time series kept forever.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: first tokens from tens of ms (a warm slot) to a minute (a long prompt behind a queue).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)  # one token: GPU to a slow CPU
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DHT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class ServeMetrics:
    """What a serving peer did: requests by outcome, tokens, latencies, load, DHT timings."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gputorrent_requests", "Requests answered or turned away, by outcome "
                                "(stop, length, eog, deadline, cancelled, failed, busy, refused)", ["outcome"],
                                registry=r)
        self.refused = Counter("gputorrent_refused", "Requests refused, by error code", ["code"], registry=r)
        self.integrity = Counter("gputorrent_integrity_failures", "Frames from requesters that failed to decode "
                                 "or verify", registry=r)
        self.prompt_tokens = Counter("gputorrent_prompt_tokens", "Prompt tokens accepted", registry=r)
        self.generated_tokens = Counter("gputorrent_generated_tokens", "Tokens generated", registry=r)
        self.running = Gauge("gputorrent_requests_running", "Requests holding a slot", registry=r)
        self.queued = Gauge("gputorrent_requests_queued", "Requests waiting for a slot", registry=r)
        self.slots = Gauge("gputorrent_slots", "Slots (answers generated at once)", registry=r)
        self.kv_cache = Gauge("gputorrent_kv_cache_usage_ratio", "Share of the KV cache in use (0 to 1)", registry=r)
        self.admissions = Gauge("gputorrent_contended_admissions", "Slots given with waiters to choose from, "
                                "since start, by how (by_credit: reciprocity; optimistic: the share kept for "
                                "requesters with no credit)", ["how"], registry=r)
        self.ttft = Histogram("gputorrent_time_to_first_token_seconds", "From taking a slot to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gputorrent_inter_token_latency_seconds", "Mean time between tokens, one per answer",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.queue = Histogram("gputorrent_queue_time_seconds", "From acceptance to taking a slot",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("gputorrent_request_duration_seconds", "From acceptance to the last token",
                             buckets=DURATION_BUCKETS, registry=r)
        self.announce = Histogram("gputorrent_announce_seconds", "One announce (advert put, and provider records "
                                  "when renewed)", buckets=DHT_BUCKETS, registry=r)
        self.lookup = Histogram("gputorrent_dht_lookup_seconds", "One DHT walk", buckets=DHT_BUCKETS, registry=r)
        self._started: dict[str, float] = {}  # request id -> monotonic time accepted

    def event(self, ev: dict[str, Any]) -> None:
        """Fold one server event (as the JSON log writes it) into the metrics."""
        kind = ev.get("event")
        if kind == "accepted":
            self.prompt_tokens.inc(ev.get("prompt_tokens", 0))
            if len(self._started) < 10_000:
                self._started[ev.get("request_id", "")] = time.monotonic()
        elif kind == "done":
            self.requests.labels(ev.get("finish_reason") or "stop").inc()
            started = self._started.pop(ev.get("request_id", ""), None)
            if started is not None:
                self.e2e.observe(time.monotonic() - started)
            n = ev.get("completion_tokens", 0)
            self.generated_tokens.inc(n)
            if n:
                self.ttft.observe(ev.get("ttft_ms", 0.0) / 1000)
                self.queue.observe(ev.get("queue_ms", 0.0) / 1000)
            if n > 1 and ev.get("decode_ms"):
                self.itl.observe(ev["decode_ms"] / 1000 / (n - 1))
        elif kind == "failed":
            self.requests.labels("failed").inc()
            self._started.pop(ev.get("request_id", ""), None)
        elif kind == "busy":
            self.requests.labels("busy").inc()
        elif kind == "refused":
            self.requests.labels("refused").inc()
            self.refused.labels(ev.get("code", "?")).inc()
            if ev.get("malformed"):
                self.integrity.inc()

    def timing(self, what: str, seconds: float) -> None:
        """A DHT timing from the node: ``announce`` or ``lookup``."""
        (self.announce if what == "announce" else self.lookup).observe(seconds)

    async def watch(self, snapshot: Callable[[], dict[str, Any]], every: float = 0.5) -> None:
        """Copy the live status into the gauges and ``latest`` every ``every`` seconds, on the
        event loop (``snapshot`` reads trio state, which the scrape thread must not touch)."""
        import trio

        while True:
            st = self.latest = snapshot()
            self.running.set(st["active"])
            self.queued.set(st["queued"])
            self.slots.set(st["slots"])
            self.kv_cache.set(st.get("kv_cache_usage", 0.0))
            for how in ("by_credit", "optimistic"):
                self.admissions.labels(how).set(st.get("admissions", {}).get(how, 0))
            await trio.sleep(every)

    latest: dict[str, Any] = {}


class RequesterMetrics:
    """The requester side, for the gateway: requests, failovers, attempts, lookup time."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gputorrent_gateway_requests", "HTTP generation requests, by outcome "
                                "(ok, failed, busy, bad_request)", ["outcome"], registry=r)
        self.failovers = Counter("gputorrent_gateway_failovers", "Answers moved to another peer mid-answer",
                                 registry=r)
        self.attempts = Histogram("gputorrent_gateway_attempts", "Peers tried per answer",
                                  buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.generated_tokens = Counter("gputorrent_gateway_generated_tokens", "Tokens streamed to clients",
                                        registry=r)
        self.ttft = Histogram("gputorrent_gateway_time_to_first_token_seconds", "From the HTTP request to the "
                              "first token", buckets=LATENCY_BUCKETS, registry=r)
        self.lookup = Histogram("gputorrent_gateway_peer_choice_seconds", "Choosing peers: DHT lookup and pings",
                                buckets=DHT_BUCKETS, registry=r)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsServer:
    """``/metrics`` (Prometheus text) and ``/status`` (JSON) on HOST:PORT, in a thread: a scrape
    must be answered even while the event loop is busy, and must not slow it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 status: Callable[[], dict[str, Any]] = dict) -> None:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = exposition(registry)
                elif path == "/status":
                    body, ctype = json.dumps(metrics.status()).encode(), "application/json"
                else:
                    self.send_error(404, "try /metrics or /status")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
                pass

        self.status = status
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host, self.port = host, self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
