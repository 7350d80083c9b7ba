"""Prometheus metrics, named like vLLM's (prefix `canvaslm:`) so dashboards port, plus the diffusion ones."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPF_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class Metrics:
    """One registry per server (tests run several in a process)."""

    def __init__(self, model: str) -> None:
        self.registry = registry = CollectorRegistry()
        labels = ["model_name"]
        self.model = model
        self.http = Counter("canvaslm:http_requests", "HTTP responses by route and status",
                            [*labels, "route", "status"], registry=registry)
        self.success = Counter("canvaslm:request_success", "finished generation requests by finish reason",
                               [*labels, "finished_reason"], registry=registry)
        self.prompt_tokens = Counter("canvaslm:prompt_tokens", "prompt tokens processed", labels, registry=registry)
        self.generation_tokens = Counter("canvaslm:generation_tokens", "tokens generated", labels, registry=registry)
        self.tokens_per_forward = Histogram("canvaslm:tokens_per_forward", "generated tokens per forward pass, per "
                                            "sequence", labels, buckets=TPF_BUCKETS, registry=registry)
        self.forward = Histogram("canvaslm:forward_pass_seconds", "latency of one engine forward pass", labels,
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.batch = Histogram("canvaslm:forward_batch_size", "sequences in one forward pass", labels,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.ttft = Histogram("canvaslm:time_to_first_token_seconds", "time to the first streamed token", labels,
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("canvaslm:e2e_request_latency_seconds", "request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.running = Gauge("canvaslm:num_requests_running", "sequences in the running batch", labels,
                             registry=registry)
        self.waiting = Gauge("canvaslm:num_requests_waiting", "sequences waiting in the queue", labels,
                             registry=registry)
        # verified decoding's drafts, as vLLM counts speculative decoding's (acceptance rate = accepted / draft
        # tokens; per position: how far into its drafts a round keeps going)
        self.drafts = Counter("canvaslm:spec_decode_num_drafts", "verified rounds (one draft each)", labels,
                              registry=registry)
        self.draft_tokens = Counter("canvaslm:spec_decode_num_draft_tokens", "draft tokens proposed", labels,
                                    registry=registry)
        self.accepted_tokens = Counter("canvaslm:spec_decode_num_accepted_tokens", "draft tokens accepted", labels,
                                       registry=registry)
        self.accepted_per_position = Counter("canvaslm:spec_decode_num_accepted_tokens_per_pos",
                                             "draft tokens accepted at each position of the draft (0-based)",
                                             [*labels, "position"], registry=registry)

    def http_response(self, route: str, status: int) -> None:
        known = route if route in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                   "/metrics") else "other"
        self.http.labels(self.model, known, str(status)).inc()

    def request_started(self, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)

    def request_finished(self, reasons: Sequence[str | None], generated: int, tokens_per_forward: Sequence[float],
                         ttft: float | None, seconds: float) -> None:
        for reason in reasons:
            self.success.labels(self.model, reason or "abort").inc()
        self.generation_tokens.labels(self.model).inc(generated)
        for value in tokens_per_forward:
            self.tokens_per_forward.labels(self.model).observe(value)
        if ttft is not None:
            self.ttft.labels(self.model).observe(ttft)
        self.e2e.labels(self.model).observe(seconds)

    def forward_pass(self, batch: int, seconds: float) -> None:  # called from the engine thread
        self.forward.labels(self.model).observe(seconds)
        self.batch.labels(self.model).observe(batch)

    def verified_round(self, accepted: Sequence[int], drafted: int) -> None:  # called from the engine thread
        """One verified step: per sequence, how many of its `drafted` draft tokens the check kept."""
        self.drafts.labels(self.model).inc(len(accepted))
        self.draft_tokens.labels(self.model).inc(len(accepted) * drafted)
        self.accepted_tokens.labels(self.model).inc(sum(accepted))
        for position in range(drafted):
            self.accepted_per_position.labels(self.model, str(position)).inc(sum(k > position for k in accepted))

    def queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model).set(running)
        self.waiting.labels(self.model).set(waiting)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
