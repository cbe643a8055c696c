"""Prometheus metrics of one server (a registry of its own, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragspec_requests", "Requests served, by endpoint and finish reason "
                                "(eos, stop, length, cancelled, error)", ["endpoint", "finish_reason"], registry=r)
        self.rejected = Counter("ragspec_rejected_requests", "Requests refused before generation, by HTTP status",
                                ["status"], registry=r)
        self.in_flight = Gauge("ragspec_requests_in_flight", "Requests generating now", registry=r)
        self.prompt_tokens = Counter("ragspec_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_prompt_tokens = Counter("ragspec_cached_prompt_tokens",
                                            "Prompt tokens whose KV came from the prefix cache", registry=r)
        self.generation_tokens = Counter("ragspec_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("ragspec_time_to_first_token_seconds", "From request received to first text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ragspec_request_duration_seconds", "From request received to its end",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("ragspec_target_steps", "Target forward passes (decoding steps)", registry=r)
        self.draft_tokens = Counter("ragspec_draft_tokens", "Draft tokens verified", registry=r)
        self.accepted_drafts = Counter("ragspec_accepted_draft_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_source = Counter("ragspec_accepted_tokens", "Draft tokens accepted, by drafter",
                                           ["source"], registry=r)
        self.drafted_per_source = Counter("ragspec_drafted_tokens", "Draft tokens verified, by drafter",
                                          ["source"], registry=r)
        self.acceptance = Gauge("ragspec_mean_acceptance_length",
                                "Tokens committed per target forward over all requests (1 = plain decoding)",
                                registry=r)
        self.acceptance.set_function(self._mean_acceptance_length)
        self._totals = [0, 0]  # steps, accepted draft tokens (the counters' values, kept readable)

    def _mean_acceptance_length(self) -> float:
        steps, accepted = self._totals
        return (accepted + steps) / steps if steps else 0.0

    def record(self, endpoint: str, generation, ttft_s: float | None, total_s: float) -> None:
        """One finished (or cancelled) request."""
        stats = generation.stats
        self.requests.labels(endpoint, generation.finish_reason).inc()
        self.prompt_tokens.inc(generation.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_prompt_tokens)
        self.generation_tokens.inc(len(generation.token_ids))
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.latency.observe(total_s)
        self.steps.inc(stats.num_steps)
        self.draft_tokens.inc(stats.num_draft_tokens)
        self.accepted_drafts.inc(stats.num_accepted_tokens)
        self._totals[0] += stats.num_steps
        self._totals[1] += stats.num_accepted_tokens
        for source, count in stats.accepted_per_source.items():
            self.accepted_per_source.labels(source).inc(count)
        for source, count in stats.drafted_per_source.items():
            self.drafted_per_source.labels(source).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
