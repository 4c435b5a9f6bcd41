"""``GET /metrics``: Prometheus text format, from the app's own registry.

Two sources: ``HttpMetrics`` (counted by ``MetricsMiddleware`` as requests are answered) and
``PipelineCollector`` (read from ``pipeline.status()`` at scrape time, so never stale).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api import NodeView, Pipeline

router = APIRouter(tags=["metrics"])

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)
NODE_STATES = ("up", "slow", "down", "starting")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class HttpMetrics:
    """Requests by endpoint (the route's path template) and status, latency, in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("armdi_http_requests", "HTTP requests answered.",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("armdi_http_request_duration_seconds",
                                 "Time to answer an HTTP request.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        self.in_flight = Gauge("armdi_http_requests_in_flight",
                               "HTTP requests being answered now.", registry=registry)


class MetricsMiddleware:
    """ASGI middleware that counts every HTTP request into ``HttpMetrics``."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.in_flight.dec()
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _endpoint(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        for route in self.routes:  # answered before routing, e.g. a 413 from the body limit
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"


class PipelineCollector:
    """Gauges and counters read from ``pipeline.status()`` whenever Prometheus scrapes."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        status = self.pipeline.status()
        model = [status.model_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model"])
            family.add_metric(model, value)
            return family

        yield gauge("armdi_pipeline_ready", "1 when a live path runs the whole model.",
                    float(status.ready))
        yield gauge("armdi_pipeline_blocks", "Blocks the model is split into.", status.blocks)
        yield gauge("armdi_pipeline_in_flight", "Requests inside the pipeline now.",
                    status.in_flight)
        yield counter("armdi_pipeline_completed", "Requests answered.", status.completed)
        yield counter("armdi_pipeline_failed", "Requests that failed.", status.failed)
        yield counter("armdi_pipeline_retried", "Requests re-sent after a failure.",
                      status.retried)
        yield gauge("armdi_pipeline_throughput_per_second", "Requests answered per second.",
                    status.throughput_per_s)
        latency = GaugeMetricFamily("armdi_pipeline_latency_ms",
                                    "End-to-end latency quantiles (milliseconds).",
                                    labels=["model", "quantile"])
        for quantile, value in (("0.5", status.latency_p50_ms), ("0.99", status.latency_p99_ms)):
            if value is not None:
                latency.add_metric([status.model_id, quantile], value)
        yield latency
        named = CounterMetricFamily("armdi_pipeline_counter", "The pipeline's named counters.",
                                    labels=["model", "name"])
        for name, count in sorted(status.counters.items()):
            named.add_metric([status.model_id, name], count)
        yield named
        yield from self._nodes(status.model_id, status.nodes)

    @staticmethod
    def _nodes(model_id: str, nodes: Sequence[NodeView]) -> Iterator[Metric]:
        labels = ["model", "node"]
        stage = GaugeMetricFamily("armdi_node_stage_ms", "Time a node takes for its blocks "
                                  "(milliseconds).", labels=labels)
        depth = GaugeMetricFamily("armdi_node_queue_depth", "Requests waiting at a node.",
                                  labels=labels)
        capacity = GaugeMetricFamily("armdi_node_queue_capacity", "A node's queue size.",
                                     labels=labels)
        processed = CounterMetricFamily("armdi_node_processed", "Requests a node has run.",
                                        labels=labels)
        first = GaugeMetricFamily("armdi_node_block_start", "First block a node runs.",
                                  labels=labels)
        end = GaugeMetricFamily("armdi_node_block_end", "One past the last block a node runs.",
                                labels=labels)
        state = GaugeMetricFamily("armdi_node_state", "1 for the state a node is in.",
                                  labels=[*labels, "state"])
        for node in nodes:
            key = [model_id, node.name]
            if node.stage_ms is not None:
                stage.add_metric(key, node.stage_ms)
            depth.add_metric(key, node.queue_depth)
            capacity.add_metric(key, node.queue_capacity)
            processed.add_metric(key, node.processed)
            first.add_metric(key, node.start)
            end.add_metric(key, node.end)
            for name in sorted({*NODE_STATES, node.state}):
                state.add_metric([*key, name], float(name == node.state))
        yield from (stage, depth, capacity, processed, first, end, state)
