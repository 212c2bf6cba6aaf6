"""`GET /metrics`: the fleet in Prometheus text, built with OpenTelemetry metrics.

The instruments live on a MeterProvider of this service; the Prometheus
exporter is one reader of it (with its own registry, so several services in
one process never collide), and `JETFLEET_OTEL_METRICS=otlp` adds an OTLP
reader (when opentelemetry-exporter-otlp is installed) so the same
instruments go out over OTLP too. Gauges are read from the projection when
scraped; the job duration histogram counts jobs this process saw finish.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from schemas.jobs import TERMINAL_STATES

from .rows import Batch
from .writer import Projection

log = logging.getLogger(__name__)

WAITING = ("submitted", "queued", "retrying", "unschedulable")
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class FleetMetrics:
    def __init__(self, projection: Projection, lag: Callable[[], dict[str, tuple[int, float]]],
                 instance: str) -> None:
        self.projection = projection
        self.lag = lag
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        if os.environ.get("JETFLEET_OTEL_METRICS", "").lower() == "otlp":
            readers += _otlp()
        self.provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create({"service.name": "jetfleet-query",
                                      "service.instance.id": instance}),
            views=[View(instrument_name="jetfleet.job.duration",
                        aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS))])
        meter = self.provider.get_meter("jetfleet.query")
        self.durations = meter.create_histogram(
            "jetfleet.job.duration", unit="s",
            description="time from start to end of jobs this process saw finish")
        gauges: list[tuple[str, str, str, Callable[[], Iterable[Observation]]]] = [
            ("jetfleet.queue.depth", "1", "jobs waiting, by capability and priority",
             self._queue),
            ("jetfleet.jobs", "1", "jobs by state", self._jobs),
            ("jetfleet.worker.load", "1", "jobs running on each live worker", self._load),
            ("jetfleet.worker.capacity", "1", "jobs each live worker takes at once",
             self._capacity),
            ("jetfleet.gpu.utilization", "%", "latest GPU utilization by node and device",
             self._gpu_util),
            ("jetfleet.gpu.memory.used", "MiBy", "latest GPU memory used by node and device",
             self._gpu_mem),
            ("jetfleet.projection.lag.messages", "1",
             "messages in each stream not yet in the projection", self._lag_messages),
            ("jetfleet.projection.lag", "s", "arrival-to-commit time of the latest batch",
             self._lag_seconds),
        ]
        for name, unit, description, fn in gauges:
            meter.create_observable_gauge(name, callbacks=[_callback(fn)], unit=unit,
                                          description=description)

    def on_flush(self, batch: Batch) -> None:
        for capability_type, state, duration in batch.finished:
            if duration is not None and state in TERMINAL_STATES:
                self.durations.record(duration, {"capability": capability_type or "",
                                                 "state": state})

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()
        except Exception as exc:  # shutting down must never fail the service's stop
            log.debug("metrics shutdown: %s", exc)

    # ---- gauges (run in the scraping thread, on its own cursor) -----------------------------

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.projection.reader().execute(sql).fetchall()

    def _queue(self) -> Iterable[Observation]:
        states = ", ".join(f"'{s}'" for s in WAITING)
        for ctype, prio, n in self._rows(
                "SELECT coalesce(capability_type, ''), coalesce(priority, 1), count(*) "
                f"FROM jobs WHERE state IN ({states}) GROUP BY ALL"):
            yield Observation(n, {"capability": ctype, "priority": str(prio)})

    def _jobs(self) -> Iterable[Observation]:
        for state, n in self._rows("SELECT coalesce(state, 'submitted'), count(*) FROM jobs "
                                   "GROUP BY ALL"):
            yield Observation(n, {"state": state})

    def _load(self) -> Iterable[Observation]:
        for worker, node, load, _ in self._workers():
            yield Observation(load or 0, {"worker": worker, "node": node or ""})

    def _capacity(self) -> Iterable[Observation]:
        for worker, node, _, capacity in self._workers():
            yield Observation(capacity or 0, {"worker": worker, "node": node or ""})

    def _workers(self) -> list[tuple[Any, ...]]:
        return self._rows("SELECT worker_id, node, load, capacity FROM workers WHERE live")

    def _gpu_util(self) -> Iterable[Observation]:
        for node, gpu, util, _ in self._devices():
            if util is not None:
                yield Observation(util, {"node": node, "gpu": str(gpu)})

    def _gpu_mem(self) -> Iterable[Observation]:
        for node, gpu, _, used in self._devices():
            if used is not None:
                yield Observation(used, {"node": node, "gpu": str(gpu)})

    def _devices(self) -> list[tuple[Any, ...]]:
        return self._rows("SELECT node, gpu, gpu_util_pct, fb_used_mb FROM devices")

    def _lag_messages(self) -> Iterable[Observation]:
        for stream, (messages, _) in self.lag().items():
            yield Observation(messages, {"stream": stream})

    def _lag_seconds(self) -> Iterable[Observation]:
        lags = self.lag()
        if lags:
            yield Observation(max(seconds for _, seconds in lags.values()))


def _callback(fn: Callable[[], Iterable[Observation]]
              ) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        try:
            return list(fn())
        except Exception as exc:  # a scrape never fails for one gauge
            log.warning("metrics gauge failed: %s", exc)
            return []

    return observe


def _otlp() -> list[MetricReader]:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    except ImportError:
        log.warning("JETFLEET_OTEL_METRICS=otlp needs opentelemetry-exporter-otlp-proto-http")
        return []
    return [PeriodicExportingMetricReader(OTLPMetricExporter())]
