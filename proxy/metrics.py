"""Prometheus metrics of one proxy instance, served on their own HTTP port.

Every instance owns a fresh ``CollectorRegistry`` (no global registry state, so several servers
can live in one process, e.g. in tests). Names and labels are fixed by DESIGN.md / COMMON.md
and alerted on by deploy/: keep them exactly.

Several serving processes (``server.workers`` > 1, proxy/workers.py): the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers import prometheus_client, so every value is kept in
that directory's memory-mapped files (prometheus-client's multiprocess mode, :func:`multiprocess`);
the workers serve no metrics port, and the supervisor serves their sum (:func:`serve_merged`). Each
gauge names how its per-process values merge (``multiprocess_mode``); the queue depth is a sum over
the live workers, refreshed by :meth:`Metrics.refresh` (a callback gauge cannot cross processes).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

OUTCOMES = (
    "accepted", "flagged", "rejected", "invalid", "not_found", "resource_exhausted",
    "upstream_error", "deadline_exceeded", "internal",
    "unavailable",  # the server is shutting down, or the shared client limits cannot be read (UNAVAILABLE: retry)
    "blocked",  # the client is blocked by a stateful stage (answered RESOURCE_EXHAUSTED with a retry hint)
    "limited",  # the client is over its rate limit or query budget (RESOURCE_EXHAUSTED with a retry hint)
)
REFUSAL_REASONS = ("rate", "budget")  # proxy/ratelimit.py; a stateful stage's block counts under its name
# 100 us .. ~30 s
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess() -> bool:
    """Whether prometheus_client keeps its values in PROMETHEUS_MULTIPROC_DIR's files (decided
    when prometheus_client was first imported)."""
    return values.ValueClass is not values.MutexValue


def serve_merged(port: int, host: str, path: str):
    """The supervisor's /metrics: every worker's values in ``path``, merged (prometheus-client's
    MultiProcessCollector: counters and histograms summed, gauges by their multiprocess_mode).
    Returns (http server, thread) as ``start_http_server`` does."""
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return start_http_server(port, addr=host, registry=registry)


SCORE_BUCKETS = (-10, -1, -0.1, 0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 100, 1000)


class BatchHistogram:
    """A Prometheus histogram with one label, observed a whole batch at a time.

    Written by hand because prometheus_client's ``Histogram`` takes one value per call under a
    lock (~2.4 us each here): the scores of a batch of 64 items cost the event loop ~150 us per
    detector. This one bins a batch with one ``numpy.searchsorted``; the exposition is the same
    (``NAME_bucket{le=...}`` cumulative, ``NAME_count``, ``NAME_sum``; a label appears with its
    first observation). Thread-safe: batches are observed on the event loop, scrapes come from
    the metrics server's thread."""

    def __init__(self, name: str, documentation: str, labelname: str, buckets: Iterable[float],
                 registry: CollectorRegistry):
        self.name, self.documentation, self.labelname = name, documentation, labelname
        self.bounds = np.asarray(sorted(float(b) for b in buckets), dtype=np.float64)
        self._series: dict[str, list] = {}  # label value -> [counts per bucket + the +Inf one, sum]
        self._lock = threading.Lock()
        # multiprocess mode: per label, one file-backed value per bucket (non-cumulative, as
        # prometheus_client's own Histogram keeps them there) and one for the sum; the supervisor's
        # MultiProcessCollector merges and exposes them, so this collector exposes nothing itself
        self._files: dict[str, tuple[list, object]] | None = {} if multiprocess() else None
        les = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
        self._les = les
        if self._files is None:
            registry.register(self)

    def observe_many(self, label: str, values: np.ndarray) -> None:
        """Observes every finite value of ``values`` (NaN and infinities are not scores: skipped)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        # bucket i holds bounds[i-1] < v <= bounds[i] (Prometheus' "le"); index len(bounds) is +Inf
        counts = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=self.bounds.size + 1)
        if self._files is not None:
            self._observe_files(label, counts, float(v.sum()))
            return
        with self._lock:
            series = self._series.setdefault(label, [np.zeros(self.bounds.size + 1, dtype=np.int64), 0.0])
            series[0] += counts
            series[1] += float(v.sum())

    def _observe_files(self, label: str, counts: np.ndarray, total: float) -> None:
        with self._lock:
            files = self._files.get(label)
            if files is None:
                value = values.ValueClass
                buckets = [value("histogram", self.name, self.name + "_bucket", (self.labelname, "le"), (label, le),
                                 self.documentation) for le in self._les]
                files = self._files[label] = (buckets, value("histogram", self.name, self.name + "_sum",
                                                              (self.labelname,), (label,), self.documentation))
            for i in np.flatnonzero(counts).tolist():
                files[0][i].inc(int(counts[i]))
            files[1].inc(total)

    def describe(self):
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])
        with self._lock:
            snapshot = [(label, counts.copy(), total) for label, (counts, total) in self._series.items()]
        for label, counts, total in sorted(snapshot, key=lambda s: s[0]):
            cumulative = np.cumsum(counts).tolist()
            buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cumulative)]
            family.add_metric([label], buckets + [("+Inf", cumulative[-1])], None)
            # _count and _sum: prometheus_client leaves both out of add_metric, and _sum out of its
            # Histogram, when a bucket bound is negative (as the score buckets' are); the sum is kept
            # here (with the count, the mean score: a drift signal) -- DESIGN.md's series name it
            family.samples += [Sample(self.name + "_count", {self.labelname: label}, cumulative[-1]),
                               Sample(self.name + "_sum", {self.labelname: label}, total)]
        yield family


class StoreStats:
    """Gauges of the stateful stages' history stores, read at scrape time (``stores()`` -> stage ->
    ``{entries, clients, bytes}``, defenses/stateful/store.py ``stats``). A store that cannot answer
    (Redis down) is left out of that scrape."""

    def __init__(self, stores: Callable[[], dict], registry: CollectorRegistry):
        self.stores = stores
        self.gauges = None
        self._lock, self._due, self._reader = threading.Lock(), threading.Event(), None
        if multiprocess():  # a scrape-time collector cannot cross processes: :meth:`refresh` writes gauges
            self.gauges = {k: Gauge(f"robustgate_stateful_{k}", doc, ["stage"], registry=registry, multiprocess_mode="max")
                           for k, doc in self.DOCS}
        else:
            registry.register(self)

    DOCS = (("entries", "Queries remembered by a stateful stage's history store"),
            ("clients", "Clients remembered by a stateful stage's history store"),
            ("bytes", "Memory of a stateful stage's history store (Redis: the server's used_memory)"))

    def refresh(self) -> None:
        """Multiprocess mode: the stores' figures, for the supervisor's next scrape (the largest over
        the workers: with a shared store every worker reads the same; per-process memory stores are
        each their own, docs/OPERATIONS.md "Workers"). Read in a thread of its own, one read at a
        time, and this returns at once: the caller is the event loop (the health loop, once a
        second), and a shared store answers over the network -- a Redis store counts its keys, which
        takes long with many clients, and the loop must not wait for it."""
        with self._lock:
            if self._reader is None:  # one long-lived thread (a shared store's connection is per thread)
                self._reader = threading.Thread(target=self._read_loop, name="robustgate-store-stats", daemon=True)
                self._reader.start()
        self._due.set()  # a read still going when this is set is followed by one more, not by several

    def _read_loop(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            for stage, store in sorted(self.stores().items()):
                try:
                    stats = store.stats()
                except Exception:  # noqa: BLE001 - as a scrape: one store's failure is left out
                    continue
                for k, gauge in self.gauges.items():
                    gauge.labels(stage=stage).set(float(stats[k]))

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        fams = {k: GaugeMetricFamily(f"robustgate_stateful_{k}", doc, labels=["stage"]) for k, doc in self.DOCS}
        for stage, store in sorted(self.stores().items()):
            try:
                stats = store.stats()
            except Exception:  # noqa: BLE001 - a scrape never fails for one store
                continue
            for k, fam in fams.items():
                fam.add_metric([stage], float(stats[k]))
        yield from fams.values()


class Metrics:
    def __init__(self, version: str, bundle: str, revision: str, stages: tuple[str, ...] = ()):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("robustgate_requests", "ModelInfer requests by outcome", ["outcome"], registry=r)
        self.items = Counter("robustgate_items", "Items answered, by verdict", ["verdict"], registry=r)
        self.rejections = Counter("robustgate_rejections", "Items rejected, by the stage that rejected them", ["detector"], registry=r)
        self.detector_score = BatchHistogram("robustgate_detector_score", "Raw detector scores", "detector",
                                             SCORE_BUCKETS, registry=r)
        self.stage_duration = Histogram(
            "robustgate_stage_duration_seconds", "Wall time per stage (decode, queue, classify, encode and each defense stage)",
            ["stage"], registry=r, buckets=LATENCY_BUCKETS,
        )
        self.request_duration = Histogram(
            "robustgate_request_duration_seconds", "End-to-end ModelInfer time", registry=r, buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram("robustgate_batch_size", "Items per executed batch", registry=r, buckets=BATCH_BUCKETS)
        self.queue_depth = Gauge("robustgate_queue_depth", "Items waiting in the batcher", registry=r,
                                 multiprocess_mode="livesum")
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
        self.build_info = Gauge("robustgate_build_info", "Build and bundle", ["version", "bundle", "revision"], registry=r,
                                multiprocess_mode="max")
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
        self.clients_blocked = Counter(
            "robustgate_clients_blocked", "Clients that started being refused: by a stateful stage's block (its name) "
            "or by their rate limit or query budget (rate, budget)", ["reason"], registry=r)
        self.queries_refused = Counter(
            "robustgate_queries_refused", "Items refused to a blocked or limited client, by reason (stage, rate, budget)",
            ["reason"], registry=r)
        self.limit_store_errors = Counter(
            "robustgate_limit_store_errors", "Requests whose per-client limits could not be read from the shared "
            "store (limits.per_client.store kind redis): refused UNAVAILABLE, or admitted with on_error fail-open",
            registry=r)
        self.stateful_detections = Counter(
            "robustgate_stateful_detections", "Queries a stateful stage scored above its threshold", ["stage"], registry=r)
        self.stateful_observe = Histogram(
            "robustgate_stateful_observe_duration_seconds", "Wall time of a stateful stage per batch (fingerprints, "
            "store lookups and inserts)", ["stage"], registry=r, buckets=LATENCY_BUCKETS)
        for reason in REFUSAL_REASONS:
            self.clients_blocked.labels(reason=reason)
            self.queries_refused.labels(reason=reason)
        self._backend_info = Gauge("robustgate_backend_info", "The backbone's runtime: kind (onnxruntime | torch | "
                                   "upstream), device, provider (ONNX Runtime's execution provider, or torch)",
                                   ["kind", "device", "provider"], registry=r,
                                   multiprocess_mode="max")
        self._backend_labels: tuple[str, str, str] | None = None  # the series at 1 (backend_info)
        # the children the hot path observes per call, looked up once (labels() takes a lock and
        # builds a key per call)
        self.decode_duration = self.stage_duration.labels(stage="decode")
        self.queue_duration = self.stage_duration.labels(stage="queue")
        self.encode_duration = self.stage_duration.labels(stage="encode")
        self._outcomes = {outcome: self.requests.labels(outcome=outcome) for outcome in OUTCOMES}
        self._verdict_items = {verdict: self.items.labels(verdict=verdict) for verdict in ("accepted", "flagged", "rejected")}
        self._stages: dict = {}  # stage -> robustgate_stage_duration_seconds{stage} child (see stage_child)
        self._stateful: dict = {}  # stage -> robustgate_stateful_observe_duration_seconds{stage} child
        self._http = None

    def outcome_counter(self, outcome: str):
        """``robustgate_requests_total{outcome=...}``'s child (cached for the OUTCOMES)."""
        child = self._outcomes.get(outcome)
        return child if child is not None else self.requests.labels(outcome=outcome)

    @staticmethod
    def _child(cache: dict, metric, stage: str):
        """``metric{stage=...}``'s child, looked up once (``labels()`` takes a lock and builds a key)."""
        child = cache.get(stage)
        if child is None:
            child = cache[stage] = metric.labels(stage=stage)
        return child

    def stage_child(self, stage: str):
        """``robustgate_stage_duration_seconds{stage=...}``'s child (cached; observed per batch)."""
        return self._child(self._stages, self.stage_duration, stage)

    def stateful_child(self, stage: str):
        """``robustgate_stateful_observe_duration_seconds{stage=...}``'s child (cached; observed per batch)."""
        return self._child(self._stateful, self.stateful_observe, stage)

    def verdict_items(self, verdict: str):
        """``robustgate_items_total{verdict=...}``'s child (cached)."""
        return self._verdict_items[verdict]

    def backend_info(self, kind: str, device: str, provider: str) -> None:
        """Sets ``robustgate_backend_info{kind,device,provider} 1`` (one series at 1: a new call replaces
        it; in multiprocess mode, where prometheus-client removes no series, the old one reads 0)."""
        labels = (kind, device, provider)
        old, self._backend_labels = self._backend_labels, labels
        if old is not None and old != labels:
            if multiprocess():
                self._backend_info.labels(*old).set(0)
            else:
                self._backend_info.remove(*old)
        self._backend_info.labels(*labels).set(1)

    def watch_stores(self, stores: Callable[[], dict]) -> None:
        """Exports the stateful stores' gauges (:class:`StoreStats`); ``stores()`` -> stage -> store."""
        self._store_stats = StoreStats(stores, self.registry)

    def watch_stateful(self, stages: Iterable[str]) -> None:
        """Zero series for the stateful stages (a reload may add one)."""
        for stage in stages:
            self.stateful_detections.labels(stage=stage)
            self.clients_blocked.labels(reason=stage)
            self.queries_refused.labels(reason=stage)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self._depth = depth
        if not multiprocess():  # read at each scrape; across processes :meth:`refresh` writes it
            self.queue_depth.set_function(depth)

    def refresh(self) -> None:
        """Multiprocess mode: writes the queue depth for the supervisor's next scrape (the server
        calls this from its health loop, once a second); single process: nothing to do."""
        if not multiprocess():
            return
        depth = getattr(self, "_depth", None)
        if depth is not None:
            self.queue_depth.set(depth())
        stats = getattr(self, "_store_stats", None)
        if stats is not None:
            stats.refresh()

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
