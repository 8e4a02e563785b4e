"""/metrics in the Prometheus exposition format, through prometheus-client: requests and their
latency by view and status, compute time by level, source bytes read per byte served, every cache
section, the queue and the datasets. One registry per app, so several apps never share counters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .cache import Cache
from .workers import Meter

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, cache: Cache, meter: Meter, datasets: Mapping, queued: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("bil_transform_requests", "HTTP requests answered, by view and status",
                                ["view", "status"], registry=self.registry)
        self.latency = Histogram("bil_transform_request_seconds", "Time to answer a request (its whole body), by view",
                                 ["view"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.served = Counter("bil_transform_response_bytes", "Body bytes sent, gzip-encoded ones as sent",
                              registry=self.registry)
        self.registry.register(_Live(cache, meter, datasets, queued))

    def observe(self, view: str, status: int, seconds: float, body_bytes: int) -> None:
        self.requests.labels(view, str(status)).inc()
        self.latency.labels(view).observe(seconds)
        self.served.inc(body_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """What is read at scrape time from the objects that keep it: caches, the meter, the queue."""

    def __init__(self, cache: Cache, meter: Meter, datasets: Mapping, queued: Callable[[], int]):
        self.cache, self.meter, self.datasets, self.queued = cache, meter, datasets, queued

    def collect(self) -> Iterable[Metric]:
        stats = {name: counts for name, counts in self.cache.stats().items() if name != "all"}
        for counter in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(f"bil_transform_cache_{counter}", f"Cache {counter}, by cache section",
                                         labels=["cache"])
            for name, counts in stats.items():
                family.add_metric([name], counts[counter])
            yield family
        for gauge in ("bytes", "entries"):
            family = GaugeMetricFamily(f"bil_transform_cache_{gauge}", f"Cache {gauge} held, by cache section",
                                       labels=["cache"])
            for name, counts in stats.items():
                family.add_metric([name], counts[gauge])
            yield family
        yield GaugeMetricFamily("bil_transform_cache_max_bytes", "The cache budget (--cache-size)",
                                value=self.cache.max_bytes)
        computed = self.meter.snapshot()
        seconds = CounterMetricFamily("bil_transform_compute_seconds",
                                      "Worker time spent computing blocks of each level, the parent blocks "
                                      "they needed included", labels=["level"])
        blocks = CounterMetricFamily("bil_transform_blocks_computed", "Blocks computed, by level", labels=["level"])
        for level, (n, s) in sorted(computed["levels"].items()):
            seconds.add_metric([str(level)], s)
            blocks.add_metric([str(level)], n)
        yield seconds
        yield blocks
        yield CounterMetricFamily("bil_transform_source_bytes", "Voxel bytes read from source files (decoded); "
                                  "divide by bil_transform_response_bytes_total for bytes read per byte served",
                                  value=computed["source_bytes"])
        yield GaugeMetricFamily("bil_transform_queued_jobs", "Jobs waiting for or running on the workers",
                                value=self.queued())
        datasets = GaugeMetricFamily("bil_transform_datasets", "Datasets by status", labels=["status"])
        snapshots = [ds.snapshot for ds in self.datasets.values()]
        datasets.add_metric(["ok"], sum(s.pyramid is not None for s in snapshots))
        datasets.add_metric(["error"], sum(s.pyramid is None for s in snapshots))
        yield datasets
