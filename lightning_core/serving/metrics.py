"""The gateway's Prometheus metrics (``GET /metrics``), in a registry of their own per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    """Prometheus metrics of one gateway, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("arclight_gateway_requests", "Model calls answered.", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "arclight_gateway_request_latency_seconds", "Time from request to the last byte of the answer.", ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry,
        )
        self.tokens = Counter("arclight_gateway_tokens", "Tokens processed.", ["kind"], registry=self.registry)
        self.in_flight = Gauge("arclight_gateway_in_flight", "Calls being answered now.", registry=self.registry)
        self.spans = Counter("arclight_gateway_spans_recorded", "LLM-call spans handed to the exporter.", registry=self.registry)
        self.rollouts = Gauge("arclight_gateway_rollouts", "Registered rollouts.", registry=self.registry)
        self.policy_version = Gauge("arclight_gateway_policy_version", "Current version per policy.", ["policy"], registry=self.registry)
