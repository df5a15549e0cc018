"""Prometheus metrics of one proxy instance, served on their own HTTP port.

Every instance owns a fresh ``CollectorRegistry`` (no global registry state, so several servers
can live in one process, e.g. in tests). Names and labels are fixed by DESIGN.md / COMMON.md
and alerted on by deploy/: keep them exactly.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OUTCOMES = (
    "accepted", "flagged", "rejected", "invalid", "not_found", "resource_exhausted",
    "upstream_error", "deadline_exceeded", "internal",
    "unavailable",  # the server is shutting down (answered UNAVAILABLE: the client may retry elsewhere)
)
# 100 us .. ~30 s
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, version: str, bundle: str, revision: str, stages: tuple[str, ...] = ()):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("robustgate_requests", "ModelInfer requests by outcome", ["outcome"], registry=r)
        self.items = Counter("robustgate_items", "Items answered, by verdict", ["verdict"], registry=r)
        self.rejections = Counter("robustgate_rejections", "Items rejected, by the stage that rejected them", ["detector"], registry=r)
        self.detector_score = Histogram(
            "robustgate_detector_score", "Raw detector scores", ["detector"], registry=r,
            buckets=(-10, -1, -0.1, 0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 100, 1000),
        )
        self.stage_duration = Histogram(
            "robustgate_stage_duration_seconds", "Wall time per stage (decode, queue, classify, encode and each defense stage)",
            ["stage"], registry=r, buckets=LATENCY_BUCKETS,
        )
        self.request_duration = Histogram(
            "robustgate_request_duration_seconds", "End-to-end ModelInfer time", registry=r, buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram("robustgate_batch_size", "Items per executed batch", registry=r, buckets=BATCH_BUCKETS)
        self.queue_depth = Gauge("robustgate_queue_depth", "Items waiting in the batcher", registry=r)
        self.upstream_errors = Counter("robustgate_upstream_errors", "Backend errors by gRPC code", ["code"], registry=r)
        self.stage_failures = Counter(
            "robustgate_stage_failures", "Stages that raised, by stage and failure policy", ["stage", "policy"], registry=r,
        )
        self.auth_failures = Counter(
            "robustgate_auth_failures", "RPCs refused UNAUTHENTICATED (missing or wrong bearer token)", registry=r,
        )
        self.reloads = Counter("robustgate_reloads", "Hot reloads of the pipeline, by result", ["result"], registry=r)
        for result in ("ok", "error"):
            self.reloads.labels(result=result)
        self.build_info = Gauge("robustgate_build_info", "Build and bundle", ["version", "bundle", "revision"], registry=r)
        self.build_info.labels(version=version, bundle=bundle, revision=revision).set(1)
        for outcome in OUTCOMES:  # export zeros so rates and alerts work from the start
            self.requests.labels(outcome=outcome)
        for verdict in ("accepted", "flagged", "rejected"):
            self.items.labels(verdict=verdict)
        # every stage that can reject (a detector, the ensemble's abstention, a failing stage
        # under fail-closed) exports 0 from the start, so the first burst of an attack is a rise
        # Prometheus sees rather than a series that appears mid-burst
        for stage in stages:
            self.rejections.labels(detector=stage)
        self._http = None

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (``port`` 0 = any free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
