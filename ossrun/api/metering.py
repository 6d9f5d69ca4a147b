"""Prices, neurons and the Prometheus metrics: what each request cost, and how the server is doing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per million tokens and neurons per million tokens (spec §8)."""

    input_usd: float
    output_usd: float
    input_neurons: float
    output_neurons: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        usd = (prompt_tokens * self.input_usd + completion_tokens * self.output_usd) / 1e6
        neurons = (prompt_tokens * self.input_neurons + completion_tokens * self.output_neurons) / 1e6
        return round(usd, 10), round(neurons, 4)


USD_PER_NEURON = 0.011 / 1000
PRICES = {
    "@cf/openai/gpt-oss-20b": Prices(0.20, 0.30, 18182, 27273),
    "@cf/openai/gpt-oss-120b": Prices(0.35, 0.75, 0.35 / USD_PER_NEURON, 0.75 / USD_PER_NEURON),
}


class Metering:
    def __init__(self, model: str, engine):
        self.model = model
        self.prices = PRICES.get(model, PRICES["@cf/openai/gpt-oss-20b"])
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ossrun_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = Histogram("ossrun_request_seconds", "Generation latency of interactive requests", registry=r,
                                 buckets=buckets)
        # Batch items wait behind interactive work and share steps with their own batch: their seconds would drown
        # the interactive latency, so they have their own histogram.
        self.batch_latency = Histogram("ossrun_batch_item_seconds", "Generation latency of batch queue items", registry=r,
                                       buckets=buckets + (600, 1800, 3600))
        self.tokens = Counter("ossrun_tokens_total", "Tokens by kind", ["kind"], registry=r)
        self.cost = Counter("ossrun_cost_usd_total", "Estimated cost at the hosted prices (USD)", registry=r)
        self.neurons = Counter("ossrun_neurons_total", "Estimated neurons at the hosted rates", registry=r)
        # Requests as clients sent them (the names dashboards know); the sequences (each choice of `n`, each prompt
        # of a list) are what takes the engine's `--max-num-seqs` slots.
        self.queue = Gauge("ossrun_queue_depth", "Requests waiting for the engine: none of their sequences is running",
                           registry=r)
        self.running = Gauge("ossrun_running_requests", "Requests the engine is running: at least one of their sequences "
                             "is running", registry=r)
        self.waiting_seqs = Gauge("ossrun_waiting_sequences", "Sequences (a request's choices of n, for each of its "
                                  "prompts) waiting for an engine slot", registry=r)
        self.running_seqs = Gauge("ossrun_running_sequences", "Sequences (a request's choices of n, for each of its "
                                  "prompts) holding an engine slot (at most --max-num-seqs)", registry=r)
        self.kv = Gauge("ossrun_kv_cache_usage", "Fraction of full-attention KV blocks in use", registry=r)
        self.tps = Gauge("ossrun_generated_tokens_per_second", "Generated tokens per second since the last scrape", registry=r)
        self.preemptions = Counter("ossrun_preemptions", "Running sequences preempted (their KV blocks taken back, "
                                   "recomputed later): often means --kv-cache-gib is small for the load", registry=r)
        self.batch_items = Gauge("ossrun_batch_items", "Batch queue items not done yet, by state (queued, running)",
                                 ["state"], registry=r)
        self.batch_finished = Counter("ossrun_batch_items_finished_total", "Batch queue items finished, by success",
                                      ["success"], registry=r)
        for success in ("true", "false"):
            self.batch_finished.labels(success)  # both series from the start, at 0
        self.batch_store_up = Gauge("ossrun_batch_store_up", "1 while the batch queue's store works, 0 while it keeps "
                                    "failing (the queue stands still until it works again)", registry=r)
        self.batch_backlog: Callable[[], dict[str, int]] = dict  # the batch store's `backlog`, once the app has one
        self.batch_store_ok: Callable[[], bool] = lambda: True  # the batch worker's `store_ok`, once the app has one
        self._last = (0, 0.0)
        self._unread = 0
        self._preempted = 0

    def record(self, model: str, outcome) -> None:
        self.tokens.labels("prompt").inc(outcome.prompt_tokens)
        self.tokens.labels("completion").inc(outcome.completion_tokens)
        self.tokens.labels("cached").inc(outcome.cached_tokens)
        self.tokens.labels("reasoning").inc(outcome.reasoning_tokens)
        usd, neurons = self.prices.cost(outcome.prompt_tokens, outcome.completion_tokens)
        self.cost.inc(usd)
        self.neurons.inc(neurons)

    def observe_latency(self, seconds: float, batch: bool = False) -> None:
        (self.batch_latency if batch else self.latency).observe(seconds)

    def batch_item_done(self, outcome) -> None:
        self.batch_finished.labels("true" if outcome.success else "false").inc()

    def tally(self, choices: int, usage: Callable[[], Any], batch: bool = False) -> "Tally":
        return Tally(self, choices, usage, batch)

    def render(self) -> bytes:
        stats = self.engine.stats()
        self.queue.set(stats["waiting_requests"])
        self.running.set(stats["running_requests"])
        self.waiting_seqs.set(stats["waiting"])
        self.running_seqs.set(stats["running"])
        self.kv.set(stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"]))
        now, (last_tokens, last_time) = time.monotonic(), self._last
        if last_time:
            self.tps.set((stats["generated_tokens_total"] - last_tokens) / max(1e-9, now - last_time))
        self._last = (stats["generated_tokens_total"], now)
        self._meter_unread(stats.get("unread_tokens_total", 0))
        preempted = stats.get("preemptions_total", 0)
        self.preemptions.inc(max(0, preempted - self._preempted))
        self._preempted = preempted
        self._meter_batch_store()
        return generate_latest(self.registry)

    def _meter_batch_store(self) -> None:
        """A failing store must not take /metrics down with it: the backlog keeps its last values and the
        `ossrun_batch_store_up` gauge says why."""
        up = self.batch_store_ok()
        try:
            backlog = self.batch_backlog()
        except Exception:  # the worker logs the failure (once per streak); the scrape goes on
            backlog, up = {}, False
        for state, count in backlog.items():
            self.batch_items.labels(state).set(count)
        self.batch_store_up.set(1 if up else 0)

    def _meter_unread(self, total: int) -> None:
        """Tokens the engine generated for requests that stopped reading (a client that left, a stop string
        matched here): no answer reports them, but they were generated, so they are metered as completion."""
        unread, self._unread = total - self._unread, total
        if unread > 0:
            self.tokens.labels("completion").inc(unread)
            usd, neurons = self.prices.cost(0, unread)
            self.cost.inc(usd)
            self.neurons.inc(neurons)


class Tally:
    """One HTTP request's metering, as its answer reports it. Its `choices` engine requests (n of them, for
    each prompt of a `/v1/completions` list) end one by one; after the last, `usage()` (the answer's usage:
    each prompt once, every choice's completion tokens) is recorded once, and the request's latency once."""

    def __init__(self, metering: Metering, choices: int, usage: Callable[[], Any], batch: bool = False):
        self.metering, self.open, self.usage, self.batch = metering, choices, usage, batch
        self.started = time.perf_counter()

    def ended(self) -> None:
        """One choice's engine request has ended, however it ended."""
        self.open -= 1
        if self.open == 0:
            self.metering.record(self.metering.model, self.usage())
            self.metering.observe_latency(time.perf_counter() - self.started, self.batch)
