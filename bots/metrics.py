"""What a running gateway exposes to Prometheus (via prometheus-client).

One `Metrics` object per process owns its own `CollectorRegistry`, so tests can create
as many gateways as they like without duplicate-metric errors. `ReplyMetrics` adapts it
to LiveReply's observer interface for one turn.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class Metrics:
    """The counters, gauges and histograms of one gateway process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "parley_messages_received", "Chat messages received", ["platform"], registry=r
        )
        self.turns = Counter("parley_turns", "Agent turns by outcome", ["platform", "outcome"], registry=r)
        self.time_to_first_token = Histogram(
            "parley_time_to_first_token_seconds",
            "From the model request to its first streamed delta",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_visible = Histogram(
            "parley_time_to_first_visible_seconds",
            "From the start of a turn to the first text visible in the chat",
            ["platform"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.platform_calls = Counter(
            "parley_platform_calls", "Calls made to a chat platform (send, edit, delete, typing, draft)",
            ["platform", "kind"], registry=r,
        )
        self.rate_limited = Counter(
            "parley_rate_limited", "429 / flood-control answers received from a platform", ["platform"], registry=r
        )
        self.edit_lateness = Histogram(
            "parley_edit_lateness_seconds",
            "How late a platform call went out after the pacer allowed it",
            ["platform"],
            buckets=_LATENESS_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "parley_fallbacks", "Model calls answered by the non-streaming fallback, by cause", ["cause"], registry=r
        )
        self.provider_requests = Counter(
            "parley_provider_requests",
            "HTTP requests sent to the model provider, by kind (stream, request) and attempt"
            " (first; retry: the SDK sent it again; fallback: non-streaming after a broken stream)",
            ["kind", "attempt"],
            registry=r,
        )
        self.tokens = Counter("parley_tokens", "Tokens used, by model and kind", ["model", "kind"], registry=r)
        self.deliveries_failed = Counter(
            "parley_deliveries_failed", "Replies that could not be delivered completely", ["platform"], registry=r
        )
        self.duplicates_ignored = Counter(
            "parley_duplicate_updates", "Redelivered platform updates that were ignored", ["platform"], registry=r
        )
        self.inbound_rate_limited = Counter(
            "parley_inbound_rate_limited",
            "Messages dropped because their sender went over access.user_rate",
            ["platform"],
            registry=r,
        )
        self.media_refused = Counter(
            "parley_media_refused",
            "Messages not answered because of a file in them, by reason (too_large, unavailable, not_an_image,"
            " unsupported, images_off, encrypted_pdf, damaged_pdf, transcription_failed, no_speech, ...)",
            ["platform", "reason"],
            registry=r,
        )
        self.queue_full = Counter(
            "parley_queue_full",
            "Messages refused because their sender already had chat.queue_max messages waiting in the chat",
            ["platform"],
            registry=r,
        )
        self.spilled = Gauge(
            "parley_inbox_spilled",
            "Messages held in memory because the store could not take them (written once it is back)",
            registry=r,
        )
        self.spill_overflows = Counter(
            "parley_inbox_spill_overflows",
            "Messages the in-memory spill queue had no room for (their senders were asked to resend)",
            ["platform"],
            registry=r,
        )
        self.recovered = Counter(
            "parley_inbox_recovered",
            "Messages an earlier process left unfinished, by what became of them at start-up",
            ["action"],
            registry=r,
        )
        self.store_retries = Counter(
            "parley_store_retries", "Store calls retried after the database failed", ["what"], registry=r
        )
        self.active_turns = Gauge("parley_active_turns", "Turns running now", registry=r)
        self.queue_depth = Gauge("parley_queue_depth", "Messages waiting in chat queues", registry=r)
        self.failovers = Counter(
            "parley_model_failovers",
            "Model calls answered by another model of the chain after the chosen one failed",
            ["from_model", "to_model"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "parley_model_breaker_open",
            "1 while a model is skipped after failing repeatedly (its circuit breaker is open), else 0",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "parley_queue_wait_seconds",
            "Seconds from a message's arrival to the start of the turn answering it",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        # Cluster mode (bots.cluster); zero / absent in a single process.
        self.takeovers = Counter(
            "parley_cluster_takeovers",
            "Conversations taken over from a replica whose heartbeat stopped (its lease ran out)",
            registry=r,
        )
        self.cluster_replicas = Gauge(
            "parley_cluster_replicas", "Replicas with a fresh heartbeat, as this replica last counted", registry=r
        )
        self.cluster_conversations = Gauge(
            "parley_cluster_conversations", "Conversations this replica works on now", registry=r
        )
        self.shared_budget_waits = Counter(
            "parley_shared_budget_waits",
            "Platform calls that waited for the budget shared by all replicas (Redis)",
            ["platform"],
            registry=r,
        )
        self.shared_budget_wait_seconds = Counter(
            "parley_shared_budget_wait_seconds",
            "Seconds platform calls waited for the budget shared by all replicas",
            ["platform"],
            registry=r,
        )
        self._breakers: Callable[[], dict[str, dict[str, object]]] | None = None
        self._transport_429: set[str] = set()

    def count_429_at_transport(self, platform: str) -> None:
        """`platform`'s connector counts every 429 where it arrives (e.g. an HTTP trace hook).

        Its client library may sleep through a 429 without ever raising, so the transport
        is the only place that sees them all; a `RateLimited` that does surface later must
        then not be counted a second time (see `record_rate_limited`).
        """
        self._transport_429.add(platform)

    def count_provider_request(self, kind: str, attempt: str) -> None:
        """The agent's `RequestObserver`: every request a provider may bill, retries included."""
        self.provider_requests.labels(kind, attempt).inc()

    def record_rate_limited(self, platform: str) -> None:
        """Count a `RateLimited` seen above the connector -- unless its transport counted it."""
        if platform not in self._transport_429:
            self.rate_limited.labels(platform).inc()

    def track(self, active: Callable[[], int], queued: Callable[[], int]) -> None:
        """Have the gauges read live values at scrape time."""
        self.active_turns.set_function(lambda: float(active()))
        self.queue_depth.set_function(lambda: float(queued()))

    def watch_breakers(self, snapshot: Callable[[], dict[str, dict[str, object]]]) -> None:
        """Read the models' circuit breakers (`agent.providers.Breaker.snapshot`) at scrape time."""
        self._breakers = snapshot

    def exposition(self) -> bytes:
        if self._breakers is not None:
            for model, state in self._breakers().items():
                self.breaker_open.labels(model).set(1.0 if state.get("state") == "open" else 0.0)
        return generate_latest(self.registry)


class ReplyMetrics:
    """LiveReply's observer for one turn on one platform."""

    def __init__(self, metrics: Metrics, platform: str, started: float | None = None) -> None:
        self._m = metrics
        self._platform = platform
        self._started = time.monotonic() if started is None else started
        self._calls = {kind: metrics.platform_calls.labels(platform, kind) for kind in ("send", "edit", "delete", "typing", "draft")}
        self._lateness = metrics.edit_lateness.labels(platform)

    def on_call(self, kind: str) -> None:
        self._calls[kind].inc()

    def on_rate_limited(self, retry_after: float) -> None:
        self._m.record_rate_limited(self._platform)

    def on_lateness(self, seconds: float) -> None:
        self._lateness.observe(seconds)

    def on_first_visible(self) -> None:
        self._m.time_to_first_visible.labels(self._platform).observe(time.monotonic() - self._started)
